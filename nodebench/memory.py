"""Activation memory against NFE and depth: Table 1's memory column made concrete.

Chen et al. 2018 (Table 1) claim O(L) memory for a ResNet of L blocks, O(L~) for RK-Net (L~ the
number of function evaluations of the forward solve) and O(1) for ODE-Net (adjoint). This module
measures, for one training step of a freshly initialised model on one batch, the bytes autograd
saves for backward (:class:`nodebench.instruments.ActivationMeter`):
RK-Net and ODE-Net while the forward NFE grows (dopri5 tolerance sweep, rk4 step counts), and
ResNet while the number of blocks grows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import config as C
from .instruments import activation_mib


def _batch(dataset: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = C.compose([f"dataset={dataset}"])
    if dataset == "synthetic":
        from .data import synthetic
        data = synthetic(train_size=batch, test_size=batch)
    else:
        from .data import mnist
        data = mnist(root=cfg.dataset.root, test_size=batch)
    return data.test_x[:batch].float() / 255.0, data.test_y[:batch]


def _measure(overrides: list[str], x: torch.Tensor, y: torch.Tensor) -> dict:
    cfg = C.compose(overrides)
    torch.manual_seed(0)
    model = C.build_model(cfg, 1, x.shape[-1], 10)
    return activation_mib(model, x, y)


def memory_scaling(results: Path, batch: int = 128, dataset: str = "mnist",
                   tols: tuple = (1e-1, 1e-3, 1e-5), rk4_steps: tuple = (1, 2, 4, 8),
                   blocks: tuple = (0, 2, 4, 6)) -> pd.DataFrame:
    """Measure and write ``memory.csv`` and ``memory.png`` into ``results``; return the table."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    x, y = _batch(dataset, batch)
    rows = []
    for model, grad in (("rknet", "direct"), ("odenet", "adjoint")):
        for tol in tols:
            m = _measure([f"model={model}", "solver=dopri5", f"solver.rtol={tol}",
                          f"solver.atol={tol}"], x, y)
            rows.append(dict(model=model, gradient=grad, setting=f"dopri5 tol={tol:g}",
                             sweep="nfe", blocks=None, **m))
            print(f"[memory] {model} dopri5 tol={tol:g}: {m['activation_mib']:.1f} MiB, "
                  f"NFE {m['nfe_forward']}/{m['nfe_backward']}", flush=True)
        for n in rk4_steps:
            m = _measure([f"model={model}", "solver=rk4", f"solver.step_size={1.0 / n}"], x, y)
            rows.append(dict(model=model, gradient=grad, setting=f"rk4 {n} steps", sweep="nfe",
                             blocks=None, **m))
            print(f"[memory] {model} rk4 {n} steps: {m['activation_mib']:.1f} MiB, "
                  f"NFE {m['nfe_forward']}/{m['nfe_backward']}", flush=True)
    for b in blocks:
        m = _measure(["model=resnet", f"model.blocks={b}"], x, y)
        rows.append(dict(model="resnet", gradient="direct", setting=f"{b} blocks", sweep="depth",
                         blocks=b, **m))
        print(f"[memory] resnet {b} blocks: {m['activation_mib']:.1f} MiB", flush=True)
    df = pd.DataFrame(rows)
    df["batch"] = batch
    df["dataset"] = dataset
    df.to_csv(results / "memory_data.csv", index=False, float_format="%.4f")
    plot_memory(df, results / "memory.png")
    return df


def slopes(df: pd.DataFrame) -> dict[str, float]:
    """Least-squares slope of activation MiB per forward NFE (RK-Net, ODE-Net) or per block."""
    out = {}
    for model in ("rknet", "odenet"):
        d = df[(df.model == model) & (df.sweep == "nfe")]
        if len(d) >= 2 and d.nfe_forward.nunique() > 1:
            out[model] = float(np.polyfit(d.nfe_forward, d.activation_mib, 1)[0])
    d = df[df.sweep == "depth"]
    if len(d) >= 2:
        out["resnet"] = float(np.polyfit(d.blocks.astype(float), d.activation_mib, 1)[0])
    return out


def plot_memory(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for model, marker, label in (("rknet", "o", "RK-Net (direct backprop)"),
                                 ("odenet", "s", "ODE-Net (adjoint)")):
        d = df[(df.model == model) & (df.sweep == "nfe")].sort_values("nfe_forward")
        a.plot(d.nfe_forward, d.activation_mib, marker=marker, label=label)
    a.set_xlabel("forward NFE (L~)")
    a.set_ylabel("saved activations (MiB)")
    a.set_title("ODE block: memory vs NFE")
    a.legend()
    a.grid(alpha=0.3)
    d = df[df.sweep == "depth"].sort_values("blocks")
    b.plot(d.blocks, d.activation_mib, marker="^", color="C2", label="ResNet")
    b.set_xlabel("ResNet blocks (L)")
    b.set_ylabel("saved activations (MiB)")
    b.set_title("ResNet: memory vs depth")
    b.legend()
    b.grid(alpha=0.3)
    batch = int(df.batch.iloc[0])
    fig.suptitle(f"Bytes autograd saves for one training step (batch {batch}, at initialisation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nodebench memory", description=__doc__.split("\n")[0])
    p.add_argument("--results", default="results/memory")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "synthetic"])
    p.add_argument("--tols", type=float, nargs="+", default=[1e-1, 1e-3, 1e-5])
    p.add_argument("--rk4-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    a = p.parse_args(argv)
    df = memory_scaling(Path(a.results), a.batch, a.dataset, a.tols, a.rk4_steps, a.blocks)
    print(df.to_string(index=False))
    print("slopes (MiB per NFE / per block):", slopes(df))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
