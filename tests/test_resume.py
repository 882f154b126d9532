"""Checkpoint and resume (nodebench.train): a run killed mid-epoch and started again ends with the
metrics of an uninterrupted run; a checkpoint of another configuration is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from nodebench import train as T
from nodebench.cli import main
from nodebench.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dataset=synthetic", "trainer.epochs=2", "trainer.max_batches=2", "trainer.batch_size=16",
        "trainer.eval_batch_size=64", "trainer.progress=false", "dataset.test_size=64"]
SAME = ["epoch", "train_loss", "train_error", "test_error", "nfe_forward", "nfe_backward",
        "nfe_eval", "lr"]


def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")[SAME]


def test_sigkill_mid_epoch_then_rerun_gives_the_uninterrupted_metrics(runs_dir, tmp_path):
    """A real `nodebench train` process killed (SIGKILL) mid-epoch and started again with the same
    command ends with exactly the metrics of an uninterrupted run of the same seed (CPU)."""
    args = ["dataset=synthetic", "model=odenet", "seed=3", "trainer.epochs=3",
            "trainer.max_batches=3", "trainer.batch_size=8", "dataset.test_size=32",
            "trainer.progress=false", "trainer.threads=1", "optim=sgd_cosine"]
    env = dict(os.environ, NODEBENCH_RUNS=str(tmp_path / "runs"), OMP_NUM_THREADS="1")

    def command(run_dir):
        return [sys.executable, "-m", "nodebench.cli", "train", *args, f"hydra.run.dir={run_dir}"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    victim = subprocess.Popen(command(killed), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / T.CHECKPOINT).exists():
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.05)
    # half an epoch later: the kill lands inside epoch 2 (its batches are not checkpointed)
    time.sleep(0.5 * metrics_epoch_s(killed))
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "summary.json").exists()
    state = T.load_checkpoint(killed / T.CHECKPOINT)  # torch.load(weights_only=True)
    assert state["epoch"] in (1, 2) and len(state["rows"]) == state["epoch"]

    resumed = subprocess.Popen(command(killed), cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # meanwhile the uninterrupted reference, in this process (1 torch thread, as the subprocess)
    assert main(["train", *args, f"hydra.run.dir={whole}"]) == 0
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert f"resuming from epoch {state['epoch'] + 1}/3" in (killed / "train.log").read_text()
    pd.testing.assert_frame_equal(metrics(killed), metrics(whole), check_exact=True)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (killed, whole))
    assert a["status"] == b["status"] == "ok" and a["epochs_done"] == 3
    assert a["test_error"] == b["test_error"] and a["resumed_at_epochs"] == [state["epoch"] + 1]
    assert not (killed / T.CHECKPOINT).exists() and (killed / "model.pt").exists()
    # TensorBoard: the killed epoch's iteration events are purged, each step appears once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(killed))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 10))
    assert [e.step for e in acc.Scalars("eval/test_error")] == [1, 2, 3]


def metrics_epoch_s(run_dir: Path) -> float:
    """Seconds of the first epoch (training + evaluation), from metrics.csv."""
    row = pd.read_csv(run_dir / "metrics.csv").iloc[0]
    return float(row.epoch_time_s + row.eval_time_s)


class Interrupted(BaseException):
    """Stands for a kill right after a checkpoint (not an Exception: nothing records it)."""


def save_then_stop(epoch):
    save = T.save_checkpoint

    def save_and_maybe_stop(path, state):
        save(path, state)
        if state["epoch"] == epoch:
            raise Interrupted

    return save_and_maybe_stop


def test_resume_in_process_and_config_change_is_bad_input(runs_dir, monkeypatch, capsys):
    run_dir = runs_dir / "r"
    cmd = ["train", *TINY, "model=mlp", "trainer.epochs=3", "optim=adam",
           f"hydra.run.dir={run_dir}"]
    with monkeypatch.context() as m, pytest.raises(Interrupted):
        m.setattr(T, "save_checkpoint", save_then_stop(epoch=2))
        main(cmd)
    assert list(metrics(run_dir).epoch) == [1, 2] and not (run_dir / "summary.json").exists()
    hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()
    capsys.readouterr()

    # refused before Hydra writes anything: one error line, .hydra/ not rewritten
    assert main([*cmd, "optim.optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nodebench: error:")
    assert "holds a checkpoint of another configuration (optim.optimizer.lr differ)" in err[0]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == hydra_config

    assert main(cmd) == 0
    assert main(["train", *TINY, "model=mlp", "trainer.epochs=3", "optim=adam",
                 f"hydra.run.dir={runs_dir / 'whole'}"]) == 0
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(runs_dir / "whole"),
                                  check_exact=True)
    assert json.loads((run_dir / "summary.json").read_text())["resumed_at_epochs"] == [3]


def test_checkpoint_holds_only_tensors_and_plain_types(runs_dir, monkeypatch):
    """What save_checkpoint writes loads with torch.load(weights_only=True), RNG states
    included, and restores every random stream exactly."""
    run_dir = runs_dir / "plain"
    with monkeypatch.context() as m, pytest.raises(Interrupted):
        m.setattr(T, "save_checkpoint", save_then_stop(epoch=1))
        main(["train", *TINY, "model=mlp", f"hydra.run.dir={run_dir}"])
    state = torch.load(run_dir / T.CHECKPOINT, map_location="cpu", weights_only=True)
    assert json.loads(state["config_json"])["model"]["name"] == "mlp"
    assert state["epoch"] == 1 and len(state["rows"]) == 1

    import random

    import numpy as np

    gen = torch.Generator().manual_seed(5)
    saved = T.rng_states(gen)
    expected = (random.random(), np.random.rand(), torch.rand(1).item(),
                torch.rand(1, generator=gen).item())
    T.set_rng_states(saved, gen)
    assert (random.random(), np.random.rand(), torch.rand(1).item(),
            torch.rand(1, generator=gen).item()) == expected


class SideEffect:
    """Unpickling this runs code: it writes the file named in ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_crafted_checkpoint_is_refused_and_its_code_never_runs(runs_dir, capsys, tmp_path):
    run_dir = runs_dir / "crafted"
    run_dir.mkdir(parents=True)
    marker = tmp_path / "pwned.txt"
    torch.save({"epoch": 1, "config_json": "{}", "payload": SideEffect(marker)},
               run_dir / T.CHECKPOINT)

    with pytest.raises(ConfigError, match="cannot load .*checkpoint.pt safely"):
        T.load_checkpoint(run_dir / T.CHECKPOINT)
    code = main(["train", *TINY, "model=mlp", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nodebench: error:")
    assert str(run_dir / T.CHECKPOINT) in err[0]
    assert not marker.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [T.CHECKPOINT]  # nothing written


def test_crafted_model_pt_is_refused_by_the_sweep_loader(runs_dir, tmp_path):
    from nodebench.sweep import load_trained

    run_dir = runs_dir / "done"
    assert main(["train", *TINY, "model=mlp", "trainer.epochs=1",
                 f"hydra.run.dir={run_dir}"]) == 0
    load_trained(run_dir)  # the real model.pt loads with weights_only=True
    marker = tmp_path / "pwned.txt"
    torch.save({"weight": SideEffect(marker)}, run_dir / "model.pt")
    with pytest.raises(ConfigError, match="cannot load .*model.pt safely"):
        load_trained(run_dir)
    assert not marker.exists()
