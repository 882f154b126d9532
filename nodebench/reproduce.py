"""``nodebench reproduce NAME [profile=P] [overrides]``: a preset's declared sweep, then its report.

``NAME`` is a preset in ``conf/experiment/`` (``nodebench reproduce --list`` names them); its
``reproduce.sweep`` is run as one Hydra multirun of ``nodebench train experiment=NAME
profile=P`` (a list of sweeps: one multirun per part, one after another; ``reproduce.launcher``:
``local`` runs the jobs of a multirun in parallel processes), into ``<paths.runs>/NAME-P/``
(a fixed folder: the same command again resumes unfinished runs and skips finished ones), and the report (:func:`nodebench.tables.write_report`, grouped by
``reproduce.report.by``, and the preset's own ``reproduce.report.builder(runs, results,
profile)`` where it has one) is written from those run records into ``results/F`` (profile
cpu), ``results/F-P`` (paper, gpu) or ``<paths.runs>/F-tiny-results`` (tiny: never into the
committed results), where ``F`` is the preset's ``reproduce.folder`` or else ``NAME``. Further
overrides go to every job (a key of the sweep given on the command line replaces the sweep's
values; ``reproduce.overrides``, e.g. a profile's ``[dataset=synthetic]``, are given to every
job before them). The profile defaults to ``cpu``.

Between the sweep and the report run the preset's ``reproduce.after`` stages, dotted functions
``stage(runs, results, cfg)`` with ``cfg`` the reproduction's composed config (Table 1's memory
scaling, tolerance sweep and solve checks). A preset with an empty sweep trains nothing: only its
stages and its builder run (the expressivity measurement). When the sweep trained a run,
``results/.../reproduce.json`` records the wall time (sweep and whole), jobs at a time, threads
per job and the 1-minute load average (start, maximum sampled every 10 s, end).

``nodebench reproduce NAME --report-only [profile=P] [overrides]`` trains nothing and runs no
stage: it rebuilds the report from the run records already in the preset's run folder (and keeps
its ``reproduce.json``), e.g. after ``shared/tools/quiet-run -- make reproduce-...`` has appended
its verdict line to ``results/.../quiet-run.log``, which the report quotes; no run records there
is bad input (exit status 2).

Exit status: that of the sweep (0 every run ok, 1 a run failed, 2 bad input); the report is
written whenever a run record exists.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
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


def _is_sweep(override: str) -> bool:
    """Whether a command-line override sweeps (``key=a,b``, ``range(...)``, ``choice(...)``, ...),
    by Hydra's own override grammar; an override it cannot parse is not a sweep (composing it
    reports the error)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except HydraException:
        return False


def plan(name: str, args: list[str]) -> tuple[list[list[str]], Path, Path, dict]:
    """The ``nodebench train -m`` arguments of a reproduction (one list per sweep part, run one
    after another), its sweep folder, its results folder and its report spec. Raises ConfigError for an unknown preset or profile."""
    if name not in presets():
        raise ConfigError(f"unknown experiment {name!r}; choose one of: {', '.join(presets())}")
    profile = next((a.split("=", 1)[1] for a in args if a.startswith("profile=")), "cpu")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    rest = [a for a in args if not a.startswith("profile=")]
    base = [f"experiment={name}", f"profile={profile}"]
    # the overrides one config can take: no Hydra keys or flags, no sweeps (a,b  range(..))
    single = [a for a in rest if not a.startswith(("hydra", "-")) and not _is_sweep(a)]
    cfg = C.compose([*base, *single])
    group = f"{name}-{profile}"
    runs = Path(str(cfg.paths.runs))
    sweep_dir = runs / group
    given = {a.split("=", 1)[0].lstrip("+~") for a in rest}
    launcher = cfg.reproduce.get("launcher")
    launch = [f"hydra/launcher={launcher}"] if launcher and "hydra/launcher" not in given else []
    # reproduce.overrides: group choices a profile makes (its defaults list cannot), before the
    # command line's, which win
    extra = [str(o) for o in cfg.reproduce.get("overrides") or []
             if str(o).split("=", 1)[0].lstrip("+~") not in given]
    # reproduce.sweep: one mapping (one multirun) or a list of them (parts: multiruns one after
    # another into the same folder, e.g. the gradient study's MNIST and toy runs, whose seeds and
    # optimisers differ)
    parts = _sweep_parts(cfg.reproduce.sweep)
    train_args = [["-m", *base, f"group={group}", f"hydra.sweep.dir={sweep_dir}", *launch,
                   *extra, *[f"{k}={_sweep_value(v)}" for k, v in part.items() if k not in given],
                   *rest] for part in parts]
    report = {"by": list(cfg.reproduce.report.by), "metrics": list(cfg.reproduce.report.metrics),
              "builder": cfg.reproduce.report.get("builder"), "profile": profile,
              "after": [str(a) for a in cfg.reproduce.get("after") or []],
              # a preset without a sweep (a measurement: seed000_expressivity) trains nothing
              "train": bool(parts),
              "threads": cfg.trainer.get("threads"),
              # the config the stages after the sweep read: the jobs' own (profile overrides too)
              "stage_args": [*base, *extra, *single]}
    # reproduce.folder: the results folder's name when it is not the preset's (e.g. cnf/density)
    folder = cfg.reproduce.get("folder") or name
    return train_args, sweep_dir, results_folder(folder, profile, runs), report


