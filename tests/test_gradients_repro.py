"""`make reproduce-gradients` (issue 14): the toys, tolerance and report stages end to end on
tiny data, with two modes; the lane runner's stage jobs; the report's equal-wall-time reading."""

import json

import pandas as pd
import pytest

from nodebench.experiments import gradients as G
from nodebench.experiments import gradients_report as R


@pytest.fixture
def two_modes(monkeypatch):
    modes = {m: G.MODES[m] for m in ("direct", "mali")}
    monkeypatch.setattr(G, "MODES", modes)
    monkeypatch.setattr(R, "MODES", modes)
    profile = {**G.PROFILES["tiny"],
               "tolerance": {"tols": [1e-2, 1e-5], "mnist_batch": 2, "toy_batch": 16,
                             "dataset": "synthetic"}}
    monkeypatch.setitem(G.PROFILES, "tiny", profile)
    return modes


def test_toys_tolerance_and_report_stages_end_to_end(two_modes, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    code = G.main(["--profile", "tiny", "--stages", "toys,tolerance,report", "--runs", str(runs),
                   "--results", str(results)])
    assert code == 0
    # every toy run has its training record and both gradient checks
    for mode in two_modes:
        summary = json.loads((runs / "toys" / f"annulus_node_{mode}_s0" / "summary.json")
                             .read_text())
        assert summary["status"] == "ok" and summary["mode"] == mode
        assert 0 <= summary["grad_rel_error_init"] < 1 and 0 <= summary["grad_rel_error_final"] < 1
        assert (runs / "toys" / f"annulus_node_{mode}_s0" / "model.pt").exists()
    tol = pd.read_csv(results / "tolerance.csv")
    assert len(tol) == 2 * 2 * 2 and tol["failure"].isna().all()  # 2 models x 2 modes x 2 tols
    # the gradient converges to the float64 1e-9 reference as the tolerance tightens
    for (_, mode), g in tol.groupby(["model", "mode"]):
        errors = g.sort_values("tol")["rel_error"].tolist()
        assert errors[0] < errors[1], mode
    # direct backprop calls f in the forward pass only; MALI in both
    direct = tol[tol["mode"] == "direct"]
    assert (direct["nfe_backward"] == 0).all() and (direct["nfe_forward"] > 0).all()
    assert (tol[tol["mode"] == "mali"]["nfe_backward"] > 0).all()
    text = (results / "tables.md").read_text()
    assert "annulus" in text and "tol 1e-05" in text
    assert (results / "gradient_error_vs_tolerance.png").stat().st_size > 0
    assert (results / "error_vs_time.png").stat().st_size > 0


def test_equal_wall_time_reads_each_run_at_the_fastest_total():
    """T = the smallest total training time; each run's error at its last round within T."""
    def metrics(iter_s, errors):
        return pd.DataFrame({"iter_s": iter_s, "iterations": [10] * len(errors),
                             "test_error": errors, "nfe_forward": 1.0, "nfe_backward": 1.0,
                             "activation_mib": 1.0})
    fast = ("direct", {"status": "ok", "test_error": 3.0}, metrics([1.0, 1.0], [9.0, 3.0]))
    slow = ("adjoint", {"status": "ok", "test_error": 2.0}, metrics([0.5, 1.0, 1.0],
                                                                    [8.0, 5.0, 2.0]))
    table, budget = R.mnist_table([fast, slow])
    assert budget == 20.0  # the fast run's 2 rounds x 10 iterations x 1 s
    column = "test error % at 20 s"
    assert table.set_index("mode")[column].to_dict() == {"direct": "3.00", "adjoint": "5.00"}


def test_stage_jobs_run_in_their_lanes(tmp_path):
    """A profile's stage jobs run once, after the lane's trainings, with their own arguments."""
    from nodebench.experiments.gradients import run_lanes

    profile = {"lanes": [["a", "hello"], ["b"]], "seeds": [0], "threads": None,
               "models": {},
               "stage_jobs": {"hello": ["-c", "print('stage ran')"]}}
    # "a" and "b" are not modes of the profile (models={}): only the stage job runs
    schedule = run_lanes(profile, tmp_path / "runs", "x", heartbeat_s=0.5)
    assert schedule["lanes"] == [["hello"]]
    assert (tmp_path / "runs" / "hello.log").read_text().strip() == "stage ran"
