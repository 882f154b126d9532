"""Table 1 and Figure 3 of Chen et al. 2018 (MNIST) as a preset: ``nodebench reproduce
chen2018_table1 [profile=cpu|gpu|paper|tiny]`` (``make reproduce-mnist``).

The preset (conf/experiment/chen2018_table1.yaml) trains every Table-1 model and the control arm
in one Hydra multirun (run folders ``<runs>/chen2018_table1-<profile>/<model>_s<seed>``). The
stages below run after it (the preset's ``reproduce.after``), each ``stage(runs, results, cfg)``
with ``cfg`` the reproduction's composed config (its ``reproduce`` block holds their settings):

* :func:`memory_stage`: activation memory against forward NFE (RK-Net, ODE-Net) and depth
  (ResNet) at initialisation (Table 1's memory column; ``memory_data.csv``, ``memory.png``);
* :func:`sweep_stage`: the tolerance sweep of the trained ODE-Net (Figure 3a/3b; ``sweep_data.csv``,
  ``fig3ab.png``);
* :func:`checks_stage`: solve validity and gradient error of the trained ODE-Net and RK-Net, and
  the ODE-Net's validity at every tolerance of the sweep (``checks.json`` in their run folders).

:func:`report` (the preset's report builder) writes Table 1, the memory, NFE and sweep tables and
``README.md`` from those files only (:func:`nodebench.report.report_mnist`).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _runs_of(runs: Path, model: str) -> list[Path]:
    """The finished run folders of ``model`` under ``runs`` (summary.json status ok, model.pt)."""
    found = []
    for path in sorted(Path(runs).rglob("summary.json")):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(s, dict) and s.get("model") == model and s.get("status") == "ok" \
                and (path.parent / "model.pt").exists():
            found.append(path.parent)
    return found


def memory_stage(runs: Path, results: Path, cfg: DictConfig) -> None:
    """Activation memory against NFE and depth (:func:`nodebench.memory.memory_scaling` with
    ``cfg.reproduce.memory``: batch, dataset (mnist | synthetic), tols, rk4_steps, blocks)."""
    from ..memory import memory_scaling

    settings = OmegaConf.to_container(cfg.reproduce.memory, resolve=True)
    print(f"[reproduce] memory scaling: {settings}", flush=True)
    memory_scaling(Path(results), **settings)


def sweep_stage(runs: Path, results: Path, cfg: DictConfig) -> None:
    """Figure 3a/3b from the first finished ODE-Net run (:func:`nodebench.sweep.tolerance_sweep`
    with ``cfg.reproduce.tolerance_sweep``: tols, batch). Skipped, with a line saying so, when
    no ODE-Net run finished."""
    from ..sweep import tolerance_sweep

    found = _runs_of(runs, "odenet")
    if not found:
        print("[reproduce] tolerance sweep skipped: no finished ODE-Net run with model.pt",
              flush=True)
        return
    settings = OmegaConf.to_container(cfg.reproduce.tolerance_sweep, resolve=True)
    print(f"[reproduce] tolerance sweep of {found[0]}: {settings}", flush=True)
    tolerance_sweep(found[0], Path(results), **settings)


def checks_stage(runs: Path, results: Path, cfg: DictConfig) -> None:
    """``nodebench check`` of every finished ODE-Net and RK-Net run (``cfg.reproduce.checks``:
    batch, gradient_batch), the ODE-Net's also at every tolerance of the sweep. Not timed."""
    from ..checks import run_checks

    settings = OmegaConf.to_container(cfg.reproduce.checks, resolve=True)
    tols = list(cfg.reproduce.tolerance_sweep.tols)
    for model in ("odenet", "rknet"):
        for run in _runs_of(runs, model):
            print(f"[reproduce] checks of {run}", flush=True)
            run_checks(run, **settings, tols=tols if model == "odenet" else ())


def report(runs: Path, results: Path, profile: str) -> str:
    """Table 1, memory scaling, Figure 3 and README.md in ``results`` from the run records in
    ``runs`` and the stages' files (:func:`nodebench.report.report_mnist`), with the profile's
    description and targets from the preset. Returns the README text."""
    from .. import config as C
    from ..report import report_mnist

    cfg = C.compose(["experiment=chen2018_table1", f"profile={profile}"])
    return report_mnist(Path(runs), Path(results), profile=profile,
                        description=str(cfg.reproduce.description).strip(),
                        targets=dict(cfg.reproduce.targets))
