"""`nodebench train` end to end on synthetic data, bad input, and solver failures."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from nodebench.cli import main

TINY = ["dataset=synthetic", "trainer.epochs=2", "trainer.max_batches=2",
        "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.progress=false",
        "dataset.test_size=64"]


def train(runs_dir, *overrides):
    code = main(["train", *TINY, *overrides])
    dirs = sorted(p for p in runs_dir.rglob("summary.json"))
    return code, dirs


@pytest.mark.parametrize("model", ["mlp", "resnet", "rknet", "odenet", "anode"])
def test_train_every_model_end_to_end(runs_dir, model):
    code, summaries = train(runs_dir, f"model={model}", "model.augment_dim=4" if model == "anode"
                            else "seed=0")
    assert code == 0 and len(summaries) == 1
    run = summaries[0].parent
    s = json.loads(summaries[0].read_text())
    for key in ("status", "error", "model", "solver", "gradient", "dataset", "seed", "params",
                "test_error", "best_test_error", "nfe_forward", "nfe_backward",
                "activation_mib", "epoch_time_s", "config"):
        assert key in s
    assert s["status"] == "ok" and s["model"] == model and s["dataset"] == "synthetic"
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.epoch) == [1, 2] and (metrics.iterations == 2).all()
    assert list(run.glob("events.out.tfevents.*")) and (run / ".hydra" / "config.yaml").exists()
    if model == "rknet":
        assert s["nfe_backward"] == 0 and s["nfe_forward"] > 0 and s["gradient"] == "direct"
    if model in ("odenet", "anode"):
        assert s["nfe_backward"] > 0 and s["gradient"] == "adjoint"
    if model in ("mlp", "resnet"):
        assert s["solver"] is None and s["nfe_forward"] == 0


def test_tensorboard_tags(runs_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(runs_dir, "model=odenet")
    run = next(runs_dir.rglob("summary.json")).parent
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/nfe_forward", "train/nfe_backward", "eval/test_error",
            "memory/activation_mib", "time/iter_s"} <= tags
    assert len(acc.Scalars("train/nfe_forward")) == 4   # 2 epochs x 2 iterations


@pytest.mark.parametrize("memory", [True, False])
def test_epoch_log_says_when_the_memory_meter_is_off(runs_dir, memory):
    """The epoch line of the run's train.log gives the activation memory in MiB, or "mem off"
    (not 0.0 MiB) when the meter is off, matching summary.json's activation_mib (a number, or
    null)."""
    train(runs_dir, "model=odenet", f"trainer.instruments.memory={str(memory).lower()}")
    summary = next(runs_dir.rglob("summary.json"))
    s = json.loads(summary.read_text())
    log = (summary.parent / "train.log").read_text().splitlines()
    lines = [ln for ln in log if "NFE f/b" in ln]
    assert len(lines) == 2
    if memory:
        assert s["activation_mib"] > 0 and all(" MiB  " in ln for ln in lines)
    else:
        assert s["activation_mib"] is None and all("  mem off  " in ln for ln in lines)


def test_multirun_runs_every_job(runs_dir):
    code = main(["train", "-m", *TINY, "model=mlp,resnet", "seed=0,1"])
    summaries = [json.loads(p.read_text()) for p in runs_dir.rglob("summary.json")]
    assert code == 0
    assert sorted((s["model"], s["seed"]) for s in summaries) == [
        ("mlp", 0), ("mlp", 1), ("resnet", 0), ("resnet", 1)]


def test_solver_failure_is_recorded_and_sweep_goes_on(runs_dir):
    code = main(["train", "-m", *TINY, "model=odenet,mlp", "solver.max_num_steps=1"])
    assert code == 1
    by_model = {s["model"]: s for s in
                (json.loads(p.read_text()) for p in runs_dir.rglob("summary.json"))}
    assert by_model["odenet"]["status"] == "failed"
    assert "max_num_steps exceeded" in by_model["odenet"]["error"]
    assert by_model["mlp"]["status"] == "ok"


BAD = [
    (["model=nosuch"], "Could not find 'model/nosuch'"),
    (["solver=nosuch"], "Could not find 'solver/nosuch'"),
    (["dataset=nosuch"], "Could not find 'dataset/nosuch'"),
    (["solver.nosuch=1"], "Could not override 'solver.nosuch'"),
    (["+solver.options.bogus=1"], "unknown option(s) bogus"),
    (["solver.rtol=-1e-3"], "solver.rtol must be a positive number"),
    (["solver.atol=abc"], "solver.atol must be a positive number"),
    (["trainer.batch_size=0"], "trainer.batch_size must be a positive integer"),
    (["trainer.epochs=-1"], "trainer.epochs must be a positive integer"),
    (["solver=rk4"], "set solver.step_size"),
    (["dataset=mnist", "dataset.root=/no/such/folder"], "MNIST not found"),
    (["model.gradient=sideways"], "unknown gradient mode"),
    (["+model.depth=3"], "unknown model option(s) depth"),
    (["-m", "model=mlp,nosuch"], "Could not find 'model/nosuch'"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_one_line_exit_2_nothing_written(runs_dir, capsys, overrides, message):
    base = [o for o in TINY if not o.startswith("dataset=")] if "dataset=mnist" in overrides \
        else TINY
    code = main(["train", *base, *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("nodebench: error:") and message in err[0]
    assert not runs_dir.exists() or not any(runs_dir.rglob("*"))


def test_bad_input_in_a_subprocess_has_no_traceback(runs_dir):
    proc = subprocess.run([sys.executable, "-m", "nodebench.cli", "train", "model=nosuch"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Available options in 'model':" in proc.stderr and "odenet" in proc.stderr


def test_cfg_job_prints_config(capsys, runs_dir):
    assert main(["train", "model=rknet", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "name: rknet" in out and "gradient: direct" in out and "method: dopri5" in out


def test_unknown_command():
    assert main(["bogus"]) == 2
