"""The gradient-mode study (issue 14) as the preset gradient_modes: its two sweep parts (image
runs, annulus runs), the tolerance stage and the report end to end at profile tiny with two modes;
the gradient_mode group; the report's equal-wall-time reading."""

import json

import pandas as pd
import pytest

from nodebench import config as C
from nodebench.experiments import gradients as G
from nodebench.experiments import gradients_report as R


@pytest.mark.parametrize("mode", G.MODES)
def test_gradient_mode_group_sets_the_mode_the_report_reads(mode):
    cfg = C.compose([f"gradient_mode={mode}"])
    C.validate(cfg, check_files=False)
    from omegaconf import OmegaConf

    assert G.mode_of(OmegaConf.to_container(cfg, resolve=True)) == mode
    described = C.build_gradient(cfg).describe()
    assert described == ("adjoint+seminorm" if mode == "seminorm" else mode)
    # the command line's single key still wins over the group
    cfg = C.compose([f"gradient_mode={mode}", "model.gradient=direct", "adjoint.norm=default"])
    assert cfg.model.gradient == "direct"


def test_unknown_gradient_mode_is_one_error_line(capsys, tmp_path):
    from nodebench.cli import main

    code = main(["train", "gradient_mode=backsolve", f"paths.runs={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nodebench: error:")
    assert "backsolve" in err[0] and not any(tmp_path.iterdir())


def test_preset_runs_both_parts_the_tolerance_stage_and_the_report(tmp_path, monkeypatch):
    from nodebench.reproduce import main as reproduce

    monkeypatch.setenv("NODEBENCH_RUNS", str(tmp_path / "runs"))
    code = reproduce(["gradient_modes", "profile=tiny", "gradient_mode=direct,mali",
                      "gradients.tolerance.modes=[direct,mali]",
                      "gradients.tolerance.tols=[1.0e-2,1.0e-5]"])
    assert code == 0
    runs = tmp_path / "runs" / "gradient_modes-tiny"
    results = tmp_path / "runs" / "gradients-tiny-results"
    # one run per part, mode and seed, named by dataset and mode; both gradient checks recorded
    for dataset in ("synthetic", "annulus"):
        for mode in ("direct", "mali"):
            summary = json.loads((runs / f"{dataset}_{mode}_s0" / "summary.json").read_text())
            assert summary["status"] == "ok" and G.mode_of(summary["config"]) == mode
            assert summary["dataset"] == dataset and summary["threads"] == 1
            assert 0 <= summary["grad_rel_error_init"] < 1
            assert 0 <= summary["grad_rel_error_final"] < 1
    tol = pd.read_csv(results / "tolerance.csv")
    assert len(tol) == 2 * 2 * 2 and tol["failure"].isna().all()  # 2 cases x 2 modes x 2 tols
    # the gradient converges to the float64 1e-9 reference as the tolerance tightens
    for (_, mode), g in tol.groupby(["model", "mode"]):
        errors = g.sort_values("tol")["rel_error"].tolist()
        assert errors[0] < errors[1], mode
    # direct backprop calls f in the forward pass only; MALI in both
    direct = tol[tol["mode"] == "direct"]
    assert (direct["nfe_backward"] == 0).all() and (direct["nfe_forward"] > 0).all()
    assert (tol[tol["mode"] == "mali"]["nfe_backward"] > 0).all()
    text = (results / "tables.md").read_text()
    assert "annulus" in text and "tol 1e-05" in text and "Reproduction wall time" in text
    assert text.index("tol 1e-02") < text.index("tol 1e-05")  # loose to tight
    mnist = pd.read_csv(results / "mnist.csv")
    assert mnist["mode"].tolist() == ["direct", "mali"]
    toys = pd.read_csv(results / "toys.csv")
    assert toys["mode"].tolist() == ["direct", "mali"]
    assert toys["runs ok / failed"].tolist() == ["1 / 0", "1 / 0"]
    for name in ("gradient_error_vs_tolerance.png", "error_vs_time.png"):
        assert (results / name).stat().st_size > 0
    schedule = json.loads((results / "reproduce.json").read_text())
    assert schedule["preset"] == "gradient_modes" and schedule["jobs"] == 2
    # the report again from the same records: byte-identical
    before = text
    R.report(runs, results, "tiny")
    assert (results / "tables.md").read_text() == before


def test_sweep_parts_are_planned_one_multirun_each():
    from nodebench.reproduce import plan

    parts, sweep_dir, results, report = plan("gradient_modes", ["profile=tiny"])
    assert len(parts) == 2 and report["train"]
    assert "dataset=synthetic" in parts[0] and "dataset=annulus" in parts[1]
    assert all(f"hydra.sweep.dir={sweep_dir}" in p for p in parts)
    assert "seed=0,1" in plan("gradient_modes", [])[0][1]  # the cpu budget: 2 toy seeds
    # a sweep key on the command line replaces it in every part
    parts, *_ = plan("gradient_modes", ["profile=tiny", "gradient_mode=aca"])
    assert all("gradient_mode=aca" in p and p.count("gradient_mode=aca") == 1 for p in parts)
    assert str(results).endswith("gradients-tiny-results")


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
