"""RNODE / TayNODE penalties as an option of the Table-1 ODE-Net (``model.penalties``), through the
one trainer (``pending_penalties`` / :func:`nodebench.regularisers.take_penalties`), and the
``finlay2020_regularisation`` preset with its report (synthetic data)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from nodebench import config as C
from nodebench.cli import main
from nodebench.instruments import NFECounter
from nodebench.models import ODEBlock
from nodebench.regularisers import take_penalties

TINY = ["dataset=synthetic", "trainer.epochs=1", "trainer.max_batches=2",
        "trainer.batch_size=8", "trainer.eval_batch_size=64", "trainer.progress=false",
        "dataset.test_size=64", "solver.rtol=0.1", "solver.atol=0.1"]


def build(*overrides, seed=0):
    cfg = C.compose(["model=odenet", "dataset=synthetic", *overrides])
    torch.manual_seed(seed)
    return C.build_model(cfg, inputs=C.model_inputs(cfg))


class Pending(nn.Module):
    def __init__(self, term, values):
        super().__init__()
        self.pending_penalties = (torch.tensor(term), values)


def test_take_penalties_sums_merges_and_resets():
    a, b = Pending(1.5, {"kinetic": 2.0}), Pending(0.5, {"kinetic": 1.0, "taylor": 3.0})
    c = nn.Linear(1, 1)   # no pending_penalties attribute at all
    model = nn.Sequential(a, nn.Sequential(b, c))
    term, values = take_penalties(model)
    assert float(term) == 2.0 and values == {"kinetic": 3.0, "taylor": 3.0}
    assert a.pending_penalties is None and b.pending_penalties is None
    assert take_penalties(model) == (None, {})


def test_zero_weights_are_todays_model():
    plain, zero = build(), build("model.penalties.kinetic=0.0")
    block = next(m for m in zero.modules() if isinstance(m, ODEBlock))
    assert block.penalties is None and block.__dict__["_regularised"] is None
    assert sum(p.numel() for p in zero.parameters()) == 208_266
    assert list(plain.state_dict()) == list(zero.state_dict())
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    zero.train()
    assert torch.equal(plain(x), zero(x))
    assert take_penalties(zero) == (None, {})
    # with penalties: same parameters and state_dict keys (the wrapper is not registered)
    pen = build("model.penalties.kinetic=0.01")
    assert list(pen.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in pen.parameters()) == 208_266


def test_kinetic_changes_the_gradient_not_the_counting():
    """rk4 (fixed grid: the same steps with or without the penalty channels): the NFE of one
    forward and backward are the same; the penalty term changes the gradient; eval mode solves
    plainly (same output as the plain model, nothing pending)."""
    fixed = ["solver=rk4", "solver.step_size=0.25", "model.gradient=direct"]
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    grads, nfes = [], []
    for weight in (0.0, 0.01):
        model = build(*fixed, f"model.penalties.kinetic={weight}")
        model.train()
        nfe = NFECounter(model)
        with nfe.phase_("forward"):
            loss = nn.functional.cross_entropy(model(x), y)
            term, values = take_penalties(model)
        if weight:
            assert term is not None and term.requires_grad and values["kinetic"] > 0
            assert float(term.detach()) == pytest.approx(weight * values["kinetic"], rel=1e-5)
            loss = loss + term
        else:
            assert term is None
        with nfe.phase_("backward"):
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
        nfes.append(nfe.take("forward"))
        nfe.remove()
    assert nfes[0] == nfes[1] == 16   # 4 rk4 steps x 4 evaluations
    diff = sum(float((a - b).abs().sum()) for a, b in zip(*grads))
    assert diff > 1e-6
    model.eval()
    with torch.no_grad():
        plain = build(*fixed).eval()
        assert torch.allclose(model(x), plain(x))
    assert take_penalties(model) == (None, {})


def test_taylor_and_frobenius_with_the_adjoint():
    model = build("model.penalties.taylor=1e-5", "model.penalties.frobenius=1e-6",
                  "solver.rtol=0.1", "solver.atol=0.1")
    model.train()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    out = model(x)
    term, values = take_penalties(model)
    assert set(values) == {"frobenius", "taylor"}
    (out.sum() + term).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_check_reference_is_plain_and_leaves_nothing_pending():
    from nodebench.validity import gradient_error, reference_model

    model = build("model.penalties.kinetic=1e-5", "solver.rtol=0.1", "solver.atol=0.1")
    ref = reference_model(model)
    assert all(b.penalties is None for b in ref.modules() if isinstance(b, ODEBlock))
    assert any(b.penalties is not None for b in model.modules() if isinstance(b, ODEBlock))
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    found = gradient_error(model, x, torch.tensor([0, 1]), tol=1e-4)
    assert found["failure"] is None and found["cosine"] > 0.5   # rtol 0.1: a loose solve
    assert take_penalties(model) == (None, {})


def test_train_writes_penalties(runs_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code = main(["train", *TINY, "model=odenet", "model.penalties.kinetic=1e-5",
                 "model.penalties.frobenius=1e-5"])
    assert code == 0
    path = next(runs_dir.rglob("summary.json"))
    s = json.loads(path.read_text())
    metrics = pd.read_csv(path.parent / "metrics.csv")
    assert list(metrics.columns[-2:]) == ["penalty_kinetic", "penalty_frobenius"]
    assert metrics.penalty_kinetic.iloc[0] > 0 and s["penalty_kinetic"] > 0
    assert s["penalty_frobenius"] > 0 and "penalty_taylor" not in s
    # train_loss is the task's cross-entropy alone (about log 10 at the start), not the sum
    assert 1.5 < s["train_loss"] < 3.5
    acc = EventAccumulator(str(path.parent))
    acc.Reload()
    assert len(acc.Scalars("train/penalty_kinetic")) == 2


def test_runs_without_penalties_keep_their_columns(runs_dir):
    from nodebench.train import METRIC_FIELDS

    assert main(["train", *TINY, "model=odenet"]) == 0
    path = next(runs_dir.rglob("summary.json"))
    assert list(pd.read_csv(path.parent / "metrics.csv").columns) == METRIC_FIELDS
    assert not [k for k in json.loads(path.read_text()) if k.startswith("penalty_")]


@pytest.mark.parametrize("overrides,message", [
    (["model.penalties.kinetic=-1"], "penalty weight kinetic must be a number >= 0"),
    (["model.penalties.order=5", "model.penalties.taylor=1"], "taylor order must be one of"),
    (["+model.penalties.nosuch=1"], "unknown model.penalties key(s) nosuch"),
])
def test_bad_penalties_exit_2(runs_dir, capsys, overrides, message):
    code = main(["train", *TINY, "model=odenet", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("nodebench: error:") and message in err[0]
    assert not runs_dir.exists() or not any(runs_dir.rglob("*"))   # nothing written


def test_penalty_settings_compose():
    for name, expect in (("none", 0.0), ("rnode", 2.17e-6), ("taynode", 0.0)):
        cfg = C.compose(["experiment=finlay2020_regularisation", f"penalties={name}"])
        assert cfg.model.penalties.kinetic == expect and cfg.model.name == "odenet"
        assert cfg.dataset.name == "mnist" and cfg.dataset.train_size == 32000


@pytest.mark.slow
def test_tiny_reproduction_writes_the_report(runs_dir):
    assert main(["reproduce", "finlay2020_regularisation", "profile=tiny"]) == 0
    runs = runs_dir / "finlay2020_regularisation-tiny"
    results = runs_dir / "regularisation/mnist-tiny-results"
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert len(summaries) == 3 and all(s["status"] == "ok" for s in summaries)
    assert sum("penalty_kinetic" in s for s in summaries) == 1
    assert sum("penalty_taylor" in s for s in summaries) == 1
    for name in ("README.md", "regularisation.md", "regularisation.csv",
                 "regularisation_runs.csv", "error_vs_time.png", "error_vs_test_nfe.png",
                 "table.md", "table.csv"):
        assert (results / name).stat().st_size > 0, name
    table = pd.read_csv(results / "regularisation.csv")
    assert list(table.setting) == ["none", "RNODE (kinetic 2.17e-06, frobenius 4.34e-06)",
                                   "TayNODE K=2 (1e-05)"]
    assert {"test error %", "s / train iter", "test NFE", "valid"} <= set(table.columns)
    readme = (results / "README.md").read_text()
    assert "Budget (profile `tiny`): 2 training iterations" in readme
    assert "RNODE (Finlay et al. 2020" in readme and "TayNODE (Kelly et al. 2020" in readme
    assert readme.count("seconds per training iteration") >= 2   # one verdict per setting


def test_cnf_penalty_settings_compose():
    for name, kinetic, taylor in (("none", 0.0, 0.0), ("rnode_cnf", 0.0025, 0.0),
                                  ("taynode_cnf", 0.0, 0.0025)):
        cfg = C.compose(["experiment=finlay2020_regularisation_cnf", f"penalties={name}"])
        assert cfg.model.name == "cnf" and cfg.model.units == 64
        assert cfg.model.penalties.kinetic == kinetic and cfg.model.penalties.taylor == taylor
        assert cfg.dataset.name == "two_moons" and cfg.solver.rtol == 1e-5
        C.validate(cfg)


@pytest.mark.slow
def test_tiny_cnf_reproduction_reports_the_nll(runs_dir):
    assert main(["reproduce", "finlay2020_regularisation_cnf", "profile=tiny"]) == 0
    runs = runs_dir / "finlay2020_regularisation_cnf-tiny"
    results = runs_dir / "regularisation/cnf-tiny-results"
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    assert len(summaries) == 3 and all(s["status"] == "ok" for s in summaries)
    assert sum(s.get("penalty_kinetic") is not None for s in summaries) == 1
    table = pd.read_csv(results / "regularisation.csv")
    assert list(table.setting) == ["none", "RNODE (kinetic 0.0025, frobenius 0.005)",
                                   "TayNODE K=2 (0.0025)"]
    assert {"test NLL (nats)", "s / train iter", "test NFE"} <= set(table.columns)
    readme = (results / "README.md").read_text()
    assert "planar CNF (two_moons" in readme and "training points (two_moons)" in readme
    assert "nodebench reproduce finlay2020_regularisation_cnf" in readme


def test_plan_gives_the_profiles_overrides_before_the_command_lines():
    from nodebench.reproduce import plan

    (args,), _, results, report = plan("finlay2020_regularisation", ["profile=tiny"])
    assert "dataset=synthetic" in args and "penalties=none,rnode,taynode" in args
    assert "hydra/launcher=local" in args and report["builder"].endswith("regularisation_report.report")
    (args,), _, results, _ = plan("finlay2020_regularisation", ["profile=tiny", "dataset=mnist"])
    assert "dataset=synthetic" not in args and args[-1] == "dataset=mnist"
    (args,), _, results, _ = plan("finlay2020_regularisation", [])
    assert "dataset=synthetic" not in args and "seed=0,1" in args
    assert str(results) == "results/regularisation/mnist"


def test_verdicts_follow_the_numbers():
    from nodebench.experiments.regularisation_report import setting_name, verdicts

    def rec(setting, nfe, iter_s, test_nfe, eval_s, status="ok"):
        return {"setting": setting, "status": status, "nfe_forward": nfe, "nfe_backward": nfe,
                "iter_s": iter_s, "nfe_eval": test_nfe, "eval_time_s": eval_s,
                "wall_time_s": iter_s * 10}

    base = [rec("none", 30, 1.0, 20, 1.0), rec("none", 30, 1.0, 20, 1.0)]
    fast = verdicts(base + [rec("A", 15, 0.8, 10, 0.5)])
    slow = verdicts(base + [rec("B", 15, 2.0, 10, 1.2)])
    assert "training NFE saving holds in time" in fast[0] and "holds in evaluation time" in fast[0]
    assert "does not hold in time" in slow[0] and "does not show in evaluation time" in slow[0]
    assert "0.50x" in fast[0] and "2.00x" in slow[0]
    assert "No ok baseline" in verdicts([rec("none", 30, 1.0, 20, 1.0, "failed")])[0]
    assert setting_name({"kinetic": 0.0, "frobenius": 0.0, "taylor": 0.0}) == "none"
    assert setting_name({"kinetic": 1e-3}) == "penalty (kinetic 0.001)"


def test_resumed_penalised_run_matches_the_uninterrupted_one(runs_dir, monkeypatch):
    """Stopped right after epoch 1's checkpoint and run again: the same metrics.csv, penalty
    columns included (the Frobenius noise comes from the checkpointed torch RNG)."""
    import nodebench.train as T

    args = ["train", *TINY, "trainer.epochs=2", "model=odenet", "model.penalties.kinetic=1e-5",
            "model.penalties.frobenius=1e-5", "trainer.instruments.gradient_error=false"]
    whole, cut = runs_dir / "whole", runs_dir / "cut"
    assert main([*args, f"hydra.run.dir={whole}"]) == 0
    save = T.save_checkpoint

    def save_then_stop(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", save_then_stop)
    assert main([*args, f"hydra.run.dir={cut}"]) == 130   # "nodebench: interrupted"
    monkeypatch.setattr(T, "save_checkpoint", save)
    assert (cut / T.CHECKPOINT).exists() and not (cut / "summary.json").exists()
    assert main([*args, f"hydra.run.dir={cut}"]) == 0
    keep = ["epoch", "train_loss", "test_error", "nfe_forward", "penalty_kinetic",
            "penalty_frobenius"]
    pd.testing.assert_frame_equal(pd.read_csv(cut / "metrics.csv")[keep],
                                  pd.read_csv(whole / "metrics.csv")[keep], check_exact=True)
