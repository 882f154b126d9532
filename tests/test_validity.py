"""Solve validity and gradient error (issue 13): known answers on a linear ODE, a loose solve
flagged invalid, the gradient error of the reference against itself and of the adjoint as the
tolerance tightens, and the keys `nodebench train` writes."""

import json

import pandas as pd
import pytest
import torch
from torch import nn

from nodebench.cli import main
from nodebench.models.blocks import Dynamics, ODEBlock
from nodebench.solvers import Gradient, Solver, odesolve
from nodebench.validity import (
    DEFAULT_THRESHOLD,
    gradient_error,
    model_validity,
    relative_error,
    solve_validity,
)

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)
ROTATION = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)   # A^2 = -I


class Linear(Dynamics):
    """dy/dt = A y on (B, n) states; y(t) = y0 expm(A t)^T."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a.clone())

    def forward(self, t, y):
        return y @ self.a.T


class MLP(Dynamics):
    def __init__(self, dim: int = 3, hidden: int = 16, scale: float = 2.0) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden).double()
        self.l2 = nn.Linear(hidden, dim).double()
        self.scale = scale

    def forward(self, t, y):
        tt = t.to(y.dtype).expand(y.shape[0], 1)
        return self.scale * self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=1))))


def exact(a, y0, t1=1.0):
    return y0 @ torch.linalg.matrix_exp(a * t1).T


def test_relative_error():
    x = torch.tensor([3.0, 4.0], dtype=F64)
    assert relative_error(x * 1.1, x) == pytest.approx(0.1, rel=1e-12)
    assert relative_error(torch.ones(2), torch.zeros(2)) == pytest.approx(2 ** 0.5)
    with pytest.raises(ValueError):
        relative_error(torch.ones(2), torch.ones(3))


def test_euler_round_trip_and_reference_error_are_the_analytic_ones():
    # Euler with h = 1/2 on the rotation: forward two steps of (I + hA), back two of (I - hA), so
    # the round trip multiplies y0 by (I - h^2 A^2)^2 = (1 + h^2)^2 I: relative error 0.5625;
    # the reference error is that of (I + hA)^2 against expm(A).
    h = 0.5
    torch.manual_seed(0)
    y0 = torch.randn(5, 2, dtype=F64)
    eye = torch.eye(2, dtype=F64)
    y1 = y0 @ torch.linalg.matrix_power(eye + h * ROTATION, 2).T
    want_ref = (torch.linalg.vector_norm(y1 - exact(ROTATION, y0))
                / torch.linalg.vector_norm(exact(ROTATION, y0))).item()
    v = solve_validity(Linear(ROTATION), y0, T01, Solver("euler", step_size=h))
    assert v.roundtrip_error == pytest.approx((1 + h * h) ** 2 - 1, rel=1e-12)
    assert v.reference_error == pytest.approx(want_ref, abs=1e-7)   # the reference is 1e-8-exact
    assert v.valid is False and v.failure is None and v.threshold == DEFAULT_THRESHOLD


def test_tight_dopri5_is_valid_and_matches_the_closed_form():
    torch.manual_seed(0)
    a = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)    # a decaying spiral
    y0 = torch.randn(4, 2, dtype=F64)
    solver = Solver("dopri5", rtol=1e-10, atol=1e-10)
    y1 = odesolve(Linear(a), y0, T01, solver, Gradient("direct"))[-1]
    v = solve_validity(Linear(a), y0, T01, solver)
    assert v.reference_error == pytest.approx(relative_error(y1, exact(a, y0)), abs=1e-7)
    assert v.reference_error < 1e-7 and v.roundtrip_error < 1e-7 and v.valid is True


def test_loose_tolerance_is_worse_and_flagged():
    torch.manual_seed(0)
    fast = 10.0 * ROTATION
    y0 = torch.randn(4, 2, dtype=F64)
    loose = solve_validity(Linear(fast), y0, T01, Solver("dopri5", rtol=1e-2, atol=1e-2))
    tight = solve_validity(Linear(fast), y0, T01, Solver("dopri5", rtol=1e-9, atol=1e-9))
    assert loose.reference_error > 10 * tight.reference_error
    assert loose.roundtrip_error > 10 * tight.roundtrip_error
    strict = solve_validity(Linear(fast), y0, T01, Solver("dopri5", rtol=1e-2, atol=1e-2),
                            threshold=1e-12)
    assert strict.valid is False and tight.valid is True


def test_float32_run_gets_a_float64_reference():
    torch.manual_seed(0)
    y0 = torch.randn(4, 2)
    func = Linear(ROTATION.float())
    v = solve_validity(func, y0, T01.float(), Solver("dopri5", rtol=1e-6, atol=1e-6))
    want = relative_error(odesolve(func, y0, T01.float(), Solver("dopri5", rtol=1e-6, atol=1e-6),
                                   Gradient("direct"))[-1], exact(ROTATION, y0.double()))
    assert v.reference_error == pytest.approx(want, abs=1e-7)
    assert func.a.dtype == torch.float32                        # the run's dynamics untouched


def test_failed_solve_is_invalid_with_the_reason():
    torch.manual_seed(0)
    y0 = torch.randn(4, 2, dtype=F64)
    v = solve_validity(Linear(10.0 * ROTATION), y0, T01,
                       Solver("dopri5", rtol=1e-9, atol=1e-9, max_num_steps=2))
    assert v.valid is False and v.reference_error is None and v.roundtrip_error is None
    assert "max_num_steps" in v.failure


def test_model_validity_of_an_augmented_block():
    # The block's state is (B, 2 + 1): a zero channel the dynamics leave at zero; the round trip
    # of Euler h = 1/2 scales the rotated part by 1.5625, so the relative error is 0.5625.
    a = torch.zeros(3, 3, dtype=F64)
    a[:2, :2] = ROTATION
    block = ODEBlock(Linear(a), Solver("euler", step_size=0.5), Gradient("direct"), augment_dim=1)
    model = nn.Sequential(block, nn.Linear(3, 2).double())
    model.train()
    torch.manual_seed(0)
    found = model_validity(model, torch.randn(6, 2, dtype=F64))
    assert found["validity_roundtrip_error"] == pytest.approx(0.5625, rel=1e-12)
    assert found["valid"] is False and len(found["validity_blocks"]) == 1
    assert model.training                                        # mode restored
    assert model_validity(nn.Linear(2, 2), torch.randn(3, 2))["valid"] is None


def classifier(solver, gradient):
    torch.manual_seed(0)
    return nn.Sequential(ODEBlock(MLP(), solver, Gradient(gradient)), nn.Linear(3, 4).double())


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=F64, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_gradient_error_of_the_reference_against_itself_is_zero():
    model = classifier(Solver("dopri5", rtol=1e-9, atol=1e-9), "direct")
    found = gradient_error(model, *batch())
    assert found["rel_error"] < 1e-12 and found["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert all(p.grad is None for p in model.parameters())      # .grad left alone


def test_adjoint_gradient_error_shrinks_as_the_tolerance_tightens():
    errors = [gradient_error(classifier(Solver("dopri5", rtol=tol, atol=tol), "adjoint"),
                             *batch())["rel_error"] for tol in (1e-2, 1e-5, 1e-8)]
    assert errors[2] < errors[0] and errors[2] < 1e-5
    assert errors[1] < errors[0]


def test_rk4_gradient_error_is_its_discretisation_error():
    coarse = gradient_error(classifier(Solver("rk4", step_size=0.5), "direct"), *batch())
    fine = gradient_error(classifier(Solver("rk4", step_size=0.05), "direct"), *batch())
    assert fine["rel_error"] < coarse["rel_error"] and fine["cosine"] > 0.999


TINY = ["dataset=synthetic", "trainer.epochs=2", "trainer.max_batches=2",
        "trainer.batch_size=16", "trainer.eval_batch_size=64", "trainer.progress=false",
        "dataset.test_size=64", "trainer.instruments.validity_batch=16",
        "trainer.instruments.gradient_error_batch=4"]
KEYS = ("steps_accepted_forward", "steps_rejected_forward", "steps_accepted_backward",
        "steps_rejected_backward", "steps_accepted_eval", "steps_rejected_eval", "min_step",
        "rejected_fraction", "validity_reference_error", "validity_roundtrip_error", "valid",
        "grad_rel_error_init", "grad_cosine_init", "grad_rel_error_final", "grad_cosine_final")


@pytest.mark.parametrize("model", ["odenet", "rknet"])
def test_train_writes_steps_validity_and_gradient_error(runs_dir, model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", *TINY, f"model={model}", "trainer.instruments.gradient_error=true"]) == 0
    path = next(runs_dir.rglob("summary.json"))
    s = json.loads(path.read_text())
    assert s["status"] == "ok"
    for key in KEYS:
        assert s[key] is not None, key
    assert s["steps_accepted_forward"] > 0 and s["min_step"] > 0
    assert 0 <= s["rejected_fraction"] < 1
    # dopri5 without first_step: NFE = 2 + 6 (accepted + rejected) per solve, one solve per
    # iteration (means over the epoch's iterations, so the relation holds for the means too)
    assert s["nfe_forward"] == pytest.approx(
        2 + 6 * (s["steps_accepted_forward"] + s["steps_rejected_forward"]))
    assert s["nfe_eval"] == pytest.approx(
        2 + 6 * (s["steps_accepted_eval"] + s["steps_rejected_eval"]))
    if model == "odenet":   # adjoint
        assert s["steps_accepted_backward"] > 0
        assert s["nfe_backward"] == pytest.approx(
            2 + 6 * (s["steps_accepted_backward"] + s["steps_rejected_backward"]))
    else:                   # direct backprop: no backward solve
        assert s["steps_accepted_backward"] == 0 and s["steps_rejected_backward"] == 0
    assert isinstance(s["valid"], bool) and s["validity_threshold"] == DEFAULT_THRESHOLD
    for when in ("init", "final"):
        assert s[f"grad_rel_error_{when}"] >= 0 and -1 <= s[f"grad_cosine_{when}"] <= 1 + 1e-9
    metrics = pd.read_csv(path.parent / "metrics.csv")
    assert set(KEYS[:11]) <= set(metrics.columns) and metrics["valid"].notna().all()
    acc = EventAccumulator(str(path.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/steps_accepted_forward", "train/steps_rejected_forward",
            "train/steps_accepted_backward", "train/steps_rejected_backward",
            "eval/validity_reference_error", "eval/validity_roundtrip_error",
            "eval/valid", "epoch/min_step", "epoch/rejected_fraction"} <= tags
    assert len(acc.Scalars("train/steps_accepted_forward")) == 4   # 2 epochs x 2 iterations


def test_train_without_an_ode_block_writes_none(runs_dir):
    assert main(["train", *TINY, "model=mlp"]) == 0
    s = json.loads(next(runs_dir.rglob("summary.json")).read_text())
    assert s["status"] == "ok"
    for key in KEYS:
        assert s[key] is None, key


def test_checks_can_be_switched_off(runs_dir):
    assert main(["train", *TINY, "model=odenet", "trainer.instruments.steps=false",
                 "trainer.instruments.validity=false",
                 "trainer.instruments.gradient_error=false"]) == 0
    s = json.loads(next(runs_dir.rglob("summary.json")).read_text())
    assert s["status"] == "ok" and s["nfe_forward"] > 0
    for key in KEYS:
        assert s[key] is None, key


def test_validity_every_checks_every_nth_epoch_and_the_last(runs_dir):
    tiny = [a for a in TINY if not a.startswith("trainer.epochs=")]
    assert main(["train", *tiny, "model=odenet", "trainer.epochs=5",
                 "trainer.instruments.validity_every=2"]) == 0
    path = next(runs_dir.rglob("summary.json"))
    metrics = pd.read_csv(path.parent / "metrics.csv")
    assert list(metrics.epoch[metrics.valid.notna()]) == [2, 4, 5]
    assert metrics.validity_time_s.notna().sum() == 3
    assert isinstance(json.loads(path.read_text())["valid"], bool)   # from the last epoch


def test_validity_every_must_be_a_positive_integer(runs_dir, capsys):
    assert main(["train", *TINY, "model=odenet", "trainer.instruments.validity_every=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [("nodebench: error: trainer.instruments.validity_every must be a positive "
                    "integer, got 0")]
    assert not list(runs_dir.rglob("summary.json"))


def test_check_command_reproduces_the_trainers_checks_from_model_pt(runs_dir, capsys):
    """`nodebench check` rebuilds the initial weights from the seed and loads model.pt: its
    gradient errors and validity equal the trainer's own; --tols adds a validity sweep whose
    tightest tolerance passes; the report reads checks.json."""
    from nodebench.checks import loosest_valid
    from nodebench.report import collect

    assert main(["train", *TINY, "model=odenet", "trainer.instruments.gradient_error=true"]) == 0
    run = next(runs_dir.rglob("summary.json")).parent
    s = json.loads((run / "summary.json").read_text())
    assert main(["check", str(run), "--batch", "16", "--gradient-batch", "4",
                 "--tols", "1e-1,1e-7"]) == 0
    c = json.loads((run / "checks.json").read_text())
    for key in ("grad_rel_error_init", "grad_rel_error_final", "validity_reference_error",
                "validity_roundtrip_error"):
        assert c[key] == pytest.approx(s[key], rel=1e-5), key
    assert c["valid"] == s["valid"]
    tols = {r["tol"]: r for r in c["tolerances"]}
    assert tols[1e-7]["valid"] and tols[1e-7]["validity_roundtrip_error"] < 1e-3  # float32
    assert tols[1e-1]["validity_roundtrip_error"] > tols[1e-7]["validity_roundtrip_error"]
    assert loosest_valid(c["tolerances"]) in (1e-1, 1e-7)
    row = collect(runs_dir).iloc[0]
    assert row["grad_rel_error_init"] == pytest.approx(s["grad_rel_error_init"])


def test_loosest_valid_needs_every_tighter_tolerance_to_pass():
    from nodebench.checks import loosest_valid

    rows = [{"tol": 1e-1, "valid": True}, {"tol": 1e-2, "valid": False},
            {"tol": 1e-3, "valid": True}, {"tol": 1e-4, "valid": True}]
    assert loosest_valid(rows) == 1e-3
    assert loosest_valid([{"tol": 1e-3, "valid": False}]) is None


def test_check_command_bad_input_one_line_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nodebench: error:")
    assert main(["check", str(tmp_path), "--tols", "1e-3,abc"]) == 2
    assert not any(tmp_path.iterdir())   # nothing written
