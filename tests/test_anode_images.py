"""The ``dupont2019_images`` preset (NODE vs ANODE on MNIST at equal wall time, Dupont et al.
2019 section 5) and its report: composition, a tiny reproduction on synthetic images, and the
report's comparisons at equal epochs and equal wall time on hand-made run records."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from nodebench import config as C
from nodebench.cli import main
from nodebench.experiments import anode_images_report as R


def test_arms_compose_parameter_matched():
    params = {}
    for arm, model, epochs in (("node", "node_conv", 3), ("anode", "anode_conv", 14)):
        cfg = C.compose(["experiment=dupont2019_images", f"arm={arm}", "dataset=synthetic"])
        assert cfg.model.name == model and cfg.trainer.epochs == epochs
        assert cfg.trainer.max_batches == 160 and cfg.optim.name == "adam_onecycle"
        model_ = C.build_model(cfg, inputs=C.model_inputs(cfg))
        params[model] = sum(p.numel() for p in model_.parameters())
    assert params == {"node_conv": 84395, "anode_conv": 84816}     # Dupont et al.'s counts
    assert C.compose(["experiment=dupont2019_images"]).dataset.name == "mnist"


@pytest.mark.slow
def test_tiny_reproduction_writes_the_report(runs_dir):
    assert main(["reproduce", "dupont2019_images", "profile=tiny"]) == 0
    runs = runs_dir / "dupont2019_images-tiny"
    results = runs_dir / "anode/images-tiny-results"
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert sorted(s["model"] for s in summaries) == ["anode_conv", "node_conv"]
    assert all(s["status"] == "ok" and s["epochs_done"] == 2 for s in summaries)
    for name in ("README.md", "images.md", "images.csv", "images_runs.csv", "images_curves.csv",
                 "accuracy_vs_time.png", "accuracy_vs_epoch.png"):
        assert (results / name).stat().st_size > 0, name
    curves = pd.read_csv(results / "images_curves.csv")
    assert len(curves) == 4 and (curves.groupby("model").elapsed_s.is_monotonic_increasing).all()
    readme = (results / "README.md").read_text()
    assert "At equal wall time" in readme and "At equal epochs (2)" in readme


def _record(root, model, seed, accs, epoch_s, iter_s, nfe):
    run = root / f"{model}_s{seed}"
    run.mkdir(parents=True)
    pd.DataFrame({"epoch": range(1, len(accs) + 1), "test_error": [100 - a for a in accs],
                  "epoch_time_s": epoch_s, "eval_time_s": 0.0, "iterations": 10,
                  "nfe_forward": nfe, "nfe_backward": nfe}).to_csv(run / "metrics.csv",
                                                                   index=False)
    summary = {"model": model, "seed": seed, "status": "ok", "params": 1, "test_error":
               100 - accs[-1], "epochs_done": len(accs), "iterations": 10 * len(accs),
               "nfe_forward": nfe, "nfe_backward": nfe, "nfe_eval": nfe, "iter_s": iter_s,
               "wall_time_s": epoch_s * len(accs), "device": "cpu", "threads": 1,
               "load_start": [0.1, 0, 0], "load_end": [0.2, 0, 0], "train_size": 100,
               "test_size": 10, "solver_desc": "dopri5", "gradient": "adjoint",
               "config": {"trainer": {"batch_size": 10, "max_batches": 10},
                          "optim": {"name": "adam"}}}
    (run / "summary.json").write_text(json.dumps(summary))


def test_equal_time_and_equal_epoch_comparisons(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):     # NODE: 2 epochs of 100 s; ANODE: 4 epochs of 50 s (same 200 s)
        _record(runs, "node_conv", seed, [90.0, 92.0], 100.0, 10.0, 40.0)
        _record(runs, "anode_conv", seed, [91.0, 93.0, 94.5, 95.5], 50.0, 5.0, 20.0)
    assert R.report(runs, tmp_path / "out", "cpu")
    table = pd.read_csv(tmp_path / "out" / "images.csv")
    anode = table.set_index("model").loc["ANODE"]
    assert anode["test acc. % (final)"] == "95.50 ± 0.00"
    assert anode["test acc. % at epoch 2"] == "93.00 ± 0.00"    # ANODE's epoch 2, not its last
    assert anode["test acc. % at 200 s"] == "95.50 ± 0.00"
    text = (tmp_path / "out" / "README.md").read_text()
    assert "target at least 94 %: holds" in text
    assert "+3.50 points (target at least +1.0: holds)" in text
    assert "2.00x fewer for ANODE: holds" in text
    assert not R.report(tmp_path / "empty", tmp_path / "none", "cpu")
    assert not (tmp_path / "none").exists()
