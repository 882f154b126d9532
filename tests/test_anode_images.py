"""The ``dupont2019_images`` preset (NODE vs ANODE on MNIST at equal wall time, Dupont et al.
2019 section 5) and its report: composition, a tiny reproduction on synthetic images, and the
report's comparisons at equal epochs and equal wall time on hand-made run records."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from nodebench import config as C
from nodebench.cli import main
from nodebench.errors import ConfigError
from nodebench.experiments import anode_images_report as R
from nodebench.train import onecycle_restarts


def test_arms_compose_parameter_matched():
    params = {}
    for arm, model, epochs, cycles in (("node", "node_conv", 5, [1]),
                                       ("anode", "anode_conv", 12, [1])):
        cfg = C.compose(["experiment=dupont2019_images", f"arm={arm}", "dataset=synthetic"])
        assert cfg.model.name == model and cfg.trainer.epochs == epochs
        assert list(cfg.optim.scheduler.cycles) == cycles
        assert cfg.trainer.max_batches == 160 and cfg.optim.name == "adam_onecycle_restarts"
        model_ = C.build_model(cfg, inputs=C.model_inputs(cfg))
        params[model] = sum(p.numel() for p in model_.parameters())
    assert params == {"node_conv": 84395, "anode_conv": 84816}     # Dupont et al.'s counts
    assert C.compose(["experiment=dupont2019_images"]).dataset.name == "mnist"


def _rates(make, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=3e-3)
    sched, rates = make(opt), []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_one_cycle_equals_torch_onecycle_lr():
    ours = _rates(lambda o: onecycle_restarts(o, 480), 480)
    torch_ = _rates(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=3e-3, total_steps=480, pct_start=0.2, div_factor=25.0,
        final_div_factor=1e4), 480)
    assert ours == pytest.approx(torch_, rel=1e-12, abs=1e-15)


def test_two_cycles_anneal_then_restart_at_their_own_peak():
    rates = _rates(lambda o: onecycle_restarts(o, 1760, cycles=[6, 5], peaks=[1.0, 0.5]), 1760)
    first = _rates(lambda o: onecycle_restarts(o, 960), 960)
    assert rates[:960] == pytest.approx(first, rel=1e-12)       # cycle 1: a 960-step one-cycle
    assert rates[959] == pytest.approx(3e-3 / 25 / 1e4)           # annealed at its end
    assert rates[960] == pytest.approx(1.5e-3 / 25)               # restart from peak / div
    assert max(rates[960:]) == pytest.approx(1.5e-3)              # the second peak: 0.5 x lr
    assert rates[-1] == pytest.approx(1.5e-3 / 25 / 1e4)


@pytest.mark.parametrize("kwargs", [{"cycles": [1, 1], "peaks": [1.0]}, {"cycles": [0]},
                                    {"pct_start": 1.0}, {"cycles": [1, 1000]}])
def test_onecycle_restarts_rejects_bad_settings(kwargs):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    kwargs = {"peaks": [1.0] * len(kwargs.get("cycles", [1])), **kwargs}
    with pytest.raises(ConfigError):
        onecycle_restarts(opt, 100, **kwargs)


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
    # --report-only: the verdict quiet-run appends after the command ends is quoted by the
    # rebuilt report; nothing retrains (run records untouched), reproduce.json is kept.
    verdict = "quiet-run: QUIET: 'make reproduce-anode-images' exit 0, wall 9 s, load 0.1"
    (results / "quiet-run.log").write_text("started\n" + verdict + "\n")
    records = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    schedule = (results / "reproduce.json").read_text()
    assert verdict not in readme
    assert main(["reproduce", "dupont2019_images", "profile=tiny", "--report-only"]) == 0
    assert verdict in (results / "README.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == records
    assert (results / "reproduce.json").read_text() == schedule


def _record(root, model, seed, accs, epoch_s, iter_s, nfe):
    """A run record; ``nfe``: forward (= backward) NFE per iteration, one number for every
    epoch or one per epoch (the summary holds the last)."""
    run = root / f"{model}_s{seed}"
    run.mkdir(parents=True)
    pd.DataFrame({"epoch": range(1, len(accs) + 1), "test_error": [100 - a for a in accs],
                  "epoch_time_s": epoch_s, "eval_time_s": 0.0, "iterations": 10,
                  "nfe_forward": nfe, "nfe_backward": nfe}).to_csv(run / "metrics.csv",
                                                                   index=False)
    nfe = nfe[-1] if isinstance(nfe, list) else nfe
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
    assert anode["test acc. % at equal wall time"] == "95.50 ± 0.00"
    text = (tmp_path / "out" / "README.md").read_text()
    assert "target at least 94 %: holds" in text
    assert "+3.50 points (target at least +1.0: holds)" in text
    assert "2.00x fewer for ANODE: holds" in text
    assert not R.report(tmp_path / "empty", tmp_path / "none", "cpu")
    assert not (tmp_path / "none").exists()


def test_equal_time_is_read_per_seed_at_its_shorter_runs_end(tmp_path):
    """Seed 0's NODE run ends at 220 s, seed 1's at 200 s: each seed is compared at its own NODE
    run's end, so seed 0's NODE counts with its last (annealed) epoch, not the one before 200 s
    (the shortest end over all runs would read 90 % there)."""
    runs = tmp_path / "runs"
    _record(runs, "node_conv", 0, [90.0, 92.0], 110.0, 10.0, 40.0)       # ends at 220 s
    _record(runs, "node_conv", 1, [90.0, 92.0], 100.0, 10.0, 40.0)       # ends at 200 s
    _record(runs, "anode_conv", 0, [91.0, 92.0, 92.5, 95.5], 55.0, 5.0, 20.0)   # 220 s: epoch 4
    _record(runs, "anode_conv", 1, [91.0, 92.0, 92.5, 95.5], 60.0, 5.0, 20.0)   # 200 s: epoch 3
    assert R.report(runs, tmp_path / "out", "cpu")
    table = pd.read_csv(tmp_path / "out" / "images.csv").set_index("model")
    assert table.loc["NODE", "test acc. % at equal wall time"] == "92.00 ± 0.00"
    assert table.loc["ANODE", "test acc. % at equal wall time"] == "94.00 ± 2.12"
    text = (tmp_path / "out" / "README.md").read_text()
    assert "(per seed, the end of its shorter run: 220 s, 200 s)" in text
    assert "+2.00 points (target at least +1.0: holds)" in text
    assert "ANODE after epoch 3, 4; NODE after epoch 2." in text


def test_nfe_compared_at_equal_wall_time_equal_epochs_and_the_end(tmp_path):
    """ANODE's NFE grow over its longer run: fewer than NODE's at equal epochs, more at equal wall
    time and at each run's end; the report says each, from the per-epoch metrics."""
    runs = tmp_path / "runs"
    for seed in (0, 1):     # NODE: 2 epochs of 100 s; ANODE: 4 epochs of 50 s
        _record(runs, "node_conv", seed, [90.0, 92.0], 100.0, 10.0, [20.0, 25.0])
        _record(runs, "anode_conv", seed, [91.0, 93.0, 94.5, 95.5], 50.0, 5.0,
                [10.0, 12.0, 20.0, 30.0])
    assert R.report(runs, tmp_path / "out", "cpu")
    table = pd.read_csv(tmp_path / "out" / "images.csv").set_index("model")
    assert table.loc["ANODE", "NFE / iter at epoch 2"] == "24.0 ± 0.0"       # 2 x 12
    assert table.loc["ANODE", "NFE / iter at equal wall time"] == "60.0 ± 0.0"   # epoch 4 at 200 s
    assert table.loc["NODE", "NFE / iter at equal wall time"] == "50.0 ± 0.0"
    text = (tmp_path / "out" / "README.md").read_text()
    assert ("at equal wall time: ANODE 60.0 vs NODE 50.0 (0.83x fewer for ANODE: does not hold)"
            "; at equal epochs (2): ANODE 24.0 vs NODE 50.0 (2.08x fewer for ANODE: holds)") in text
    assert "at each run's end (its last epoch; the arms' epochs differ): ANODE 60.0" in text
