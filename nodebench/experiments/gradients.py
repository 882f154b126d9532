"""`make reproduce-gradients`: every gradient mode on one model, side by side (issue 14).

The six ways nodebench differentiates through an ODE solve (``model.gradient``: ``direct``,
``adjoint``, ``adjoint`` with ``adjoint=seminorm``, ``checkpointed``, ``aca``, ``mali``;
:mod:`nodebench.gradients`, reference.md section 6) on the Table-1 ODE-Net on MNIST and on
ANODE's 2-D annulus (Dupont et al. 2019, Section 3), with the same data, seeds, optimiser and
tolerance (dopri5, rtol = atol = 1e-3; MALI its own ALF integrator at the same tolerance).

Stages (``--stages``, all by default, in this order):
  train      one ``nodebench train model=odenet`` per mode (MNIST), in the profile's lanes; each
             run measures its gradient error at initialisation and at the end against a float64
             dopri5 1e-9 direct-backprop reference (``trainer.instruments.gradient_error``)
  toys       the annulus NODE per mode and seed (``fit_toy``), with the same gradient checks
  tolerance  gradient error against the solver tolerance at initialisation, every mode, for
             the MNIST ODE-Net and the annulus NODE (one fixed batch each)
  report     tables (Markdown, CSV) and figures into the results folder

In the ``cpu`` profile the toys and tolerance stages are jobs of the lanes, beside the MNIST
runs. Profiles: ``cpu`` (under 60 minutes on 2 idle CPU cores), ``tiny`` (synthetic data, CI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import folders, split_list

#: mode name -> Hydra overrides of ``nodebench train`` (the seminorm adjoint is the adjoint mode
#: with the ``adjoint=seminorm`` settings group).
MODES: dict[str, list[str]] = {
    "direct": ["model.gradient=direct"],
    "adjoint": ["model.gradient=adjoint"],
    "seminorm": ["model.gradient=adjoint", "adjoint=seminorm"],
    "checkpointed": ["model.gradient=checkpointed"],
    "aca": ["model.gradient=aca"],
    "mali": ["model.gradient=mali"],
}
#: mode name -> :class:`nodebench.solvers.Gradient` fields (the toys and the tolerance stage)
GRADIENTS: dict[str, dict] = {
    "direct": {"mode": "direct"}, "adjoint": {"mode": "adjoint"},
    "seminorm": {"mode": "adjoint", "norm": "seminorm"},
    "checkpointed": {"mode": "checkpointed"}, "aca": {"mode": "aca"}, "mali": {"mode": "mali"},
}
STAGE_JOBS = ("toys", "tolerance")  # lane jobs that are stages of this driver, not trainings

# What the literature says about each mode (reference.md section 6), beside the measurements.
CLAIMS = {
    "direct": "exact gradient of the discrete solve; memory O(NFE x activations) (Chen 2018)",
    "adjoint": "O(1) memory; backsolve reconstructs the state, so its gradient is inexact "
               "(Gholami 2019: 47.37 % vs 77.30 % CIFAR-10 accuracy against checkpointed)",
    "seminorm": "same gradient as the adjoint with up to 62 % fewer backward NFE (Kidger 2021)",
    "checkpointed": "exact discrete gradient, memory O(steps x state) (diffrax's default)",
    "aca": "exact discrete gradient; CIFAR-10 ODE-ResNet18 about 5 % error vs 10 % for adjoint "
           "(Zhuang 2020)",
    "mali": "exact discrete gradient of a reversible integrator at O(state) memory (Zhuang 2021)",
}

_CPU_MNIST = ["dataset=mnist", "dataset.augment=false", "dataset.test_size=2000",
              "optim=sgd_onecycle", "trainer.threads=1", "trainer.epochs=5",
              "trainer.max_batches=40", "trainer.eval_batch_size=500",
              "trainer.instruments.gradient_error=true",
              "trainer.instruments.gradient_error_batch=8"]

PROFILES: dict[str, dict] = {
    "cpu": {
        "description": "CPU budget for 2 idle cores in under 60 minutes: the Table-1 ODE-Net on "
                       "MNIST, 200 iterations at batch 128 per mode (5 rounds of 40 shuffled "
                       "batches, a test evaluation on 2,000 test images after each), SGD Nesterov "
                       "one-cycle (peak 0.2), no augmentation, dopri5 1e-3, one seed; gradient "
                       "error on 8 test images at initialisation and at the end; the annulus "
                       "NODE 6 epochs (282 iterations at batch 64) x 2 seeds; two lanes of one-thread processes",
        "model": "odenet",
        "common": _CPU_MNIST,
        "models": MODES,
        "lanes": [["mali", "seminorm", "toys"],
                  ["adjoint", "checkpointed", "aca", "direct", "tolerance"]],
        "threads": 1,
        "seeds": [0],
        "toys": {"task": "annulus", "model": "node", "epochs": 6, "seeds": [0, 1],
                 "data": {}, "check_batch": 64},
        "tolerance": {"tols": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6], "mnist_batch": 8,
                      "toy_batch": 64, "dataset": "mnist"},
    },
    "tiny": {
        "description": "CI smoke budget: synthetic 28x28 data, 2 rounds of 2 batches of 16",
        "model": "odenet",
        "common": ["dataset=synthetic", "optim=sgd_onecycle", "trainer.epochs=2",
                   "trainer.max_batches=2", "trainer.batch_size=16", "trainer.threads=1",
                   "trainer.instruments.gradient_error=true",
                   "trainer.instruments.gradient_error_batch=2",
                   "trainer.instruments.validity_batch=2"],
        "models": MODES,
        "lanes": [["mali", "seminorm", "toys"],
                  ["adjoint", "checkpointed", "aca", "direct", "tolerance"]],
        "threads": 1,
        "seeds": [0],
        "toys": {"task": "annulus", "model": "node", "epochs": 1, "seeds": [0],
                 "data": {"num_inner": 40, "num_outer": 80}, "check_batch": 8},
        "tolerance": {"tols": [1e-2, 1e-4], "mnist_batch": 2, "toy_batch": 8,
                      "dataset": "synthetic"},
    },
}


def _toy_training(mode: str) -> dict:
    from .toy_fit import TOY_TRAINING

    return {**TOY_TRAINING, "gradient": GRADIENTS[mode]}


def _gradient_at(model, x, y, loss_fn) -> dict:
    from ..validity import gradient_error

    watch = time.perf_counter()
    found = gradient_error(model, x, y, loss_fn=loss_fn)
    return {**found, "time_s": time.perf_counter() - watch}


def stage_toys(profile: dict, runs: Path) -> None:
    """The annulus NODE (ANODE's toy) trained once per mode and seed with ``fit_toy``, then its
    gradient error against the float64 1e-9 reference at initialisation (the same weights
    rebuilt from the seed) and at the end (``model.pt``) on the first ``check_batch`` test
    points; added to each run's summary.json as ``grad_rel_error_init`` / ``_final``."""
    from .toy_fit import build_toy, fit_toy

    spec = profile["toys"]
    loss_fn = torch.nn.MSELoss()
    for mode in MODES:
        for seed in spec["seeds"]:
            run_dir = runs / "toys" / f"{spec['task']}_{spec['model']}_{mode}_s{seed}"
            training = _toy_training(mode)
            t0 = time.time()
            summary = fit_toy(spec["task"], spec["model"], seed, spec["epochs"], run_dir,
                              spec["data"], training)
            data, model = build_toy(spec["task"], spec["model"], seed, spec["data"], training)
            n = spec["check_batch"]
            x, y = data.test_x[:n], data.test_y[:n]
            checks = {"mode": mode, "grad_init": _gradient_at(model, x, y, loss_fn)}
            if summary["status"] == "ok":
                model.load_state_dict(torch.load(run_dir / "model.pt"))
                checks["grad_final"] = _gradient_at(model, x, y, loss_fn)
            for when in ("init", "final"):
                found = checks.get(f"grad_{when}") or {}
                summary[f"grad_rel_error_{when}"] = found.get("rel_error")
                summary[f"grad_cosine_{when}"] = found.get("cosine")
            summary["mode"] = mode
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str)
                                                  + "\n")
            print(f"[toys] {mode:12s} s{seed}: {summary['status']} loss "
                  f"{summary.get('final_train_loss', math.nan):.4f} test acc "
                  f"{summary.get('test_accuracy', math.nan):.3f} grad err init "
                  f"{_num(summary['grad_rel_error_init'])} final "
                  f"{_num(summary['grad_rel_error_final'])} ({time.time() - t0:.0f} s)",
                  flush=True)


