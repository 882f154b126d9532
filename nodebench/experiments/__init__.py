"""Experiment drivers: one module per reproduction, each with ``main(argv)`` and profiles."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch


def folders(name: str, profile: str, runs: str | None,
            results: str | None) -> tuple[str, Path, Path]:
    """Experiment name and its run and results folders.

    Defaults: ``runs/<name>-<profile>``; ``results/<name>`` for the default ``cpu`` profile,
    ``results/<name>-<profile>`` for the others, except the ``tiny`` smoke profiles, whose results
    go to ``runs/<name>-tiny-results`` (ignored by git), never into the committed results/ tree.
    """
    experiment = f"{name}-{profile}"
    default_results = (f"results/{name}" if profile == "cpu" else
                       f"runs/{experiment}-results" if profile == "tiny" else
                       f"results/{experiment}")
    return experiment, Path(runs or f"runs/{experiment}"), Path(results or default_results)


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (the --stages, --models, ... options)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def measured_step(compute_loss: Callable[..., torch.Tensor | tuple[torch.Tensor, float]],
                  optimizer: torch.optim.Optimizer, nfe, where: str, *args) -> tuple[float, int, int]:
    """One optimisation step with its NFE counted by phase: ``compute_loss(*args)`` under the
    ``forward`` phase of ``nfe`` (a :class:`~nodebench.instruments.NFECounter`), ``backward()``
    under ``backward``, then ``optimizer.step()``.

    ``compute_loss`` returns the loss, or (the loss, the value to report) when the optimised
    loss is not the reported one. Returns (the reported value, forward NFE, backward NFE). A
    non-finite value raises :class:`~nodebench.errors.SolverFailure` ("non-finite loss at
    <where>") before any update, so drivers record the run as failed.
    """
    from ..errors import SolverFailure

    with nfe.phase_("forward"):
        out = compute_loss(*args)
    loss, value = out if isinstance(out, tuple) else (out, out.item())
    if not math.isfinite(value):
        raise SolverFailure(f"non-finite loss at {where}")
    optimizer.zero_grad(set_to_none=True)
    with nfe.phase_("backward"):
        loss.backward()
    optimizer.step()
    return value, nfe.take("forward"), nfe.take("backward")