def _sweep_parts(sweep) -> list[dict]:
    """``reproduce.sweep`` as a list of sweeps (key -> values), empty ones left out. Raises
    ConfigError for anything but a mapping or a list of mappings."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if sweep is None:
        return []
    items = list(sweep) if isinstance(sweep, (ListConfig, list)) else [sweep]
    if not all(isinstance(i, (DictConfig, dict)) for i in items):
        raise ConfigError("reproduce.sweep must be a mapping (key: values) or a list of mappings")
    return [dict(OmegaConf.to_container(i, resolve=False)) if isinstance(i, DictConfig) else
            dict(i) for i in items if len(i)]


class LoadClock:
    """Wall time of a reproduction and the 1-minute load average,
    sampled every 10 s by a daemon thread (start, maximum; the end is read by the caller)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.load_start = os.getloadavg()[0]
        self.load_max = self.load_start
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(10.0):
            self.load_max = max(self.load_max, os.getloadavg()[0])

    def elapsed(self) -> float:
        return time.time() - self.started

    def stop(self) -> None:
        self.load_max = max(self.load_max, os.getloadavg()[0])
        self._done.set()

    def trained(self, sweep_dir: Path) -> bool:
        """Whether this reproduction wrote a run record (a rerun over finished runs does not:
        its timing would say nothing)."""
        return any(p.stat().st_mtime >= self.started for p in sweep_dir.rglob("summary.json"))


def _jobs(train_args: list[str]) -> int:
    """How many training jobs ran at a time (hydra.launcher.n_jobs, else 1) in one sweep part."""
    for a in reversed(train_args):
        if a.startswith("hydra.launcher.n_jobs="):
            n = int(a.split("=", 1)[1])
            return n if n > 0 else max(1, (os.cpu_count() or 1) + 1 + n)
    return 1


def main(args: list[str]) -> int:
    """The ``reproduce`` command (see the module docstring)."""
    from .cli import cmd_train

    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\npresets: " + ", ".join(presets())
              + "\nprofiles: " + ", ".join(PROFILES))
        return 0
    if args[0] == "--list":
        print("\n".join(presets()))
        return 0
    report_only = "--report-only" in args
    args = [a for a in args if a != "--report-only"]
    if not args:
        raise ConfigError("nodebench reproduce --report-only needs a preset: "
                          "nodebench reproduce NAME --report-only")
    name, rest = args[0], args[1:]
    train_args, sweep_dir, results, report = plan(name, rest)
    if report_only:
        if not report["train"] or not any(sweep_dir.rglob("summary.json")):
            raise ConfigError(f"--report-only: no run records under {shown_path(sweep_dir)}/ "
                              f"(run nodebench reproduce {name} first)")
        return _report(name, rest, sweep_dir, results, report, code=0)
    clock = LoadClock()
    if report["train"]:
        code = 0
        for part in train_args:  # a failed run does not stop the next part; bad input does
            print(f"[reproduce] nodebench train {' '.join(part)}", flush=True)
            code = max(code, cmd_train(part))
            if code == 2:
                return code
        if not any(sweep_dir.rglob("summary.json")):
            print(f"nodebench: error: no run records under {sweep_dir}/", file=sys.stderr)
            return code or 1
    else:  # a measurement preset (no sweep): its stages write into the run folder
        code = 0
        sweep_dir.mkdir(parents=True, exist_ok=True)
    sweep_s = clock.elapsed()
    if report["after"]:  # the preset's stages between the sweep and the report
        from hydra.utils import get_method

        stage_cfg = C.compose(report["stage_args"])
        results.mkdir(parents=True, exist_ok=True)
        for stage in report["after"]:
            print(f"[reproduce] stage {stage}", flush=True)
            get_method(stage)(sweep_dir, results, stage_cfg)
    clock.stop()
    if clock.trained(sweep_dir):
        # what a report's schedule line states (nodebench.report.schedule_line)
        results.mkdir(parents=True, exist_ok=True)
        (results / "reproduce.json").write_text(json.dumps({
            "preset": name, "profile": report["profile"],
            "jobs": max((_jobs(a) for a in train_args), default=1),
            "threads_per_job": report["threads"],
            "sweep_wall_s": round(sweep_s, 1), "wall_s": round(clock.elapsed(), 1),
            "cores": os.cpu_count(), "load_start": clock.load_start,
            "load_max": round(clock.load_max, 2), "load_end": os.getloadavg()[0]},
            indent=2) + "\n")
    return _report(name, rest, sweep_dir, results, report, code)


def _report(name: str, rest: list[str], sweep_dir: Path, results: Path, report: dict,
            code: int) -> int:
    """The generic table and the preset's own builder, from the run records in ``sweep_dir``
    into ``results``; returns ``code``."""
    from .tables import write_report

    if report["train"]:
        write_report(sweep_dir, results, title=f"{name} (profile {report['profile']})",
                     by=report["by"], metrics=report["metrics"],
                     note=f"Runs: `{shown_path(sweep_dir)}`; made by `nodebench reproduce {name} "
                          f"{' '.join(rest)}`.".replace("  ", " ").replace(" `.", "`."))
    if report["builder"]:  # the preset's own tables and figures, from the same run records
        from hydra.utils import get_method

        get_method(report["builder"])(sweep_dir, results, report["profile"])
    print(f"[reproduce] report in {results}/", flush=True)
    return code
