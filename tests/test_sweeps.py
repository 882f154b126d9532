"""Sweeps: finished runs are skipped and failed ones restarted when a command is run again, and
local parallel sweeps (hydra/launcher=local, joblib worker processes) get the right exit status
from their jobs' summary.json files."""

import json
import os

import pytest

from nodebench import train as T
from nodebench.cli import main

TINY = ["dataset=synthetic", "trainer.epochs=2", "trainer.max_batches=2", "trainer.batch_size=16",
        "trainer.eval_batch_size=64", "trainer.progress=false", "dataset.test_size=64"]


def test_finished_run_is_skipped_failed_run_restarts(runs_dir):
    run_dir = runs_dir / "r"
    cmd = ["train", *TINY, "model=mlp", f"hydra.run.dir={run_dir}"]
    assert main(cmd) == 0
    first = (run_dir / "summary.json").read_text()
    assert main(cmd) == 0
    assert (run_dir / "summary.json").read_text() == first   # not trained again
    assert "already finished (summary.json status ok): not run again" in \
        (run_dir / "train.log").read_text()

    failed = runs_dir / "f"
    bad = ["train", *TINY, "model=odenet", "solver.max_num_steps=1", f"hydra.run.dir={failed}"]
    assert main(bad) == 1
    assert json.loads((failed / "summary.json").read_text())["status"] == "failed"
    assert not (failed / T.CHECKPOINT).exists()
    old_events = set(failed.glob("events.out.tfevents.*"))
    # the same folder with a working setting: trained from scratch, old outputs gone
    assert main(["train", *TINY, "model=odenet", f"hydra.run.dir={failed}"]) == 0
    s = json.loads((failed / "summary.json").read_text())
    assert s["status"] == "ok" and s["resumed_at_epochs"] == [] and s["epochs_done"] == 2
    assert old_events and not old_events & set(failed.glob("events.out.tfevents.*"))
    assert "starting again from scratch" in (failed / "train.log").read_text()


def test_local_launcher_parallel_sweep_and_exit_status(runs_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = runs_dir / "sweep"
    code = main(["train", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *TINY,
                 "model=mlp,odenet", "solver.max_num_steps=1", f"hydra.sweep.dir={sweep}"])
    assert code == 1   # odenet failed in a worker process; read from its summary.json
    by_model = {s["model"]: s for s in
                (json.loads(p.read_text()) for p in sweep.glob("*/summary.json"))}
    assert by_model["odenet"]["status"] == "failed" and by_model["mlp"]["status"] == "ok"
    cores = len(os.sched_getaffinity(0))
    assert by_model["mlp"]["config"]["trainer"]["threads"] == max(1, cores // 2)

    ok = runs_dir / "ok"
    assert main(["train", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *TINY,
                 "model=mlp,resnet", f"hydra.sweep.dir={ok}"]) == 0
    assert sorted(p.parent.name for p in ok.glob("*/summary.json")) == ["0_mlp_s0",
                                                                        "1_resnet_s0"]
