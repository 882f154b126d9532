"""One loop, tasks that vary (issue 15): every preset composes and trains at profile=tiny through
`nodebench train`, a latent ODE run killed mid-epoch resumes to the uninterrupted metrics, a toy
sweep runs through the joblib launcher, and `nodebench reproduce` writes its report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from nodebench import config as C
from nodebench import train as T
from nodebench.cli import main
from nodebench.reproduce import presets
from nodebench.tables import mean_std

PRESETS = presets()


def test_the_presets_of_the_issue_exist():
    assert {"chen2018_table1", "chen2018_table2", "dupont2019_toys", "dupont2019_images",
            "seed000_expressivity", "seed001_dynamics", "seed004_shapes"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("profile", ["tiny", "cpu", "paper"])
def test_every_preset_composes_and_validates_at_every_profile(name, profile):
    cfg = C.compose([f"experiment={name}", f"profile={profile}"])
    if cfg.reproduce.sweep:
        assert cfg.group == name and cfg.reproduce.report.by
    else:  # a measurement (seed000_expressivity): its stages and its report, nothing trained
        assert cfg.group == name and cfg.reproduce.after and cfg.reproduce.report.builder
    if not cfg.dataset.get("check"):  # file-backed datasets: composition only (no data in CI)
        C.validate(cfg)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_trains_at_profile_tiny(name, runs_dir):
    """One run of each preset (its default dataset and model) through `nodebench train`:
    summary.json ok and TensorBoard events with the task's evaluation tags."""
    cfg = C.compose([f"experiment={name}", "profile=tiny"])
    if cfg.dataset.get("check"):
        pytest.skip("needs data files")
    if not cfg.reproduce.sweep:
        pytest.skip("a measurement preset: nothing to train")
    run_dir = runs_dir / name
    assert main(["train", f"experiment={name}", "profile=tiny", f"hydra.run.dir={run_dir}"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["experiment"] == name
    from nodebench.tasks import Classification  # noqa: F401 - the task names below
    target = {"classification": "test_error", "regression": "test_loss",
              "trajectory": "fit_mse", "latent": "test_rmse", "density_matching": "test_kl",
              "maximum_likelihood": "test_nll"}[summary["task"]]
    assert summary[target] is not None and summary[f"best_{target}"] is not None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert f"eval/{target}" in acc.Tags()["scalars"] and "train/loss" in acc.Tags()["scalars"]
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert list(rows.epoch) == list(range(1, cfg.trainer.epochs + 1))


@pytest.mark.parametrize("overrides,message", [
    (["dataset=spirals", "model=odenet"], "does not fit dataset 'spirals'"),
    (["dataset=mnist", "model=latent_ode"], "does not fit dataset 'mnist'"),
    (["experiment=nope"], "Could not find 'experiment/nope'"),
    (["experiment=chen2018_table2", "trainer.eval_every=0"], "trainer.eval_every must be"),
])
def test_bad_combinations_give_one_line_and_exit_2(overrides, message, runs_dir, capsys):
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nodebench: error:") and message in err[0]


def test_bad_dataset_value_found_at_load_time_exits_2(runs_dir, capsys):
    assert main(["train", "experiment=chen2018_table2", "profile=tiny", "dataset.n_obs=500",
                 f"hydra.run.dir={runs_dir / 'x'}"]) == 2
    assert "dataset.n_obs must be in 2..100" in capsys.readouterr().err
    assert not (runs_dir / "x").exists()


def test_profile_is_visible_with_cfg_job(runs_dir, capsys):
    assert main(["train", "experiment=chen2018_table2", "profile=tiny", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "n_spirals: 40" in out and "group: chen2018_table2" in out


LATENT = ["experiment=chen2018_table2", "profile=tiny", "model=latent_ode", "seed=2",
          "trainer.epochs=3", "dataset.n_spirals=60", "dataset.n_train=50"]


def test_latent_ode_sigkill_mid_epoch_then_rerun_gives_the_uninterrupted_metrics(tmp_path):
    """A real `nodebench train` of the latent ODE killed (SIGKILL) after its first checkpoint and
    started again ends with exactly the metrics of an uninterrupted run (CPU)."""
    env = dict(os.environ, NODEBENCH_RUNS=str(tmp_path / "runs"), OMP_NUM_THREADS="1")

    def command(run_dir):
        return [sys.executable, "-m", "nodebench.cli", "train", *LATENT,
                f"hydra.run.dir={run_dir}"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    victim = subprocess.Popen(command(killed), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / T.CHECKPOINT).exists():
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "summary.json").exists()
    state = T.load_checkpoint(killed / T.CHECKPOINT)
    assert state["epoch"] in (1, 2)
    resumed = subprocess.Popen(command(killed), cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert main(["train", *LATENT, "trainer.threads=1", f"hydra.run.dir={whole}"]) == 0
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert "resuming from epoch" in (killed / "train.log").read_text()
    same = ["epoch", "train_loss", "test_rmse", "test_rmse_clean", "recon_rmse", "nfe_forward",
            "nfe_eval"]
    pd.testing.assert_frame_equal(pd.read_csv(killed / "metrics.csv")[same],
                                  pd.read_csv(whole / "metrics.csv")[same], check_exact=True)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (killed, whole))
    assert a["status"] == b["status"] == "ok" and a["test_rmse"] == b["test_rmse"]
    assert a["resumed_at_epochs"] == [state["epoch"] + 1]


def test_toy_sweep_through_the_joblib_launcher(runs_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = runs_dir / "toys"
    code = main(["train", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2",
                 "experiment=dupont2019_toys", "profile=tiny", "dataset=g_1d,annulus",
                 "model=anode_toy,resnet_toy", f"hydra.sweep.dir={sweep}"])
    assert code == 0
    summaries = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert len(summaries) == 4 and {s["status"] for s in summaries} == {"ok"}
    assert {(s["dataset"], s["model"]) for s in summaries} == {
        (d, m) for d in ("g_1d", "annulus") for m in ("anode_toy", "resnet_toy")}
    assert all((Path(p).parent / "features.pt").exists() for p in sweep.rglob("summary.json"))


def test_reproduce_runs_the_declared_sweep_and_writes_the_report(runs_dir):
    code = main(["reproduce", "seed001_dynamics", "profile=tiny", "dataset=ode_spiral",
                 "model=ode_small"])
    assert code == 0
    table = pd.read_csv(runs_dir / "dynamics-tiny-results" / "table.csv")
    assert list(table["dataset.sampling"]) == ["regular", "irregular"]
    assert set(table["runs"]) == {"1 ok"} and "fit_rel" in table
    assert (runs_dir / "dynamics-tiny-results" / "table.md").read_text().startswith(
        "# seed001_dynamics (profile tiny)")
    # the same command again: the finished runs are skipped, the report is the same
    first = (runs_dir / "dynamics-tiny-results" / "table.csv").read_bytes()
    assert main(["reproduce", "seed001_dynamics", "profile=tiny", "dataset=ode_spiral",
                 "model=ode_small"]) == 0
    assert (runs_dir / "dynamics-tiny-results" / "table.csv").read_bytes() == first


def test_reproduce_unknown_preset_or_profile(runs_dir, capsys):
    assert main(["reproduce", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert main(["reproduce", "chen2018_table2", "profile=huge"]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err


def test_mean_std_formatter():
    assert mean_std([1.0, 2.0, 3.0], ".2f") == "2.00 ± 1.00"
    assert mean_std([0.5], ".4f", single="{mean} (1 seed)") == "0.5000 (1 seed)"
    assert mean_std([None, float("nan")]) == "-"
    assert mean_std([1.0, 3.0], ".3g", std_fmt=".2g", unit="%", count=True) == "2% ± 1.4 (2)"