def _num(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def _mnist_model(dataset: str, seed: int = 0):
    """The Table-1 ODE-Net as ``nodebench train model=odenet`` builds it, initialised from
    ``seed``, and the first test images of ``dataset`` (mnist or synthetic)."""
    from .. import config as C

    cfg = C.compose(["model=odenet", f"dataset={dataset}", "dataset.augment=false"])
    data = C._call(cfg.dataset, "dataset")
    torch.manual_seed(seed)
    shape = cfg.dataset.shape
    return C.build_model(cfg, shape.channels, shape.size, shape.classes), data


def stage_tolerance(profile: dict, results: Path) -> None:
    """Gradient error against the tolerance at initialisation: for each mode and rtol = atol in
    the profile's list, the ODE blocks' solver is dopri5 at that tolerance (MALI: its ALF at that
    tolerance) and the parameter gradient on one fixed batch is compared with one float64 dopri5
    1e-9 direct-backprop reference of the same weights. Writes ``tolerance.csv`` (columns:
    model, mode, tol, rel_error, cosine, nfe_forward, nfe_backward, seconds, failure)."""
    import pandas as pd

    from ..instruments import NFECounter
    from ..solvers import Gradient, Solver
    from ..validity import _flat_grad, ode_blocks, reference_model
    from .toy_fit import build_toy

    spec = profile["tolerance"]
    model, data = _mnist_model(spec["dataset"])
    x, y = next(iter(data.test_batches(spec["mnist_batch"])))
    cases = [("odenet (MNIST)", model, x, y, torch.nn.functional.cross_entropy)]
    toy_spec = profile["toys"]
    toy_data, toy = build_toy(toy_spec["task"], toy_spec["model"], 0, toy_spec["data"],
                              _toy_training("adjoint"))
    n = spec["toy_batch"]
    cases.append((f"{toy_spec['model']} ({toy_spec['task']})", toy, toy_data.test_x[:n],
                  toy_data.test_y[:n], torch.nn.MSELoss()))
    rows = []
    for name, net, xb, yb, loss_fn in cases:
        params = [p for p in net.parameters() if p.requires_grad]
        watch = time.perf_counter()
        ref = reference_model(net)
        ref_params = [p for p in ref.parameters() if p.requires_grad]
        g_ref = _flat_grad(torch.autograd.grad(loss_fn(ref(xb.double()), yb), ref_params,
                                               allow_unused=True), ref_params)
        print(f"[tolerance] {name}: float64 1e-9 reference in {time.perf_counter() - watch:.0f} s",
              flush=True)
        nfe = NFECounter(net)
        for mode in MODES:
            for tol in spec["tols"]:
                for block in ode_blocks(net):
                    block.solver = Solver(method="dopri5", rtol=tol, atol=tol,
                                          max_num_steps=100_000)
                    block.gradient = Gradient(**GRADIENTS[mode])
                row = {"model": name, "mode": mode, "tol": tol, "rel_error": None,
                       "cosine": None, "nfe_forward": None, "nfe_backward": None,
                       "failure": None}
                watch = time.perf_counter()
                try:
                    with nfe.phase_("forward"):
                        loss = loss_fn(net(xb), yb)
                    with nfe.phase_("backward"):
                        g = _flat_grad(torch.autograd.grad(loss, params, allow_unused=True),
                                       params)
                    norm_ref = torch.linalg.vector_norm(g_ref).item()
                    row.update(
                        rel_error=torch.linalg.vector_norm(g - g_ref).item() / norm_ref,
                        cosine=(torch.dot(g, g_ref) / (torch.linalg.vector_norm(g) * norm_ref)
                                ).item(),
                        nfe_forward=nfe.take("forward"), nfe_backward=nfe.take("backward"))
                except (AssertionError, RuntimeError) as exc:
                    row["failure"] = str(exc).splitlines()[0][:120]
                    nfe.take("forward"), nfe.take("backward")
                row["seconds"] = time.perf_counter() - watch
                rows.append(row)
                print(f"[tolerance] {name} {mode:12s} tol {tol:.0e}: rel error "
                      f"{_num(row['rel_error'])} NFE {row['nfe_forward']}/{row['nfe_backward']} "
                      f"({row['seconds']:.1f} s)", flush=True)
        nfe.remove()
    results.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(results / "tolerance.csv", index=False)


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


def _job_args(profile: dict, name: str, seed: int, runs: Path, experiment: str) -> list[str]:
    """A lane job's command: a stage of this driver, or ``nodebench train`` of one mode."""
    if name in profile["stage_jobs"]:
        return profile["stage_jobs"][name]
    return ["-m", "nodebench.cli", "train", f"model={profile['model']}", f"seed={seed}",
            f"group={experiment}", f"paths.runs={runs.parent}", *profile["common"],
            *profile["models"][name], f"hydra.run.dir={runs}/{name}_s{seed}"]


def run_lanes(profile: dict, runs: Path, experiment: str, heartbeat_s: float = 60.0) -> dict:
    """Run the profile's lanes side by side, the jobs of a lane one after another, each job a
    subprocess (one ``nodebench train`` per mode, or a stage of this driver, once, after the
    lane's trainings) whose output goes to ``<runs>/<job>.log``; previous runs in ``runs`` are
    removed first. Prints a progress line per lane every ``heartbeat_s`` seconds. A failed run is
    recorded in its summary.json and its lane goes on; a bad configuration (exit status 2) or a
    failed stage stops the reproduction (SystemExit). Returns the schedule record (lanes, wall
    time, 1-minute load average at the start, its maximum during the run)."""
    import shutil
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor, TimeoutError

    if runs.exists():
        print(f"[reproduce] removing previous runs in {runs}")
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    stage_jobs = profile["stage_jobs"]
    lanes = []
    for lane in profile["lanes"]:
        jobs = [(m, seed) for seed in profile["seeds"] for m in lane if m in profile["models"]]
        jobs += [(m, 0) for m in lane if m in stage_jobs]
        if jobs:
            lanes.append(jobs)
    current: dict[int, tuple[str, Path]] = {}
    bad: list[str] = []
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            print(text, flush=True)
    from ..reproduce import LoadClock

    clock = LoadClock()

    def lane_worker(index: int, jobs: list[tuple[str, int]]) -> None:
        for name, seed in jobs:
            if bad:
                return
            stage = name in stage_jobs
            tag = name if stage else f"{name}_s{seed}"
            log = runs / f"{tag}.log"
            args = _job_args(profile, name, seed, runs, experiment)
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

    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = [pool.submit(lane_worker, i, jobs) for i, jobs in enumerate(lanes)]
        while not all(f.done() for f in futures):
            for f in futures:
                try:
                    f.result(timeout=heartbeat_s / max(len(futures), 1))
                except TimeoutError:
                    pass
            if not all(f.done() for f in futures):
                elapsed = clock.elapsed() / 60
                for index, (tag, log) in sorted(current.items()):
                    say(f"[reproduce] {elapsed:5.1f} min  lane {index + 1} {tag}: "
                        f"{_last_progress(log)}")
        for f in futures:
            f.result()
    clock.stop()
    if bad:
        raise SystemExit("; ".join(bad) + "; stopping")
    return {"lanes": [[m for m, _ in jobs] for jobs in lanes], "threads_per_job": profile["threads"],
            "train_wall_s": round(clock.elapsed(), 1), "cores": os.cpu_count(),
            "load_start": clock.load_start, "load_max": round(clock.load_max, 2),
            "load_end": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodebench.experiments.gradients",
                                description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--stages", default="train,toys,tolerance,report")
    p.add_argument("--runs", default=None, help="run folder (default runs/gradients-<profile>)")
    p.add_argument("--results", default=None,
                   help="results folder (default results/gradients for cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    a = p.parse_args(argv)
    profile = dict(PROFILES[a.profile])
    experiment, runs, results = folders("gradients", a.profile, a.runs, a.results)
    stages = split_list(a.stages)
    unknown = set(stages) - {"train", "toys", "tolerance", "report"}
    if unknown:
        print(f"nodebench: error: unknown stage(s) {', '.join(sorted(unknown))}; choose from "
              "train, toys, tolerance, report", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    started = time.time()
    results.mkdir(parents=True, exist_ok=True)
    if "train" in stages:
        # the toys and tolerance stages run as jobs of the lanes (subprocesses of this driver)
        jobs = {name: _stage_job(name, a.profile, runs, results, profile["threads"])
                for name in STAGE_JOBS if name in stages}
        schedule = run_lanes({**profile, "stage_jobs": jobs}, runs, experiment)
        schedule.update(profile=a.profile, wall_s=round(time.time() - started, 1),
                        load_end=os.getloadavg()[0])
        (results / "reproduce.json").write_text(json.dumps(schedule, indent=2) + "\n")
    else:
        if "toys" in stages:
            stage_toys(profile, runs)
        if "tolerance" in stages:
            stage_tolerance(profile, results)
    if "report" in stages:
        from .gradients_report import report

        report(runs, results, a.profile, profile["description"])
    print(f"[reproduce] done in {time.time() - started:.0f} s; results in {results}/")
    return 0


def _stage_job(name: str, profile_name: str, runs: Path, results: Path,
               threads: int | None) -> list[str]:
    return ["-m", "nodebench.experiments.gradients", "--profile", profile_name, "--runs",
            str(runs), "--results", str(results), "--stages", name,
            *(["--threads", str(threads)] if threads else [])]


if __name__ == "__main__":
    sys.exit(main())
