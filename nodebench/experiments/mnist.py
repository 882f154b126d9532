"""`make reproduce-mnist`: Table 1 and Figure 3 of Chen et al. 2018, measured.

Stages (``--stages``, all by default, in this order):
  train   one ``nodebench train`` per model of Table 1 and the control (stem + head), with the
          profile's budget, in the profile's lanes
  memory  activation memory vs NFE (RK-Net, ODE-Net) and vs depth (ResNet); a job of a lane
          when the train stage runs too
  sweep   tolerance sweep of the trained ODE-Net: error and forward time vs NFE (Fig. 3a, 3b)
  checks  solve validity and gradient error of the trained ODE-Net and RK-Net (``nodebench
          check``: checks.json in their run folders), the ODE-Net's validity at every tolerance
          of the sweep; not timed
  report  tables (Markdown, CSV, LaTeX) and figures into the results folder

Profiles: ``cpu`` (default; under 60 min on 2 idle CPU cores), ``gpu`` (12 epochs of the paper
recipe, under 9 min on one datacenter GPU), ``paper`` (160 epochs, the full recipe: for a GPU),
``tiny`` (synthetic data, seconds: CI). A profile's ``lanes`` say which jobs run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError
from pathlib import Path

import torch

from . import folders, split_list

MODELS = ("mlp", "resnet", "rknet", "odenet", "control")
CONV_BUDGET = ["trainer.epochs=2", "trainer.max_batches=352"]  # 704 iterations x 128 images

PROFILES: dict[str, dict] = {
    "cpu": {
        "description": "CPU budget for 2 idle cores in under 60 minutes: every convolutional model "
                       "(ResNet, RK-Net, ODE-Net, the control) 704 iterations at batch 128 (2 epochs "
                       "of 352 shuffled batches, 90,112 images seen); MLP 10 epochs; no augmentation; "
                       "SGD (Nesterov momentum) with a one-cycle learning rate peaking at 0.2; "
                       "two lanes of one-thread processes side by side (ODE-Net | RK-Net, ResNet, "
                       "control, MLP, memory)",
        "common": ["dataset=mnist", "dataset.augment=false", "optim=sgd_onecycle",
                   "trainer.threads=1"],
        "models": {
            "mlp": ["trainer.epochs=10"],
            "resnet": [*CONV_BUDGET, "trainer.channels_last=true"],
            "control": [*CONV_BUDGET, "trainer.channels_last=true"],
            "rknet": CONV_BUDGET,
            "odenet": CONV_BUDGET,
        },
        # Each lane runs its jobs one after another; lanes run side by side. "memory" is the
        # memory-scaling stage. Measured on the idle 2-core machine (results/README.md): one-thread
        # ODE-Net and RK-Net side by side train 0.243 + 0.380 it/s, one after another with 2 threads
        # 0.386 or 0.641 it/s, so the two lanes finish the profile about 10 minutes sooner.
        "lanes": [["odenet"], ["rknet", "resnet", "control", "mlp", "memory"]],
        "threads": 1,
        "targets": {"mlp": 1.9, "resnet": 0.55, "rknet": 0.7, "odenet": 0.7},
        "seeds": [0],
        "memory": {"batch": 128, "dataset": "mnist", "tols": [1e-1, 1e-3, 1e-5],
                   "rk4_steps": [1, 2, 4, 8], "blocks": [0, 2, 4, 6, 8, 12]},
        "sweep": {"tols": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5], "batch": 256},
    },
    "gpu": {
        "description": "one datacenter GPU in under 9 minutes: the paper recipe shortened to 12 "
                       "epochs (SGD 0.1 x batch/128, momentum 0.9, RandomCrop(28, padding=4), lr "
                       "x0.1 at epochs 5, 8 and 11: the 60/100/140 of 160 scaled), batch 128",
        "common": ["dataset=mnist", "optim=sgd", "trainer.epochs=12",
                   "optim.scheduler.milestones=[5,8,11]", "trainer.device=cuda"],
        "models": {m: [] for m in MODELS},
        "lanes": [["mlp", "resnet", "control", "rknet", "odenet", "memory"]],
        "threads": None,
        "targets": {"mlp": 1.9, "resnet": 0.55, "rknet": 0.7, "odenet": 0.7},
        "seeds": [0],
        "memory": {"batch": 128, "dataset": "mnist", "tols": [1e-1, 1e-2, 1e-3, 1e-4, 1e-5],
                   "rk4_steps": [1, 2, 4, 8, 16], "blocks": [0, 2, 4, 6, 8, 12, 16]},
        "sweep": {"tols": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5], "batch": 1000},
    },
    "paper": {
        "description": "paper recipe (torchdiffeq odenet_mnist.py): 160 epochs on 60k, SGD 0.1 "
                       "x batch/128, lr x0.1 at 60/100/140",
        "common": ["dataset=mnist", "optim=sgd", "trainer.epochs=160"],
        "models": {m: [] for m in MODELS},
        "lanes": [["mlp", "resnet", "control", "rknet", "odenet", "memory"]],
        "threads": None,
        "targets": {},
        "seeds": [0],
        "memory": {"batch": 128, "dataset": "mnist", "tols": [1e-1, 1e-2, 1e-3, 1e-4, 1e-5],
                   "rk4_steps": [1, 2, 4, 8, 16], "blocks": [0, 2, 4, 6, 8, 12, 16]},
        "sweep": {"tols": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5], "batch": 1000},
    },
    "tiny": {
        "description": "CI smoke budget: synthetic 28x28 data, 1 epoch of 2 batches, two lanes",
        "common": ["dataset=synthetic", "optim=sgd_onecycle", "trainer.epochs=1",
                   "trainer.max_batches=2", "trainer.batch_size=32", "trainer.threads=1"],
        "models": {m: [] for m in MODELS},
        "lanes": [["odenet"], ["rknet", "resnet", "control", "mlp", "memory"]],
        "threads": 1,
        "targets": {"mlp": 1.9, "resnet": 0.55, "rknet": 0.7, "odenet": 0.7},
        "seeds": [0],
        "memory": {"batch": 8, "dataset": "synthetic", "tols": [1e-1, 1e-3],
                   "rk4_steps": [1, 2], "blocks": [0, 2]},
        "sweep": {"tols": [1e-1, 1e-2, 1e-3], "batch": 16},
        "checks": {"batch": 2, "gradient_batch": 2},
    },
}


def _last_progress(log: Path) -> str:
    """The last progress-bar state (or line) a job wrote to its log, for the heartbeat."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, log.stat().st_size - 4096))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return "starting"
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-1][-110:] if parts else "starting"


