"""Tolerance sweep of a trained ODE-Net: Figure 3a and 3b of Chen et al. 2018.

(a) the numerical error of the ODE block's output is controlled by the tolerance (error against
forward NFE as rtol = atol varies); (b) forward time is proportional to forward NFE. Also records
the backward NFE of one adjoint backward pass at each tolerance (Figure 3c's ratio) and the test
error of the batch. The reference solution is dopri5 at rtol = atol = 1e-8 (float64).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from . import config as C
from .errors import ConfigError
from .instruments import NFECounter
from .models.blocks import ODEBlock
from .solvers import Solver

REFERENCE_TOL = 1e-8


def load_trained(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a run's model from its summary.json config and load its model.pt
    (``torch.load(weights_only=True)``: tensors only). Raises ConfigError naming the file when
    there is no finished run or model.pt cannot be loaded that way."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists() or not (run_dir / "model.pt").exists():
        raise ConfigError(f"{run_dir} has no finished run (summary.json and model.pt)")
    summary = json.loads(summary_path.read_text())
    cfg = OmegaConf.create(summary["config"])
    shape = cfg.dataset.shape
    model = C.build_model(cfg, shape.channels, shape.size, shape.classes)
    try:
        weights = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(weights)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {run_dir / 'model.pt'} safely (weights_only): "
                          f"{first[:200]}") from None
    return model, summary


def _test_batch(summary: dict, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = OmegaConf.create(summary["config"])
    data = C._call(cfg.dataset, "dataset")
    return data.test_x[:batch].float() / 255.0, data.test_y[:batch]


def tolerance_sweep(run_dir: Path, results: Path, tols=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5),
                    batch: int = 256, repeats: int = 3) -> pd.DataFrame:
    """Write ``sweep.csv`` and ``fig3ab.png`` into ``results`` for the ODE-Net in ``run_dir``."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    model, summary = load_trained(run_dir)
    model.eval()
    x, y = _test_batch(summary, batch)
    blocks = [m for m in model.modules() if isinstance(m, ODEBlock)]
    if len(blocks) != 1:
        raise ConfigError(f"tolerance sweep expects one ODE block, found {len(blocks)}")
    block = blocks[0]
    layers = list(model.children())
    idx = layers.index(block)
    stem, head = torch.nn.Sequential(*layers[:idx]), torch.nn.Sequential(*layers[idx + 1:])
    with torch.no_grad():
        h0 = stem(x)
    base = block.solver

    def with_tol(tol: float) -> Solver:
        return Solver(method=base.method, rtol=tol, atol=tol, max_num_steps=base.max_num_steps,
                      options=dict(base.options))

    # Reference solution in float64 at a tight tolerance.
    block.solver = with_tol(REFERENCE_TOL)
    block.double()
    with torch.no_grad():
        ref = block(h0.double()).float()
    block.float()
    nfe = NFECounter(model)
    rows = []
    for tol in tols:
        block.solver = with_tol(tol)
        times = []
        for _ in range(repeats):
            with torch.no_grad(), nfe.phase_("forward"):
                t0 = time.perf_counter()
                out = block(h0)
                times.append(time.perf_counter() - t0)
            nf = nfe.take("forward")
        err = (out - ref).abs()
        test_error = 100.0 * (head(out).argmax(1) != y).float().mean().item()
        # one adjoint backward pass at this tolerance, for the backward/forward NFE ratio
        model.zero_grad(set_to_none=True)
        with nfe.phase_("forward"):
            loss = torch.nn.functional.cross_entropy(head(block(h0)), y)
        with nfe.phase_("backward"):
            loss.backward()
        nf_grad, nb = nfe.take("forward"), nfe.take("backward")
        rows.append({"tol": tol, "nfe_forward": nf, "nfe_backward": nb,
                     "nfe_forward_train": nf_grad,
                     "ratio_backward_forward": nb / nf_grad if nf_grad else float("nan"),
                     "error_max": err.max().item(), "error_mean": err.mean().item(),
                     "forward_time_s": min(times), "test_error_batch": test_error})
        print(f"[sweep] tol={tol:g}: NFE {nf}/{nb}  error {err.mean().item():.2e}  "
              f"{min(times) * 1e3:.1f} ms", flush=True)
    nfe.remove()
    block.solver = base
    df = pd.DataFrame(rows)
    df["batch"] = batch
    df["run"] = Path(run_dir).name
    df.to_csv(results / "sweep_data.csv", index=False, float_format="%.6g")
    plot_sweep(df, results / "fig3ab.png")
    return df


def plot_sweep(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.loglog(df.nfe_forward, df.error_mean, "o-")
    for _, r in df.iterrows():
        a.annotate(f"{r.tol:g}", (r.nfe_forward, r.error_mean), fontsize=7,
                   textcoords="offset points", xytext=(3, 3))
    a.set_xlabel("forward NFE")
    a.set_ylabel("mean |y(1) - y_ref(1)|")
    a.set_title("(a) numerical error vs NFE (labels: tolerance)")
    a.grid(alpha=0.3, which="both")
    b.plot(df.nfe_forward, df.forward_time_s, "o-")
    b.set_xlabel("forward NFE")
    b.set_ylabel("forward time of the ODE block (s)")
    b.set_title("(b) forward time vs NFE")
    b.grid(alpha=0.3)
    fig.suptitle(f"Trained ODE-Net, tolerance sweep on {int(df.batch.iloc[0])} test images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
