"""`make reproduce-anode`: Augmented Neural ODEs (Dupont, Doucet, Teh 2019), measured.

Stages (``--stages``, all by default, in this order):
  toys    g_1d, the annulus and the annulus with a held-out wedge: NODE, ANODE (p = 1, 2, 5) and a
          ResNet, trained with MSE, Adam 1e-3, batch 64, dopri5 1e-3; loss and NFE logged per
          iteration; one folder per run under <runs>/toys/
  images  NODE (92 filters) vs ANODE (64 filters + 5 channels) on MNIST (CIFAR-10 / SVHN in the
          paper profile), each run a standard ``nodebench.train.run`` directory under <runs>/images/
  report  tables (Markdown, CSV) and figures into the results folder, built only from run folders

Profiles: ``cpu`` (default; toys with fewer epochs/repeats, a small MNIST budget; under 60 min on
2 CPU cores), ``paper`` (50 epochs, 20 repeats for toys; 5 seeds, 20 epochs for images: for a
GPU), ``tiny`` (CI, seconds). ``--jobs N`` trains toy runs in N processes (one thread each).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from . import folders, measured_step, split_list

TOY_TASKS = {  # task -> readout and models (Dupont et al. 2019, Sections 3-4, Figures 1, 3, 7-9)
    "g_1d": {"readout": "first", "models": ["node", "anode1", "resnet"]},
    "annulus": {"readout": "linear", "models": ["node", "anode1", "anode2", "anode5", "resnet"]},
    "annulus_wedge": {"readout": "linear", "models": ["node", "anode5", "resnet"]},
}
# Overrides per image dataset and model: the paper's parameter-matched pairs (Section 5).
IMAGE_SETUPS = {
    "mnist": {"node_conv": ["dataset.augment=false"], "anode_conv": ["dataset.augment=false"]},
    "cifar10": {"node_conv": ["model.filters=125", "dataset.download=true"],
                "anode_conv": ["model.augment_dim=10", "dataset.download=true"]},
    "svhn": {"node_conv": ["model.filters=125", "dataset.download=true"],
             "anode_conv": ["model.augment_dim=10", "dataset.download=true"]},
    "cifar10_fake": {"node_conv": ["model.filters=125"], "anode_conv": ["model.augment_dim=10"]},
    "synthetic": {"node_conv": [], "anode_conv": []},
}
# Every image run: the authors' config (Adam 1e-3, batch 256, dopri5 1e-3, adjoint, 1000 steps).
IMAGE_COMMON = ["optim=adam", "trainer.batch_size=256", "solver.max_num_steps=1000",
                "trainer.instruments.memory=false", "trainer.progress=false",
                "trainer.save_model=false"]

PROFILES: dict[str, dict] = {
    "cpu": {
        "description": "CPU budget: toys 20 epochs (paper 50, authors' config 30), 3 repeats "
                       "(paper 20); MNIST 1 epoch on 960 training images at batch 32 (30 "
                       "iterations; at the paper's batch 256 this budget allows 4), tested "
                       "on 500 images, 2 seeds (paper: 5 seeds, full data)",
        "toys": {"epochs": 20, "repeats": 3, "tasks": TOY_TASKS, "data": {}},
        "images": {"datasets": ["mnist"], "seeds": [0, 1],
                   "overrides": ["trainer.epochs=1", "trainer.batch_size=32",
                                 "dataset.train_size=960", "dataset.test_size=500",
                                 "trainer.eval_batch_size=250", "trainer.threads=1"]},
    },
    "paper": {
        "description": "paper budget: toys 50 epochs, 20 repeats; images 20 epochs (the authors' "
                       "config), full datasets, 5 seeds",
        "toys": {"epochs": 50, "repeats": 20, "tasks": TOY_TASKS, "data": {}},
        "images": {"datasets": ["mnist", "cifar10", "svhn"], "seeds": [0, 1, 2, 3, 4],
                   "overrides": ["trainer.epochs=20"]},
    },
    "tiny": {
        "description": "CI smoke budget: toys on 60 points, 2 epochs, 2 repeats; synthetic "
                       "images, 2 batches of 8, 8 filters",
        "toys": {"epochs": 2, "repeats": 2, "tasks": TOY_TASKS,
                 "data": {"g_1d": {"num_points": 32},
                          "annulus": {"num_inner": 20, "num_outer": 40},
                          "annulus_wedge": {"num_inner": 20, "num_outer": 40}}},
        "images": {"datasets": ["synthetic"], "seeds": [0, 1],
                   "overrides": ["trainer.epochs=1", "trainer.max_batches=2",
                                 "trainer.batch_size=8", "dataset.train_size=16",
                                 "dataset.test_size=16", "model.filters=8"]},
    },
}
TOY_TRAINING = {"batch_size": 64, "lr": 1e-3, "loss": "mse", "gradient": "adjoint",
                "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "max_num_steps": 1000},
                "hidden": 32}
LOSSES = {"mse": torch.nn.MSELoss, "smooth_l1": torch.nn.SmoothL1Loss}

# -------------------------------------------------------------------------------------- toys


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def build_toy(task: str, model_name: str, seed: int, data_kwargs: dict | None = None,
              training: dict = TOY_TRAINING):
    """The toy data set and the model of ``fit_toy`` at initialisation: ``torch.manual_seed(seed)``,
    then the data (its own seed), then the model (``TOY_MODELS``) with the training's solver and
    gradient (a mode name or :class:`nodebench.solvers.Gradient`'s fields); the same weights as
    ``fit_toy`` starts from. Returns ``(data, model)``."""
    from ..solvers import Gradient, Solver
    from ..toys import TOY_DATASETS, TOY_MODELS

    torch.manual_seed(seed)
    data = TOY_DATASETS[task](seed=seed, **(data_kwargs or {}))
    solver = Solver(**training["solver"])
    grad = training["gradient"]
    grad = Gradient(**grad) if isinstance(grad, dict) else Gradient(grad)
    model = TOY_MODELS[model_name](data.dim, solver=solver, gradient=grad,
                                   hidden=training["hidden"], readout=TOY_TASKS[task]["readout"])
    return data, model


def fit_toy(task: str, model_name: str, seed: int, epochs: int, run_dir: Path,
            data_kwargs: dict | None = None, training: dict = TOY_TRAINING) -> dict:
    """Train one toy model; write history.csv (one row per iteration), features.pt, model.pt
    (final weights) and summary.json into ``run_dir``; return the summary.

    A numerical failure (max_num_steps exceeded, underflow in dt, non-finite loss) ends the run
    with ``status: failed``; its history up to that point is kept.
    """
    from ..errors import classify_solver_error
    from ..instruments import NFECounter, Stopwatch

    torch.set_num_threads(1)
    data, model = build_toy(task, model_name, seed, data_kwargs, training)
    loss_fn = LOSSES[training["loss"]]()
    optimizer = torch.optim.Adam(model.parameters(), lr=training["lr"])
    nfe = NFECounter(model)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    summary = {"task": task, "model": model_name, "seed": seed, "epochs": epochs,
               "train_size": int(data.x.shape[0]), "test_size": int(data.test_x.shape[0]),
               "params": sum(p.numel() for p in model.parameters()), "status": "running",
               "error": None, "training": training, "data_kwargs": data_kwargs or {}}
    started = time.perf_counter()
    clock = Stopwatch(torch.device("cpu"))
    try:
        for epoch in range(1, epochs + 1):
            for x, y in data.batches(training["batch_size"], gen):
                value, nf, nb = measured_step(lambda a, b: loss_fn(model(a), b), optimizer, nfe,
                                              f"iteration {len(history) + 1}", x, y)
                history.append({"iteration": len(history) + 1, "epoch": epoch,
                                "loss": value, "nfe_forward": nf,
                                "nfe_backward": nb, "seconds": clock.lap()})
        summary["status"] = "ok"
    except Exception as exc:
        reason = classify_solver_error(exc)
        if reason is None:
            raise
        summary.update(status="failed", error=reason, failed_at_iteration=len(history) + 1)
    summary["wall_time_s"] = time.perf_counter() - started
    summary["iterations"] = len(history)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(run_dir / "history.csv", history)
    if summary["status"] == "ok":
        summary.update(_evaluate_toy(model, data, loss_fn, nfe, run_dir))
        last = [h for h in history if h["epoch"] == epochs]
        first = [h for h in history if h["epoch"] == 1]
        summary["final_train_loss"] = sum(h["loss"] for h in last) / len(last)
        for key in ("nfe_forward", "nfe_backward"):
            summary[f"{key}_last_epoch"] = sum(h[key] for h in last) / len(last)
            summary[f"{key}_first_epoch"] = sum(h[key] for h in first) / len(first)
    nfe.remove()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _evaluate_toy(model, data, loss_fn, nfe, run_dir: Path) -> dict:
    """Loss and sign accuracy on the training and test sets; features h(1) and trajectories
    (21 times in [0, 1], or one state per ResNet block) saved to features.pt for the pictures."""
    model.eval()
    with torch.no_grad(), nfe.phase_("eval"):
        out = model(data.x)
        test_out = model(data.test_x)
        eval_nfe = nfe.take("eval") / 2
        feats = model.features(data.x)
        test_feats = model.features(data.test_x)
        keep = torch.randperm(data.x.shape[0], generator=torch.Generator().manual_seed(0))[:60]
        traj = model.trajectory(data.x[keep], torch.linspace(0.0, 1.0, 21))
        nfe.take("eval")
    torch.save({"x": data.x, "y": data.y, "features": feats, "test_x": data.test_x,
                "test_y": data.test_y, "test_features": test_feats, "traj_index": keep,
                "trajectory": traj}, run_dir / "features.pt")
    torch.save(model.state_dict(), run_dir / "model.pt")  # final weights (gradient checks)
    return {"train_loss": loss_fn(out, data.y).item(),
            "train_accuracy": (torch.sign(out) == data.y).float().mean().item(),
            "test_loss": loss_fn(test_out, data.test_y).item(),
            "test_accuracy": (torch.sign(test_out) == data.test_y).float().mean().item(),
            "nfe_eval": eval_nfe}


def _toy_job(args: tuple) -> dict:
    task, model, seed, epochs, run_dir, data_kwargs = args
    s = fit_toy(task, model, seed, epochs, Path(run_dir), data_kwargs)
    print(f"[toys] {task:14s} {model:7s} s{seed}: {s['status']:6s} "
          f"loss {s.get('final_train_loss', float('nan')):.4f} "
          f"acc {s.get('train_accuracy', float('nan')):.3f} "
          f"test {s.get('test_accuracy', float('nan')):.3f} "
          f"NFE {s.get('nfe_forward_last_epoch', float('nan')):.1f}/"
          f"{s.get('nfe_backward_last_epoch', float('nan')):.1f} "
          f"{s['wall_time_s']:.0f} s", flush=True)
    return s


def stage_toys(profile: dict, runs: Path, jobs: int, seeds: list[int] | None = None) -> None:
    """Every task x model x repeat; repeats use seeds 0..R-1 (data sample and initialisation).

    ``seeds``: only these repeats, keeping the other run folders (to spread one profile's
    repeats over several processes); by default all, into a fresh folder.
    """
    spec = profile["toys"]
    out = runs / "toys"
    if out.exists() and seeds is None:
        shutil.rmtree(out)
    work = [(task, model, seed, spec["epochs"], str(out / f"{task}_{model}_s{seed}"),
             spec["data"].get(task, {}))
            for seed in (seeds if seeds is not None else range(spec["repeats"]))
            for task, t in spec["tasks"].items() for model in t["models"]]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            list(pool.map(_toy_job, work))
    else:
        for w in work:
            _toy_job(w)


# ------------------------------------------------------------------------------------ images


def image_overrides(dataset: str, model: str, seed: int, profile: dict, experiment: str) -> list:
    """The Hydra overrides of one image run (composed with nodebench.config.compose)."""
    return [f"model={model}", f"dataset={dataset}", f"seed={seed}", f"group={experiment}",
            *IMAGE_COMMON, *IMAGE_SETUPS[dataset][model], *profile["images"]["overrides"]]


def stage_images(profile: dict, runs: Path, experiment: str) -> None:
    """One ``nodebench.train.run`` per dataset, seed and model; failed runs are recorded."""
    from .. import config as C
    from ..train import run

    out = runs / "images"
    if out.exists():
        shutil.rmtree(out)
    spec = profile["images"]
    for dataset in spec["datasets"]:
        for seed in spec["seeds"]:
            for model in ("node_conv", "anode_conv"):
                overrides = image_overrides(dataset, model, seed, profile, experiment)
                print(f"[images] {' '.join(overrides)}", flush=True)
                s = run(C.compose(overrides), out / f"{dataset}_{model}_s{seed}")
                print(f"[images] {dataset} {model} s{seed}: {s['status']} test error "
                      f"{s['test_error']}% NFE {s['nfe_forward']}/{s['nfe_backward']} "
                      f"{s['wall_time_s']:.0f} s", flush=True)


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodebench.experiments.anode",
                                description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--stages", default="toys,images,report")
    p.add_argument("--jobs", type=int, default=1, help="processes for the toy runs")
    p.add_argument("--runs", default=None, help="run folder (default runs/anode-<profile>)")
    p.add_argument("--seeds", default=None,
                   help="toy repeats to run, e.g. 2 or 0,1 (default: all; others are kept)")
    p.add_argument("--note", default="",
                   help="a sentence appended to every table header (e.g. a budget cut)")
    p.add_argument("--results", default=None,
                   help="results folder (default results/anode for cpu, results/anode-<profile>)")
    a = p.parse_args(argv)
    profile = PROFILES[a.profile]
    experiment, runs, results = folders("anode", a.profile, a.runs, a.results)
    stages = split_list(a.stages)
    unknown = set(stages) - {"toys", "images", "report"}
    if unknown:
        print(f"error: unknown stage(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    started = time.time()
    if "toys" in stages:
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else None
        stage_toys(profile, runs, a.jobs, seeds)
        if seeds is None:
            (runs / "toys" / "stage_time_s.txt").write_text(f"{time.time() - started:.0f}\n")
    if "images" in stages:
        t0 = time.time()
        stage_images(profile, runs, experiment)
        (runs / "images" / "stage_time_s.txt").write_text(f"{time.time() - t0:.0f}\n")
    if "report" in stages:
        from .anode_report import report

        description = profile["description"] + (f". {a.note}" if a.note else "")
        report(runs, results, profile=a.profile, description=description)
    print(f"[reproduce] done in {time.time() - started:.0f} s; results in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