def _job_args(profile: dict, name: str, seed: int, runs: Path, experiment: str,
              profile_name: str, results: Path) -> list[str]:
    if name in profile.get("stage_jobs", {}):  # a stage of another driver, as a lane job
        return profile["stage_jobs"][name]
    if name == "memory":
        return ["-m", "nodebench.experiments.mnist", "--profile", profile_name, "--runs", str(runs),
                "--results", str(results), "--stages", "memory",
                *(["--threads", str(profile["threads"])] if profile["threads"] else [])]
    return ["-m", "nodebench.cli", "train", f"model={profile.get('model', name)}", f"seed={seed}",
            f"group={experiment}", f"paths.runs={runs.parent}", *profile["common"],
            *profile["models"][name], *profile.get("set", []),
            f"hydra.run.dir={runs}/{name}_s{seed}"]


def run_lanes(profile: dict, profile_name: str, runs: Path, results: Path, experiment: str,
              models: tuple[str, ...] = MODELS, memory: bool = True,
              heartbeat_s: float = 60.0, everything: tuple[str, ...] = MODELS) -> dict:
    """Train the models (and the memory stage) in the profile's lanes: lanes side by side, the
    jobs of a lane one after another, each job a ``nodebench train`` subprocess whose output
    goes to ``<runs>/<job>.log``. Prints a progress line per lane every ``heartbeat_s`` seconds.

    A failed run is recorded in its summary.json and the lane goes on; a bad configuration
    (exit status 2) stops the reproduction. Returns the schedule record (lanes, wall time,
    1-minute load average at start, end and its maximum during the run).

    A job's name selects its overrides, ``profile["models"][name]``, and the model to train,
    ``profile["model"]`` when the profile has that key (every job the same model, e.g. the
    gradient-mode comparison), else the name itself. When ``models`` is ``everything`` (all the
    profile's jobs), previous runs in ``runs`` are removed first.
    """
    if runs.exists() and set(models) == set(everything):
        print(f"[reproduce] removing previous runs in {runs}")
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    lanes = []
    for lane in profile["lanes"]:
        stage_jobs = profile.get("stage_jobs", {})
        jobs = [(m, seed) for seed in profile["seeds"] for m in lane
                if (m == "memory" and memory) or m in models]
        jobs += [(m, 0) for m in lane if m in stage_jobs]  # once, after the lane's trainings
        if jobs:
            lanes.append(jobs)
    current: dict[int, tuple[str, Path]] = {}
    bad: list[str] = []
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            print(text, flush=True)
    started, load_start = time.time(), os.getloadavg()[0]

    def lane_worker(index: int, jobs: list[tuple[str, int]]) -> None:
        for name, seed in jobs:
            if bad:
                return
            stage = name == "memory" or name in profile.get("stage_jobs", {})
            tag = name if stage else f"{name}_s{seed}"
            old = runs / tag
            if not stage and old.exists():
                shutil.rmtree(old)
            log = runs / f"{tag}.log"
            args = _job_args(profile, name, seed, runs, experiment, profile_name, results)
            say(f"[reproduce] lane {index + 1}: {' '.join(args[2:])}  (log: {log})")
            current[index] = (tag, log)
            t0 = time.time()
            with open(log, "w") as fh:
                code = subprocess.call([sys.executable, *args], stdout=fh, stderr=subprocess.STDOUT)
            say(f"[reproduce] lane {index + 1}: {tag} finished (exit {code}) in "
                f"{time.time() - t0:.0f} s")
            if code == 2:
                bad.append(f"bad configuration for {tag} (see {log})")
            elif code != 0 and stage:
                bad.append(f"{name} stage failed (see {log})")
        current.pop(index, None)

    max_load = load_start
    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = [pool.submit(lane_worker, i, jobs) for i, jobs in enumerate(lanes)]
        while not all(f.done() for f in futures):
            for f in futures:
                try:
                    f.result(timeout=heartbeat_s / max(len(futures), 1))
                except TimeoutError:
                    pass
            max_load = max(max_load, os.getloadavg()[0])
            if not all(f.done() for f in futures):
                elapsed = (time.time() - started) / 60
                for index, (tag, log) in sorted(current.items()):
                    say(f"[reproduce] {elapsed:5.1f} min  lane {index + 1} {tag}: "
                        f"{_last_progress(log)}")
        for f in futures:
            f.result()
    if bad:
        raise SystemExit("; ".join(bad) + "; stopping")
    return {"lanes": [[m for m, _ in jobs] for jobs in lanes], "threads_per_job": profile["threads"],
            "train_wall_s": round(time.time() - started, 1), "cores": os.cpu_count(),
            "load_start": load_start, "load_max": round(max_load, 2),
            "load_end": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodebench.experiments.mnist",
                                description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--stages", default="train,memory,sweep,checks,report")
    p.add_argument("--models", default=",".join(MODELS),
                   help="models to (re)train in the train stage (default: all of Table 1 and the "
                        "control)")
    p.add_argument("--runs", default=None, help="run folder (default runs/mnist-<profile>)")
    p.add_argument("--results", default=None,
                   help="results folder (default results/mnist for cpu, results/mnist-<profile>)")
    p.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE",
                   help="Hydra overrides appended to every training job of the profile "
                        "(e.g. --set trainer.device=cpu trainer.max_batches=2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (the memory and sweep stages)")
    a = p.parse_args(argv)
    profile = dict(PROFILES[a.profile])
    profile["set"] = a.set
    if a.threads:
        torch.set_num_threads(a.threads)
    experiment, runs, results = folders("mnist", a.profile, a.runs, a.results)
    stages = split_list(a.stages)
    unknown = set(stages) - {"train", "memory", "sweep", "checks", "report"}
    if unknown:
        print(f"nodebench: error: unknown stage(s) {', '.join(sorted(unknown))}; choose from "
              "train, memory, sweep, checks, report", file=sys.stderr)
        return 2
    models = tuple(split_list(a.models))
    if set(models) - set(MODELS):
        print(f"nodebench: error: unknown model(s) in --models; choose from {', '.join(MODELS)}",
              file=sys.stderr)
        return 2
    started = time.time()
    results.mkdir(parents=True, exist_ok=True)
    schedule = None
    if "train" in stages:
        # The memory stage runs in a lane beside the training jobs when both are asked for.
        schedule = run_lanes(profile, a.profile, runs, results, experiment, models,
                             memory="memory" in stages)
    elif "memory" in stages:
        from ..memory import memory_scaling

        memory_scaling(results, **profile["memory"])
    if "sweep" in stages:
        from ..sweep import tolerance_sweep

        tolerance_sweep(runs / "odenet_s0", results, **profile["sweep"])
    if "checks" in stages:
        from ..checks import run_checks

        # solve validity and gradient error of the trained ODE models (issue 13; not timed);
        # the ODE-Net's validity also at every tolerance of the sweep
        for name in ("odenet", "rknet"):
            for seed in profile["seeds"]:
                run = runs / f"{name}_s{seed}"
                if (run / "model.pt").exists():
                    print(f"[reproduce] checks of {run}", flush=True)
                    run_checks(run, **profile.get("checks", {}),
                               tols=profile["sweep"]["tols"] if name == "odenet" else ())
    if schedule is not None and set(models) == set(MODELS):
        # What the table header states: wall time from start to table, the schedule, the load.
        schedule.update(profile=a.profile, wall_s=round(time.time() - started, 1),
                        load_end=os.getloadavg()[0])
        (results / "reproduce.json").write_text(json.dumps(schedule, indent=2) + "\n")
    if "report" in stages:
        from ..report import report_mnist

        report_mnist(runs, results, profile=a.profile, description=profile["description"],
                     targets=profile["targets"])
    print(f"[reproduce] done in {time.time() - started:.0f} s; results in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
