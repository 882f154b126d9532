"""Solve checks of a finished ``nodebench train`` run, from its saved weights (issue 13).

``nodebench check RUN_DIR [RUN_DIR ...]`` measures, for a run folder that holds summary.json and
model.pt (the final weights):

* **solve validity** of every ODE block at the run's own solver settings, on the fixed batch of
  the first ``--batch`` test images (:func:`nodebench.validity.model_validity`: error against a
  float64 dopri5 1e-8 reference solve, and the round trip y(t1) -> t0 with the run's solver);
* the **gradient error** at initialisation (the weights rebuilt from the run's seed exactly as
  the trainer builds them, before training) and at the end (model.pt), against a float64 dopri5
  1e-9 direct-backprop reference (:func:`nodebench.validity.gradient_error`), on the first
  ``--gradient-batch`` test images;
* optionally (``--tols``), the validity of the trained model with every block's solver set to
  each tolerance (rtol = atol): the data behind "the loosest tolerance at which the round trip
  passes" (Chen et al. 2018, Figure 3a's sweep).

It writes ``checks.json`` into the run folder; the report (``nodebench.report.collect``) reads it
beside summary.json, so runs trained before the trainer measured these (or with
``trainer.instruments.gradient_error=false``) get the same columns. Nothing here is timed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .errors import ConfigError

CHECKS_FILE = "checks.json"


def load_run(run_dir: Path):
    """``(cfg, data, model_at_init)`` of a finished run: its saved config, its data set, and its
    model rebuilt from the seed in the trainer's order (seed, data, model), i.e. the initial
    weights. Raises ConfigError when the folder is not a finished run with model.pt."""
    from . import config as C
    from .train import seed_everything

    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir}: no readable summary.json ({exc.__class__.__name__})") \
            from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise ConfigError(f"{run_dir}: summary.json was not written by `nodebench train`")
    if not (run_dir / "model.pt").exists():
        raise ConfigError(f"{run_dir}: no model.pt (the run failed or ran with "
                          "trainer.save_model=false)")
    cfg = OmegaConf.create(summary["config"])
    seed_everything(int(cfg.seed), False)
    data = C._call(cfg.dataset, "dataset")
    shape = cfg.dataset.shape
    model = C.build_model(cfg, shape.channels, shape.size, shape.classes)
    return cfg, data, model


def run_checks(run_dir: Path, batch: int = 16, gradient_batch: int = 16, gradient: bool = True,
               tols: list[float] | tuple[float, ...] = (), threshold: float | None = None) -> dict:
    """Measure the checks of the module docstring for one run; write and return checks.json's
    dict (errors dimensionless, relative; times in seconds). A model without ODE blocks gets
    ``{"ode_blocks": 0}`` only."""
    from .validity import DEFAULT_THRESHOLD, gradient_error, model_validity, ode_blocks

    run_dir = Path(run_dir)
    cfg, data, model = load_run(run_dir)
    threshold = float(threshold if threshold is not None else
                      cfg.trainer.instruments.get("validity_threshold", DEFAULT_THRESHOLD))
    out: dict = {"ode_blocks": len(ode_blocks(model)), "batch": batch,
                 "gradient_batch": gradient_batch if gradient else None,
                 "validity_threshold": threshold}
    if not out["ode_blocks"]:
        (run_dir / CHECKS_FILE).write_text(json.dumps(out, indent=2) + "\n")
        return out
    x, y = next(iter(data.test_batches(max(batch, gradient_batch))))
    watch = time.perf_counter()
    if gradient:
        init = gradient_error(model, x[:gradient_batch], y[:gradient_batch])
        out.update(grad_rel_error_init=init["rel_error"], grad_cosine_init=init["cosine"],
                   grad_failure_init=init["failure"])
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu"))
    found = model_validity(model, x[:batch], threshold)
    out.update({k: found[k] for k in ("validity_reference_error", "validity_roundtrip_error",
                                      "valid", "validity_failure")})
    if gradient:
        final = gradient_error(model, x[:gradient_batch], y[:gradient_batch])
        out.update(grad_rel_error_final=final["rel_error"], grad_cosine_final=final["cosine"],
                   grad_failure_final=final["failure"])
    blocks = ode_blocks(model)
    own = [b.solver for b in blocks]
    rows = []
    for tol in tols:
        for block, solver in zip(blocks, own, strict=True):
            block.solver = dataclasses.replace(solver, rtol=float(tol), atol=float(tol))
        at = model_validity(model, x[:batch], threshold)
        rows.append({"tol": float(tol), **{k: at[k] for k in (
            "validity_reference_error", "validity_roundtrip_error", "valid",
            "validity_failure")}})
    for block, solver in zip(blocks, own, strict=True):
        block.solver = solver
    if rows:
        out["tolerances"] = rows
    out["time_s"] = time.perf_counter() - watch
    (run_dir / CHECKS_FILE).write_text(json.dumps(out, indent=2) + "\n")
    return out


def loosest_valid(rows: list[dict]) -> float | None:
    """The loosest tolerance whose round trip and reference checks pass, such that every
    tighter tolerance in ``rows`` passes too; None when the tightest fails."""
    best = None
    for row in sorted(rows, key=lambda r: r["tol"]):
        if not row.get("valid"):
            break
        best = row["tol"]
    return best


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="nodebench check", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (summary.json and model.pt)")
    p.add_argument("--batch", type=int, default=16, help="validity batch: first N test images")
    p.add_argument("--gradient-batch", type=int, default=16,
                   help="gradient-error batch: first N test images")
    p.add_argument("--no-gradient", action="store_true",
                   help="skip the gradient error (its float64 1e-9 reference can take minutes)")
    p.add_argument("--tols", default="", help="comma-separated tolerances for the validity "
                   "sweep of the trained model (e.g. 1e-1,1e-2,1e-3)")
    a = p.parse_args(argv)
    for name, value in (("--batch", a.batch), ("--gradient-batch", a.gradient_batch)):
        if value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    try:
        tols = [float(t) for t in a.tols.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--tols must be comma-separated numbers, got {a.tols!r}") from None
    if any(t <= 0 for t in tols):
        raise ConfigError(f"--tols must be positive, got {a.tols!r}")
    runs = [Path(r) for r in a.runs]
    for run in runs:  # every folder checked before anything is computed or written
        if not (run / "summary.json").exists() or not (run / "model.pt").exists():
            raise ConfigError(f"{run}: not a finished run folder (summary.json and model.pt)")
    for run in runs:
        out = run_checks(run, a.batch, a.gradient_batch, not a.no_gradient, tols)
        fmt = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in out.items()
               if k.startswith(("validity_", "valid", "grad_rel"))}
        print(f"{run}: {fmt}", flush=True)
    return 0
