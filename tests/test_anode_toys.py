"""The ANODE toy presets (dupont2019_toys, dupont2019_wedge) through nodebench reproduce, and
their report built from the run records."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest

from nodebench.config import compose
from nodebench.experiments import anode_toys_report as report


def test_wedge_preset_is_the_authors_setup_and_atol_follows_rtol():
    cfg = compose(["experiment=dupont2019_wedge", "solver.rtol=1e-6"])
    assert cfg.dataset.name == "annulus_wedge" and cfg.dataset.task.loss == "smooth_l1"
    assert (cfg.dataset.num_inner, cfg.dataset.num_outer) == (500, 1500)
    assert cfg.trainer.epochs == 30 and cfg.trainer.batch_size == 64
    assert cfg.solver.rtol == cfg.solver.atol == 1e-6
    toys = compose(["experiment=dupont2019_toys", "profile=cpu"])
    assert toys.trainer.epochs == 20 and toys.dataset.task.loss == "mse"
    assert toys.reproduce.folder == "anode/toys"


@pytest.mark.slow
def test_toys_reproduce_tiny_end_to_end(runs_dir):
    """15 runs (3 datasets x 5 models) through the trainer; the report reads their records:
    one table row per pair, NFE cells from metrics.csv, solve checks, figures."""
    from nodebench.cli import main

    assert main(["reproduce", "dupont2019_toys", "profile=tiny"]) == 0
    runs = runs_dir / "dupont2019_toys-tiny"
    results = runs_dir / "anode" / "toys-tiny-results"  # reproduce.folder anode/toys
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert len(summaries) == 15 and all(s["status"] == "ok" for s in summaries)
    rows = list(csv.DictReader((results / "toys.csv").read_text().splitlines()))
    assert len(rows) == 15
    assert [r["dataset"] for r in rows[:5]] == ["g_1d"] * 5
    assert [r["model"] for r in rows[:5]] == list(report.MODELS.values())
    node = next(r for r in rows if r["dataset"] == "annulus" and r["model"] == "NODE")
    first, last = node["NFE-F / iter, epoch 1 -> last"].split(" -> ")
    run = next(p.parent for p in runs.rglob("summary.json")
               if p.parent.name.endswith("_annulus_node_toy_s0"))
    nfe = [float(r["nfe_forward"]) for r in
           csv.DictReader((run / "metrics.csv").read_text().splitlines())]
    assert (float(first), float(last)) == (round(nfe[0], 1), round(nfe[-1], 1))
    assert node["solve valid"] in ("0/1", "1/1") and node["round-trip error"] != "-"
    # the gradient error (issue 13) of every ODE run, at initialisation and at the end
    init, end = node["grad. error init / end"].split(" / ")
    assert float(init.split(" ")[0]) >= 0 and float(end.split(" ")[0]) >= 0
    resnet = next(r for r in rows if r["model"] == "ResNet")
    assert resnet["NFE-F / iter, epoch 1 -> last"] == "-" and resnet["solve valid"] == "-"
    assert resnet["grad. error init / end"] == "-"
    for name in ("toys_annulus_training.png", "toys_annulus_wedge_features.png",
                 "toys_g_1d_trajectories.png", "toys_g_1d_nfe_vs_loss.png"):
        assert (results / name).stat().st_size > 0
    readme = (results / "README.md").read_text()
    assert "g_1d: NODE's final loss" in readme and "replication 0.619" in readme
    assert "epochs at batch 16" in readme


@pytest.mark.slow
def test_wedge_reproduce_tiny(runs_dir):
    from nodebench.cli import main

    assert main(["reproduce", "dupont2019_wedge", "profile=tiny"]) == 0
    runs = runs_dir / "dupont2019_wedge-tiny"
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert sorted((s["model"], s["config"]["solver"]["atol"]) for s in summaries) == [
        ("anode5_toy", 1e-6), ("anode5_toy", 1e-3), ("node_toy", 1e-6), ("node_toy", 1e-3)]
    results = runs_dir / "anode" / "wedge-tiny-results"
    rows = list(csv.DictReader((results / "wedge.csv").read_text().splitlines()))
    assert [(r["model"], r["rtol = atol"]) for r in rows] == [
        ("NODE", "0.001"), ("NODE", "1e-06"), ("ANODE p=5", "0.001"), ("ANODE p=5", "1e-06")]
    assert [r["replication"] for r in rows] == ["0.619", "0.619", "1.000", "1.000"]
    assert "loss smooth_l1" in (results / "README.md").read_text()


def test_rings_wedge_is_the_replications_geometry():
    import math

    from nodebench.toys import polar_angle, rings_wedge

    data = rings_wedge(num_points=1000, num_test_points=1000, noise=0.0, seed=3)
    radius = data.x.norm(dim=1)
    # noise-free: every point on one of the two circles, its target by its circle
    assert bool(((radius - 1.0).abs() < 1e-5).eq(data.y[:, 0] > 0).all())
    assert bool((((radius - 0.5).abs() < 1e-5) | ((radius - 1.0).abs() < 1e-5)).all())
    angle = polar_angle(data.x)
    assert not bool(((angle >= 0) & (angle <= math.pi / 5)).any())   # the wedge left out
    test_angle = polar_angle(data.test_x)
    assert bool((test_angle <= math.pi / 5).all()) and 60 < len(data.test_x) < 140  # ~ 1000/10
    again = rings_wedge(num_points=1000, num_test_points=1000, noise=0.0, seed=3)
    assert bool((again.test_x == data.test_x).all())                    # seeded
    cfg = compose(["experiment=dupont2019_rings", "profile=cpu"])
    assert (cfg.dataset.name, cfg.trainer.epochs, cfg.solver.rtol) == ("rings_wedge", 200, 1e-3)
    assert cfg.reproduce.sweep.model == "node_toy,anode2_toy"


@pytest.mark.slow
def test_rings_reproduce_tiny(runs_dir):
    from nodebench.cli import main

    assert main(["reproduce", "dupont2019_rings", "profile=tiny"]) == 0
    results = runs_dir / "anode" / "rings-tiny-results"
    rows = list(csv.DictReader((results / "wedge.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["NODE", "ANODE p=2"]
    assert [r["replication"] for r in rows] == ["0.619", "1.000"]
    assert all(r["grad. error init / end"] != "-" for r in rows)   # measured in every run
    readme = (results / "README.md").read_text()
    assert "two thin noisy circles" in readme and "two logits with cross-entropy" in readme


def test_a_failed_toy_run_is_a_counted_row(tmp_path):
    """A step limit the solver cannot meet ends a trainer run as failed; the report counts it
    beside the ok run of the same pair and names the reason."""
    from nodebench.train import run

    common = ["experiment=dupont2019_toys", "dataset=annulus", "model=node_toy",
              "dataset.num_inner=20", "dataset.num_outer=20", "trainer.epochs=1",
              "trainer.batch_size=16", "trainer.progress=false", f"paths.runs={tmp_path}"]
    ok = run(compose([*common, "seed=0"]), tmp_path / "runs" / "ok")
    bad = run(compose([*common, "seed=1", "solver.rtol=1e-9", "solver.atol=1e-9",
                       "solver.max_num_steps=2"]), tmp_path / "runs" / "bad")
    assert ok["status"] == "ok" and bad["status"] == "failed" and "max_num_steps" in bad["error"]
    assert report.report(tmp_path / "runs", tmp_path / "results", "tiny")
    rows = list(csv.DictReader((tmp_path / "results" / "toys.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["runs"] == "1 ok, 1 failed"
    assert "max_num_steps" in rows[0]["failures"]
    assert "1 run(s) failed" in (tmp_path / "results" / "README.md").read_text()
    assert not report.report(tmp_path / "nothing", tmp_path / "r2", "tiny")
    assert not (tmp_path / "r2").exists()


def _frame(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    base = {"status": ["ok"] * n, "error": [None] * n, "valid": [True] * n,
            "validity_threshold": [0.01] * n, "seed": list(range(n))}
    return pd.DataFrame({**base, **columns})


def test_gradient_verdict_sets_apart_runs_whose_loss_vanished():
    frame = _frame(dataset=["g_1d", "annulus"], model=["anode_toy", "node_toy"],
                   test_accuracy=[1.0, 1.0], train_loss=[1e-8, 0.02],
                   nfe_forward_first=[14.0, 20.0], nfe_forward_last=[14.0, 30.0],
                   rtol=[1e-3, 1e-3], grad_rel_error_init=[0.03, 0.004],
                   grad_rel_error_final=[0.98, 0.06])
    line = next(v for v in report.verdicts(frame) if v.startswith("Gradient error"))
    assert "3.0e-03" not in line and "4.0e-03 to 3.0e-02 at initialisation" in line
    assert "6.0e-02 to 6.0e-02 at the end" in line          # the g_1d run is set apart
    assert "1 run(s) ended with a training loss under 1e-6 (g_1d ANODE p=1)" in line
    assert "(0.98 to 0.98)" in line


def test_verdicts_are_computed_from_the_numbers():
    frame = _frame(
        dataset=["g_1d", "g_1d", "annulus", "annulus", "annulus_wedge", "annulus_wedge"],
        model=["node_toy", "anode_toy", "node_toy", "anode_toy", "node_toy", "anode5_toy"],
        test_accuracy=[0.5, 1.0, 0.99, 1.0, 0.75, 1.0],
        train_loss=[1.0, 1e-5, 0.02, 0.001, 0.02, 0.001],
        nfe_forward_first=[14.0, 14.0, 20.0, 20.0, 20.0, 20.0],
        nfe_forward_last=[40.0, 20.0, 30.0, 21.0, 26.0, 20.0])
    out = report.verdicts(frame)
    assert out[0].startswith("g_1d: NODE's final loss 1.0000 and sign accuracy 0.500")
    assert "(it cannot represent g: holds)" in out[0] and "(it can: holds)" in out[0]
    assert "NODE's loss stays higher: holds" in out[1]
    assert "NODE 20.0 -> 30.0" in out[2] and "grow more than every ANODE's: holds" in out[2]
    assert out[3] == ("annulus_wedge: NODE classifies the held-out wedge at 0.750 "
                      "(replication 0.619).")
    assert out[5].startswith("Solve checks at the end of training: 6 of 6 ODE runs valid")
    frame.loc[3, "train_loss"] = 0.5           # ANODE now worse than NODE
    frame.loc[1, "status"] = "failed"          # ANODE g_1d failed: no verdict on g_1d
    frame.loc[1, "error"] = "max_num_steps exceeded"
    out = report.verdicts(frame)
    assert not out[0].startswith("g_1d") and "NODE's loss stays higher: does not hold" in out[0]
    assert out[-1] == ("1 run(s) failed and are counted, not averaged: g_1d ANODE p=1 seed 1: "
                       "max_num_steps exceeded.")
