"""`make reproduce-mnist`: Table 1 and Figure 3 of Chen et al. 2018, measured.

Stages (``--stages``, all by default, in this order):
  train   one ``nodebench train`` per model of Table 1, with the profile's budget
  memory  activation memory vs NFE (RK-Net, ODE-Net) and vs depth (ResNet)
  sweep   tolerance sweep of the trained ODE-Net: error and forward time vs NFE (Fig. 3a, 3b)
  report  tables (Markdown, CSV, LaTeX) and figures into the results folder

Profiles: ``cpu`` (default; under 60 min on 2 CPU cores), ``paper`` (160 epochs, the full
recipe: for a GPU), ``tiny`` (synthetic data, seconds: CI).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import folders, split_list

MODELS = ("mlp", "resnet", "rknet", "odenet")

PROFILES: dict[str, dict] = {
    "cpu": {
        "description": "CPU budget: MLP 10 epochs (no augmentation); ResNet 2 epochs on 60k; "
                       "RK-Net and ODE-Net 1 epoch on 30k images at batch 32 (937 iterations; at batch 128 the "
                       "234 iterations left RK-Net at 5.95% test error with SGD, 6.84% with Adam); "
                       "SGD (lr 0.1 x batch/128, momentum 0.9) with a per-step cosine decay",
        "common": ["dataset=mnist", "optim=sgd_cosine", "trainer.progress=true"],
        "models": {
            "mlp": ["trainer.epochs=10", "dataset.augment=false"],
            "resnet": ["trainer.epochs=2"],
            "rknet": ["trainer.epochs=1", "dataset.train_size=30000", "trainer.batch_size=32"],
            "odenet": ["trainer.epochs=1", "dataset.train_size=30000", "trainer.batch_size=32"],
        },
        "seeds": [0],
        "memory": {"batch": 128, "dataset": "mnist", "tols": [1e-1, 1e-3, 1e-5],
                   "rk4_steps": [1, 2, 4, 8], "blocks": [0, 2, 4, 6, 8, 12]},
        "sweep": {"tols": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5], "batch": 256},
    },
    "paper": {
        "description": "paper recipe (torchdiffeq odenet_mnist.py): 160 epochs on 60k, SGD 0.1 "
                       "x batch/128, lr x0.1 at 60/100/140",
        "common": ["dataset=mnist", "optim=sgd", "trainer.epochs=160", "trainer.progress=true"],
        "models": {m: [] for m in MODELS},
        "seeds": [0],
        "memory": {"batch": 128, "dataset": "mnist", "tols": [1e-1, 1e-2, 1e-3, 1e-4, 1e-5],
                   "rk4_steps": [1, 2, 4, 8, 16], "blocks": [0, 2, 4, 6, 8, 12, 16]},
        "sweep": {"tols": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5], "batch": 1000},
    },
    "tiny": {
        "description": "CI smoke budget: synthetic 28x28 data, 1 epoch of 2 batches",
        "common": ["dataset=synthetic", "optim=sgd_cosine", "trainer.epochs=1",
                   "trainer.max_batches=2", "trainer.batch_size=32", "trainer.progress=false"],
        "models": {m: [] for m in MODELS},
        "seeds": [0],
        "memory": {"batch": 8, "dataset": "synthetic", "tols": [1e-1, 1e-3],
                   "rk4_steps": [1, 2], "blocks": [0, 2]},
        "sweep": {"tols": [1e-1, 1e-2, 1e-3], "batch": 16},
    },
}


def _nodebench(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "nodebench.cli", *args])


def stage_train(profile: dict, runs: Path, experiment: str,
                models: tuple[str, ...] = MODELS) -> None:
    """One run per model and seed; a failed run is recorded and the next one still runs.

    Previous runs of the trained models are removed first (all runs when every model is trained).
    """
    if runs.exists() and set(models) == set(MODELS):
        print(f"[reproduce] removing previous runs in {runs}")
        shutil.rmtree(runs)
    for seed in profile["seeds"]:
        for model in models:
            old = runs / f"{model}_s{seed}"
            if old.exists():
                shutil.rmtree(old)
            args = ["train", f"model={model}", f"seed={seed}", f"experiment={experiment}",
                    f"paths.runs={runs.parent}", *profile["common"], *profile["models"][model],
                    f"hydra.run.dir={runs}/{model}_s{seed}"]
            print(f"[reproduce] nodebench {' '.join(args)}", flush=True)
            code = _nodebench(*args)
            if code == 2:
                raise SystemExit(f"bad configuration for {model}; stopping")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodebench.experiments.mnist",
                                description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument("--stages", default="train,memory,sweep,report")
    p.add_argument("--models", default=",".join(MODELS),
                   help="models to (re)train in the train stage (default: all of Table 1)")
    p.add_argument("--runs", default=None, help="run folder (default runs/mnist-<profile>)")
    p.add_argument("--results", default=None,
                   help="results folder (default results/mnist for cpu, results/mnist-<profile>)")
    a = p.parse_args(argv)
    profile = PROFILES[a.profile]
    experiment, runs, results = folders("mnist", a.profile, a.runs, a.results)
    stages = split_list(a.stages)
    unknown = set(stages) - {"train", "memory", "sweep", "report"}
    if unknown:
        print(f"error: unknown stage(s) {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    started = time.time()
    results.mkdir(parents=True, exist_ok=True)
    if "train" in stages:
        models = tuple(split_list(a.models))
        if set(models) - set(MODELS):
            print(f"error: unknown model(s) in --models; choose from {', '.join(MODELS)}",
                  file=sys.stderr)
            return 2
        stage_train(profile, runs, experiment, models)
    if "memory" in stages:
        from ..memory import memory_scaling

        memory_scaling(results, **profile["memory"])
    if "sweep" in stages:
        from ..sweep import tolerance_sweep

        tolerance_sweep(runs / "odenet_s0", results, **profile["sweep"])
    if "report" in stages:
        from ..report import report_mnist

        report_mnist(runs, results, profile=a.profile, description=profile["description"])
    print(f"[reproduce] done in {time.time() - started:.0f} s; results in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
