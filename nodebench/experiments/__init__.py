"""Experiment drivers: one module per reproduction, each with ``main(argv)`` and profiles."""

from __future__ import annotations

from pathlib import Path


def folders(name: str, profile: str, runs: str | None,
            results: str | None) -> tuple[str, Path, Path]:
    """Experiment name and its run and results folders.

    Defaults: ``runs/<name>-<profile>``; ``results/<name>`` for the default ``cpu`` profile and
    ``results/<name>-<profile>`` for the others.
    """
    experiment = f"{name}-{profile}"
    default_results = f"results/{name}" if profile == "cpu" else f"results/{experiment}"
    return experiment, Path(runs or f"runs/{experiment}"), Path(results or default_results)


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (the --stages, --models, ... options)."""
    return [s.strip() for s in text.split(",") if s.strip()]
