"""The toy-model fit of `make reproduce-gradients`' toy stage: ANODE's annulus NODE (Dupont,
Doucet, Teh 2019, Sections 3-4) trained once per gradient mode, with its loss and NFE per
iteration in ``history.csv``.

The ANODE toy reproduction itself (``nodebench reproduce dupont2019_toys``) trains through
``nodebench train``; this loop is what remains of its old driver, kept only because the gradient
study (:mod:`nodebench.experiments.gradients`, not yet a preset) builds its toy stage on it.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from . import measured_step

TOY_TASKS = {  # task -> readout (Dupont et al. 2019, Sections 3-4)
    "g_1d": {"readout": "first"},
    "annulus": {"readout": "linear"},
    "annulus_wedge": {"readout": "linear"},
}
TOY_TRAINING = {"batch_size": 64, "lr": 1e-3, "loss": "mse", "gradient": "adjoint",
                "solver": {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "max_num_steps": 1000},
                "hidden": 32}
LOSSES = {"mse": torch.nn.MSELoss, "smooth_l1": torch.nn.SmoothL1Loss}


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def build_toy(task: str, model_name: str, seed: int, data_kwargs: dict | None = None,
              training: dict = TOY_TRAINING):
    """The toy data set and the model of ``fit_toy`` at initialisation: ``torch.manual_seed(seed)``,
    then the data (its own seed), then the model (``TOY_MODELS``: ``node``, ``anode1``, ...) with
    the training's solver and gradient (a mode name or :class:`nodebench.solvers.Gradient`'s
    fields); the same weights as ``fit_toy`` starts from. Returns ``(data, model)``."""
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
    """Train one toy model; write history.csv (one row per iteration), model.pt (final weights)
    and summary.json into ``run_dir``; return the summary (``status``, ``final_train_loss``,
    ``train_accuracy``, ``test_accuracy``, NFE per iteration at the first and last epoch, ...).

    A numerical failure (max_num_steps exceeded, underflow in dt, non-finite loss) ends the run
    with ``status: failed`` and the reason in ``error``; its history up to that point is kept.
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
    """Loss and sign accuracy on the training and test sets, NFE per evaluation solve; the final
    weights to model.pt (the gradient checks load them)."""
    model.eval()
    with torch.no_grad(), nfe.phase_("eval"):
        out = model(data.x)
        test_out = model(data.test_x)
        eval_nfe = nfe.take("eval") / 2
    torch.save(model.state_dict(), run_dir / "model.pt")
    return {"train_loss": loss_fn(out, data.y).item(),
            "train_accuracy": (torch.sign(out) == data.y).float().mean().item(),
            "test_loss": loss_fn(test_out, data.test_y).item(),
            "test_accuracy": (torch.sign(test_out) == data.test_y).float().mean().item(),
            "nfe_eval": eval_nfe}
