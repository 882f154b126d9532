"""Step statistics (issue 13): accepted and rejected steps of every solve, counted from outside
the model by torchdiffeq's step callbacks, exact against an independent counter and against
NFE = 2 + 6 (accepted + rejected) per dopri5 solve."""

import copy
import warnings

import pytest
import torch
from torch import nn

from nodebench.instruments import NFECounter, StepCounter, merge_steps, steps_done
from nodebench.models.blocks import Dynamics, ODEBlock
from nodebench.solvers import Gradient, Solver, odesolve

F64 = torch.float64
T01 = torch.tensor([0.0, 1.0], dtype=F64)


class Decay(Dynamics):
    """dy/dt = -rate * exp(log_rate) * y, rate 30: stiff enough that a first step of 1 fails."""

    def __init__(self, rate: float = 30.0) -> None:
        super().__init__()
        self.rate = rate
        self.log_rate = nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, t, y):
        return -self.rate * torch.exp(self.log_rate) * y


class Recording(Decay):
    """Decay whose own class defines torchdiffeq's callbacks: an independent step log."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, float]] = []

    def callback_accept_step(self, t0, y0, dt):
        self.log.append(("accept", float(dt)))

    def callback_reject_step(self, t0, y0, dt):
        self.log.append(("reject", float(dt)))

    def callback_accept_step_adjoint(self, t0, y0, dt):
        self.log.append(("accept_adjoint", float(dt)))

    def callback_reject_step_adjoint(self, t0, y0, dt):
        self.log.append(("reject_adjoint", float(dt)))


class MLP(Dynamics):
    """A small time-dependent MLP field on (B, dim) states, float64."""

    def __init__(self, dim: int = 3, hidden: int = 16, scale: float = 2.0) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden).double()
        self.l2 = nn.Linear(hidden, dim).double()
        self.scale = scale

    def forward(self, t, y):
        tt = t.to(y.dtype).expand(y.shape[0], 1)
        return self.scale * self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=1))))


def solve(func, solver, gradient="direct", y0=None):
    y0 = torch.ones(4, dtype=F64) if y0 is None else y0
    return odesolve(func, y0, T01, solver, Gradient(gradient))


def count(log, kind):
    return sum(1 for k, _ in log if k == kind)


LOOSE_START = Solver("dopri5", rtol=1e-6, atol=1e-6, options={"first_step": 1.0})


def test_counts_equal_an_independent_counter_with_rejections():
    func = Recording()
    solve(func, LOOSE_START)                       # the class's own callbacks only
    independent = list(func.log)
    assert count(independent, "reject") > 0 and count(independent, "accept") > 0
    func.log.clear()
    steps = StepCounter(func)
    with steps.phase_("forward"):
        solve(func, LOOSE_START)
    got = steps.take("forward")
    assert func.log == independent                 # the class's callbacks still run, same solve
    assert got["accepted"] == count(independent, "accept")
    assert got["rejected"] == count(independent, "reject")
    assert got["grid"] == 0 and got["attempted"] == got["accepted"] + got["rejected"]
    assert got["min_step"] == min(dt for k, dt in independent if k == "accept")
    steps.remove()
    assert "callback_accept_step" not in func.__dict__   # the class's method is visible again
    func.log.clear()
    solve(func, LOOSE_START)
    assert func.log == independent


def test_first_step_given_nfe_is_1_plus_6_per_attempt():
    func = Decay()
    nfe = NFECounter(func)
    steps = StepCounter(func, phases=nfe)
    with nfe.phase_("forward"):
        solve(func, LOOSE_START)
    got = steps.take("forward")
    assert got["rejected"] > 0
    assert nfe.take("forward") == 1 + 6 * (got["accepted"] + got["rejected"])


@pytest.mark.parametrize("tol", [1e-2, 1e-5, 1e-8])
@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_dopri5_nfe_is_2_plus_6_per_step_forward_and_backward(tol, gradient):
    torch.manual_seed(0)
    block = ODEBlock(MLP(), Solver("dopri5", rtol=tol, atol=tol), Gradient(gradient))
    x = torch.randn(5, 3, dtype=F64)
    nfe = NFECounter(block)
    steps = StepCounter(block, phases=nfe)
    with nfe.phase_("forward"):
        loss = block(x).square().sum()
    with nfe.phase_("backward"):
        loss.backward()
    fwd, bwd = steps.take("forward"), steps.take("backward")
    assert fwd["accepted"] > 0
    assert nfe.take("forward") == 2 + 6 * (fwd["accepted"] + fwd["rejected"])
    if gradient == "adjoint":
        assert bwd["accepted"] > 0
        assert nfe.take("backward") == 2 + 6 * (bwd["accepted"] + bwd["rejected"])
    else:
        assert bwd["attempted"] == 0 and nfe.take("backward") == 0


def test_adjoint_backward_counts_equal_an_independent_counter():
    adjoint = Solver("dopri5", rtol=1e-7, atol=1e-7, options={"first_step": 1.0})

    def run(func):
        y0 = torch.ones(4, dtype=F64, requires_grad=True)
        solve(func, adjoint, "adjoint", y0)[-1].sum().backward()

    func = Recording()
    run(func)
    independent = list(func.log)
    assert count(independent, "accept_adjoint") > 0
    func.log.clear()
    steps = StepCounter(func)
    with steps.phase_("train"):
        run(func)
    got = steps.take("train")                      # forward and backward solves in one phase
    assert func.log == independent
    assert got["accepted"] == count(independent, "accept") + count(independent, "accept_adjoint")
    assert got["rejected"] == count(independent, "reject") + count(independent, "reject_adjoint")


@pytest.mark.parametrize("h,n", [(0.25, 4), (0.5, 2), (1.0, 1)])
def test_fixed_step_methods_count_grid_steps_without_warnings(h, n):
    torch.manual_seed(0)
    block = ODEBlock(MLP(), Solver("rk4", step_size=h), Gradient("adjoint"))
    nfe = NFECounter(block)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = StepCounter(block, phases=nfe)      # silences torchdiffeq's callback warning only
        with nfe.phase_("forward"):
            loss = block(torch.randn(2, 3, dtype=F64)).sum()
        with nfe.phase_("backward"):
            loss.backward()
    assert not [w for w in caught if "does not support callbacks" in str(w.message)]
    fwd, bwd = steps.take("forward"), steps.take("backward")
    for got in (fwd, bwd):
        assert (got["grid"], got["accepted"], got["rejected"]) == (n, 0, 0)
        assert steps_done(got) == n
        assert got["min_step"] == pytest.approx(h)
    assert nfe.take("forward") == 4 * n            # rk4: 4 evaluations per step


def test_no_phase_no_count_and_take_resets():
    func = Decay()
    steps = StepCounter(func)
    solve(func, LOOSE_START)                       # phase None: not counted
    assert steps.take("forward")["attempted"] == 0
    with steps.phase_("eval"):
        solve(func, LOOSE_START)
    first = steps.take("eval")
    assert first["accepted"] > 0
    assert steps.take("eval") == {"accepted": 0, "rejected": 0, "grid": 0, "attempted": 0,
                                  "min_step": None}


def test_merge_steps_sums_and_takes_min():
    total: dict = {}
    merge_steps(total, {"accepted": 3, "rejected": 1, "grid": 0, "attempted": 4, "min_step": 0.2})
    merge_steps(total, {"accepted": 2, "rejected": 0, "grid": 0, "attempted": 2, "min_step": None})
    merge_steps(total, {"accepted": 1, "rejected": 2, "grid": 0, "attempted": 3, "min_step": 0.1})
    assert total == {"accepted": 6, "rejected": 3, "grid": 0, "attempted": 9, "min_step": 0.1}


def test_deepcopy_of_an_instrumented_model_is_not_counted_outside_a_phase():
    # validity.py copies instrumented models (copy.deepcopy, .double()); the copy keeps the
    # callbacks (plain closures of the same counter), which count nothing while no phase is set.
    torch.manual_seed(0)
    block = ODEBlock(MLP(), Solver("dopri5", rtol=1e-4, atol=1e-4), Gradient("direct"))
    nfe = NFECounter(block)
    steps = StepCounter(block, phases=nfe)
    twin = copy.deepcopy(block)
    with nfe.phase_("forward"):
        block(torch.randn(2, 3, dtype=F64))
    assert steps.take("forward")["attempted"] > 0 and nfe.take("forward") > 0
    twin(torch.randn(2, 3, dtype=F64))
    assert steps.take("forward")["attempted"] == 0 and nfe.take("forward") == 0


@pytest.mark.parametrize("mode", ["checkpointed", "aca"])
def test_own_dopri5_steps_counted_and_nfe_is_two_plus_six_per_attempt(mode):
    """nodebench's own dopri5 (checkpointed, ACA) calls the same step callbacks as torchdiffeq:
    the counts match an independent log, forward NFE = 2 + 6 (accepted + rejected) (first-step
    choice, then 6 new stages per attempt, FSAL), and the backward pass re-runs each accepted
    step once (6 stages each, counted as adjoint-phase grid steps)."""
    func = Recording()
    nfe = NFECounter(func)
    steps = StepCounter(func, phases=nfe)
    y0 = torch.ones(4, dtype=F64, requires_grad=True)
    with nfe.phase_("forward"):
        y = solve(func, Solver("dopri5", rtol=1e-6, atol=1e-6), mode, y0)
    fwd, f = steps.take("forward"), nfe.take("forward")
    assert fwd["accepted"] == count(func.log, "accept") > 0
    assert fwd["rejected"] == count(func.log, "reject")
    assert f == 2 + 6 * (fwd["accepted"] + fwd["rejected"])
    with nfe.phase_("backward"):
        y[-1].sum().backward()
    bwd, b = steps.take("backward"), nfe.take("backward")
    assert bwd["grid"] == fwd["accepted"] and bwd["accepted"] == bwd["rejected"] == 0
    assert b == 6 * fwd["accepted"]  # the 6 stages y1 needs (the 7th, FSAL, is not re-run)


def test_mali_steps_counted_and_nfe_is_two_plus_one_per_attempt():
    """MALI's ALF: one f call per attempt after v0 = f(t0, y0) and the first-step choice; the
    backward pass reconstructs and re-runs each accepted step (2 calls each) plus v0's call."""
    func = Recording()
    func.rate = 2.0  # leapfrog is unstable on fast decay: a gentle rate, still a rejected start
    nfe = NFECounter(func)
    steps = StepCounter(func, phases=nfe)
    y0 = torch.ones(4, dtype=F64, requires_grad=True)
    with nfe.phase_("forward"):
        y = solve(func, Solver("dopri5", rtol=1e-3, atol=1e-3, options={"first_step": 1.0}),
                  "mali", y0)
    fwd, f = steps.take("forward"), nfe.take("forward")
    assert fwd["rejected"] == count(func.log, "reject") > 0
    assert fwd["accepted"] == count(func.log, "accept") > 0
    assert f == 1 + fwd["accepted"] + fwd["rejected"]  # first_step given: no choice call
    with nfe.phase_("backward"):
        y[-1].sum().backward()
    bwd, b = steps.take("backward"), nfe.take("backward")
    assert bwd["grid"] == fwd["accepted"]
    assert b == 2 * fwd["accepted"] + 1
