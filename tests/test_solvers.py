"""Solver validation, exact NFE counts, and adjoint gradients against direct backprop."""

import pytest
import torch
from torch import nn

from nodebench.errors import ConfigError
from nodebench.instruments import NFECounter
from nodebench.models.blocks import Dynamics, ODEBlock
from nodebench.solvers import Gradient, Solver, available_methods, odesolve


class Linear(Dynamics):
    """f(t, y) = W y: the worked example of seed 002."""

    def __init__(self, dim=3):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)

    def forward(self, t, y):
        return self.lin(y)


DIRECT = Gradient("direct")


def nfe_of(solver, gradient=DIRECT, dim=3):
    torch.manual_seed(0)
    func = Linear(dim)
    block = ODEBlock(func, solver, gradient)
    counter = NFECounter(block)
    y0 = torch.randn(4, dim, requires_grad=True)
    with counter.phase_("forward"):
        out = block(y0)
    with counter.phase_("backward"):
        out.sum().backward()
    return counter.take("forward"), counter.take("backward")


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("midpoint", 2), ("rk4", 4),
                                             ("heun3", 3)])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_fixed_step_nfe_exact(method, per_step, steps):
    f, b = nfe_of(Solver(method, step_size=1.0 / steps))
    assert (f, b) == (per_step * steps, 0)


def test_adjoint_rk4_backward_nfe_exact():
    # The adjoint solve uses the same rk4 grid backwards: 4 evaluations per step.
    assert nfe_of(Solver("rk4", step_size=0.25), Gradient("adjoint")) == (16, 16)


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_dopri5_nfe_is_2_plus_6k(tol):
    f, b = nfe_of(Solver("dopri5", rtol=tol, atol=tol))
    assert f >= 8 and (f - 2) % 6 == 0 and b == 0


def test_adjoint_counts_backward_solve():
    f, b = nfe_of(Solver("dopri5"), Gradient("adjoint"))
    assert f > 0 and b > 0 and (f - 2) % 6 == 0


def test_dopri5_nfe_grows_as_tolerance_tightens():
    loose = nfe_of(Solver("dopri5", rtol=1e-2, atol=1e-2))[0]
    tight = nfe_of(Solver("dopri5", rtol=1e-7, atol=1e-7))[0]
    assert tight > loose


def test_linear_ode_matches_matrix_exponential():
    torch.manual_seed(1)
    func = Linear(3).double()
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    out = odesolve(func, y0, t, Solver("dopri5", rtol=1e-10, atol=1e-10), Gradient("direct"))
    exact = y0 @ torch.linalg.matrix_exp(func.lin.weight.detach()).T
    torch.testing.assert_close(out[-1], exact, rtol=1e-8, atol=1e-8)


class TanhMLP(Dynamics):
    """f(t, y) = W2 tanh(W1 [y, t] + b1) + b2: smooth, time-dependent, non-linear."""

    def __init__(self, dim=3, hidden=8):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim + 1, hidden), nn.Linear(hidden, dim)

    def forward(self, t, y):
        tt = torch.ones_like(y[:, :1]) * t
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], 1))))


@pytest.mark.parametrize("norm", ["default", "seminorm"])
def test_adjoint_gradients_equal_direct_gradients(norm):
    torch.manual_seed(0)
    func = TanhMLP().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    solver = Solver("dopri5", rtol=1e-10, atol=1e-10)
    grads = {}
    for mode in ("direct", "adjoint"):
        func.zero_grad()
        block = ODEBlock(func, solver, Gradient(mode, norm=norm if mode == "adjoint" else "default"))
        xi = x.clone().requires_grad_(True)
        (block(xi) ** 2).sum().backward()
        grads[mode] = [xi.grad.clone()] + [p.grad.clone() for p in func.parameters()]
    for gd, ga in zip(grads["direct"], grads["adjoint"]):
        torch.testing.assert_close(ga, gd, rtol=1e-6, atol=1e-8)


def test_gradcheck_adjoint_small_dynamics():
    torch.manual_seed(0)
    func = Linear(2).double()
    t = torch.tensor([0.0, 0.7], dtype=torch.float64)
    solver = Solver("dopri5", rtol=1e-10, atol=1e-10)
    y0 = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y: odesolve(func, y, t, solver, Gradient("adjoint"))[-1], (y0,), atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "nope"}, "unknown solver method 'nope'"),
    ({"method": "dopri5", "rtol": -1e-3}, "solver.rtol must be a positive number"),
    ({"method": "dopri5", "atol": 0}, "solver.atol must be a positive number"),
    ({"method": "rk4"}, "fixed-step: set solver.step_size"),
    ({"method": "euler", "step_size": -0.1}, "solver.step_size must be a positive number"),
    ({"method": "dopri5", "step_size": 0.1}, "step_size applies to fixed-step methods"),
    ({"method": "dopri5", "options": {"bogus": 1}}, "unknown option(s) bogus"),
    ({"method": "rk4", "step_size": 0.1, "options": {"first_step": 1}}, "unknown option(s)"),
    ({"method": "dopri5", "max_num_steps": 0}, "max_num_steps must be a positive integer"),
])
def test_bad_solver_configs_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Solver(**kwargs)


def test_bad_gradient_configs_raise():
    with pytest.raises(ConfigError, match="unknown gradient mode"):
        Gradient("backprop")
    with pytest.raises(ConfigError, match="seminorm needs"):
        ODEBlock(Linear(), Solver("rk4", step_size=0.5), Gradient("adjoint", norm="seminorm"))


def test_every_torchdiffeq_method_is_offered():
    for m in ("dopri5", "dopri8", "bosh3", "adaptive_heun", "euler", "midpoint", "rk4"):
        assert m in available_methods()


def test_max_num_steps_failure_is_classified():
    from nodebench.errors import classify_solver_error

    func = Linear()
    with pytest.raises(AssertionError) as info:
        odesolve(func, torch.randn(2, 3), torch.tensor([0.0, 1.0]),
                 Solver("dopri5", rtol=1e-9, atol=1e-9, max_num_steps=2), Gradient("direct"))
    assert "max_num_steps exceeded" in classify_solver_error(info.value)
