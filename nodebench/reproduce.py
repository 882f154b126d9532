"""``nodebench reproduce NAME [profile=P] [overrides]``: a preset's declared sweep, then its report.

``NAME`` is a preset in ``conf/experiment/`` (``nodebench reproduce --list`` names them); its
``reproduce.sweep`` is run as one Hydra multirun of ``nodebench train experiment=NAME
profile=P`` (``reproduce.launcher``: ``local`` runs the jobs in parallel processes), into
``<paths.runs>/NAME-P/`` (a fixed folder: the same command again resumes unfinished runs and
skips finished ones), and the report (:func:`nodebench.tables.write_report`, grouped by
``reproduce.report.by``, and the preset's own ``reproduce.report.builder(runs, results,
profile)`` where it has one) is written from those run records into ``results/F`` (profile
cpu), ``results/F-P`` (paper, gpu) or ``<paths.runs>/F-tiny-results`` (tiny: never into the
committed results), where ``F`` is the preset's ``reproduce.folder`` or else ``NAME``. Further
overrides go to every job (a key of the sweep given on the command line replaces the sweep's
values; ``reproduce.overrides``, e.g. a profile's ``[dataset=synthetic]``, are given to every
job before them). The profile defaults to ``cpu``.

Exit status: that of the sweep (0 every run ok, 1 a run failed, 2 bad input); the report is
written whenever a run record exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import config as C
from .errors import ConfigError
from .tables import shown_path

PROFILES = ("tiny", "cpu", "paper", "gpu")


def presets() -> list[str]:
    """The presets of conf/experiment/ (``none`` excluded)."""
    return sorted(p.stem for p in (C.CONF_DIR / "experiment").glob("*.yaml") if p.stem != "none")


def results_folder(name: str, profile: str, runs: Path) -> Path:
    """Where the report of ``name`` at ``profile`` goes (see the module docstring)."""
    if profile == "tiny":
        return runs / f"{name}-tiny-results"
    return Path("results") / (name if profile == "cpu" else f"{name}-{profile}")


def _sweep_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def plan(name: str, args: list[str]) -> tuple[list[str], Path, Path, dict]:
    """The ``nodebench train -m`` arguments of a reproduction, its sweep folder, its results
    folder and its report spec. Raises ConfigError for an unknown preset or profile."""
    if name not in presets():
        raise ConfigError(f"unknown experiment {name!r}; choose one of: {', '.join(presets())}")
    profile = next((a.split("=", 1)[1] for a in args if a.startswith("profile=")), "cpu")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    rest = [a for a in args if not a.startswith("profile=")]
    base = [f"experiment={name}", f"profile={profile}"]
    cfg = C.compose([*base, *[a for a in rest if not a.startswith(("hydra", "-"))]])
    group = f"{name}-{profile}"
    runs = Path(str(cfg.paths.runs))
    sweep_dir = runs / group
    given = {a.split("=", 1)[0].lstrip("+~") for a in rest}
    sweep = [f"{k}={_sweep_value(v)}" for k, v in cfg.reproduce.sweep.items() if k not in given]
    launcher = cfg.reproduce.get("launcher")
    launch = [f"hydra/launcher={launcher}"] if launcher and "hydra/launcher" not in given else []
    # reproduce.overrides: group choices a profile makes (its defaults list cannot), before the
    # command line's, which win
    extra = [str(o) for o in cfg.reproduce.get("overrides") or []
             if str(o).split("=", 1)[0].lstrip("+~") not in given]
    train_args = ["-m", *base, f"group={group}", f"hydra.sweep.dir={sweep_dir}", *launch,
                  *extra, *sweep, *rest]
    report = {"by": list(cfg.reproduce.report.by), "metrics": list(cfg.reproduce.report.metrics),
              "builder": cfg.reproduce.report.get("builder"), "profile": profile}
    # reproduce.folder: the results folder's name when it is not the preset's (e.g. cnf/density)
    folder = cfg.reproduce.get("folder") or name
    return train_args, sweep_dir, results_folder(folder, profile, runs), report


def main(args: list[str]) -> int:
    """The ``reproduce`` command (see the module docstring)."""
    from .cli import cmd_train
    from .tables import write_report

    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\npresets: " + ", ".join(presets())
              + "\nprofiles: " + ", ".join(PROFILES))
        return 0
    if args[0] == "--list":
        print("\n".join(presets()))
        return 0
    name, rest = args[0], args[1:]
    train_args, sweep_dir, results, report = plan(name, rest)
    print(f"[reproduce] nodebench train {' '.join(train_args)}", flush=True)
    code = cmd_train(train_args)
    if not any(sweep_dir.rglob("summary.json")):
        print(f"nodebench: error: no run records under {sweep_dir}/", file=sys.stderr)
        return code or 1
    write_report(sweep_dir, results, title=f"{name} (profile {train_args[2].split('=')[1]})",
                 by=report["by"], metrics=report["metrics"],
                 note=f"Runs: `{shown_path(sweep_dir)}`; made by `nodebench reproduce {name} "
                      f"{' '.join(rest)}`.".replace("  ", " ").replace(" `.", "`."))
    if report["builder"]:  # the preset's own tables and figures, from the same run records
        from hydra.utils import get_method

        get_method(report["builder"])(sweep_dir, results, report["profile"])
    print(f"[reproduce] report in {results}/", flush=True)
    return code
