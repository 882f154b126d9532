"""RNODE and TayNODE penalties (nodebench.regularisers) against closed forms on linear and
time-only ODEs, hand-derived total derivatives, Hutchinson's expectation, and the adjoint."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from nodebench.cnf import CNF, LinearField
from nodebench.errors import ConfigError
from nodebench.instruments import NFECounter, StepCounter
from nodebench.models import Dynamics
from nodebench.regularisers import (
    Penalties,
    Regularised,
    RegularisedODEBlock,
    solve_with_penalties,
    total_derivative,
)
from nodebench.solvers import Gradient, Solver

F64 = torch.float64
TIGHT = Solver("dopri5", rtol=1e-10, atol=1e-10)
DIRECT = Gradient("direct")
T1 = 1.2


class Scale(Dynamics):
    """dy/dt = a * y elementwise, y (B, *S), a (*S): y(t) = y0 exp(a t)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)

    def forward(self, t, y):
        return self.a * y


class Matrix(Dynamics):
    """dy/dt = y A^T on (B, D)."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, t, y):
        return y @ self.A.T


class TimeSquared(Dynamics):
    """dy/dt = t^2 (every entry), independent of y: y'' = 2t, y''' = 2."""

    def forward(self, t, y):
        return torch.ones_like(y) * t ** 2


class Cubic(Dynamics):
    """dy/dt = -y^3: y'' = 3 y^5, y''' = -15 y^7."""

    def forward(self, t, y):
        return -y ** 3


class SinScale(Dynamics):
    """dy/dt = sin(t) y: y'' = (cos t + sin^2 t) y,
    y''' = (-sin t + 2 sin t cos t) y + (cos t + sin^2 t) sin t y."""

    def forward(self, t, y):
        return torch.sin(t) * y


class MLP(Dynamics):
    def __init__(self, dim: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(torch.cat([y, t.expand(y.shape[0], 1)], 1))


def solve(dynamics, y0, penalties, solver=TIGHT, gradient=DIRECT, generator=None):
    func = Regularised(dynamics, penalties)
    t = torch.tensor([0.0, T1], dtype=y0.dtype)
    y, r = solve_with_penalties(func, y0, t, solver, gradient, generator)
    return func, y[-1], r[-1]


def exp_integral(c: torch.Tensor) -> torch.Tensor:
    """int_0^T1 exp(c t) dt, elementwise."""
    return torch.where(c == 0, torch.full_like(c, T1), torch.expm1(c * T1) / c)


@pytest.mark.parametrize("shape", [(2,), (2, 3)])
def test_kinetic_energy_closed_form_on_a_linear_ode(shape):
    """y = y0 exp(a t): int ||a y||^2 dt = sum a^2 y0^2 (exp(2 a T) - 1) / (2 a); the state
    may have any shape (flattened inside the wrapper)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=gen, dtype=F64) - 0.6
    y0 = torch.randn((4, *shape), generator=gen, dtype=F64)
    _, y1, r = solve(Scale(a), y0, Penalties(kinetic=1.0))
    torch.testing.assert_close(y1, y0 * torch.exp(a * T1), rtol=1e-9, atol=1e-10)
    expected = (a ** 2 * y0 ** 2 * exp_integral(2 * a)).reshape(4, -1).sum(1)
    torch.testing.assert_close(r[:, 0], expected, rtol=1e-8, atol=1e-10)


def test_frobenius_estimate_exact_for_its_noise_and_unbiased():
    """For dy/dt = y A^T the rate ||eps^T A||^2 is constant in time: the penalty is exactly
    T ||eps^T A||^2 for the solve's noise, and its mean over samples is T ||A||_F^2."""
    A = torch.tensor([[-0.4, 1.3], [0.7, 0.2]], dtype=F64)
    n = 20000
    y0 = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    for noise in ("gaussian", "rademacher"):
        with torch.no_grad():
            # the rate is constant in time: rk4 integrates it exactly in 4 steps
            func, _, r = solve(Matrix(A), y0, Penalties(frobenius=1.0, noise=noise),
                               Solver("rk4", step_size=T1 / 4),
                               generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(r[:, 0], T1 * (func.noise @ A).pow(2).sum(1), rtol=1e-9,
                                   atol=1e-12)
        se = float(r[:, 0].std()) / math.sqrt(n)
        assert abs(float(r[:, 0].mean()) - T1 * float(A.pow(2).sum())) < 4 * se


def test_frobenius_estimate_unbiased_for_a_nonlinear_field():
    """At one (t, y), the mean of ||eps^T J||^2 over many draws is ||J||_F^2 (autograd's full
    Jacobian), within 4 standard errors."""
    torch.manual_seed(3)
    field = MLP(3, 16).double()
    y = torch.randn(1, 3, dtype=F64)
    t = torch.tensor(0.3, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda x: field(t, x[None])[0], y[0])
    exact = float(jac.pow(2).sum())
    func = Regularised(field, Penalties(frobenius=1.0))
    many = y.expand(20000, 3)
    state = func.initial_state(many)
    with torch.no_grad():
        rate = func(t, state)[:, -1]
    se = float(rate.std()) / math.sqrt(rate.numel())
    assert abs(float(rate.mean()) - exact) < 4 * se


@pytest.mark.parametrize("order", [2, 3])
def test_taylor_penalty_closed_form_on_a_linear_ode(order):
    """d^K y/dt^K = a^K y: int ||a^K y||^2 dt = sum a^(2K) y0^2 (exp(2 a T) - 1) / (2 a)."""
    a = torch.tensor([-0.5, 0.3, 0.9], dtype=F64)
    y0 = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    _, _, r = solve(Scale(a), y0, Penalties(taylor=1.0, order=order))
    expected = (a ** (2 * order) * y0 ** 2 * exp_integral(2 * a)).sum(1)
    torch.testing.assert_close(r[:, 0], expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("order, expected", [(2, 4 * T1 ** 3 / 3), (3, 4 * T1)])
def test_taylor_penalty_of_a_time_only_field(order, expected):
    """dy/dt = t^2: y'' = 2t, y''' = 2, so int (y'')^2 = 4 T^3 / 3 and int (y''')^2 = 4 T per
    entry (the dg/dt path of the total derivative)."""
    y0 = torch.zeros(2, 3, dtype=F64)
    _, _, r = solve(TimeSquared(), y0, Penalties(taylor=1.0, order=order))
    torch.testing.assert_close(r[:, 0], torch.full((2,), 3 * expected, dtype=F64), rtol=1e-9,
                               atol=1e-12)


def test_total_derivatives_of_nonlinear_and_time_dependent_fields():
    """The recursion's pointwise values against hand-derived derivatives."""
    y = torch.tensor([[0.7, -1.1], [0.2, 0.5]], dtype=F64)
    t = torch.tensor(0.8, dtype=F64)
    s, c = math.sin(0.8), math.cos(0.8)
    cases = [(Cubic(), {2: 3 * y ** 5, 3: -15 * y ** 7}),
             (SinScale(), {2: (c + s * s) * y,
                           3: (-s + 2 * s * c) * y + (c + s * s) * s * y})]
    for field, derivatives in cases:
        for order, expected in derivatives.items():
            func = Regularised(field, Penalties(taylor=1.0, order=order))
            state = func.initial_state(y)
            rate = func(t, state)[:, -1]
            torch.testing.assert_close(rate, expected.pow(2).sum(1), rtol=1e-12, atol=1e-12)


def test_total_derivative_is_zero_without_dependence():
    t = torch.tensor(0.0, dtype=F64, requires_grad=True)
    x = torch.ones(2, 2, dtype=F64, requires_grad=True)
    g = torch.zeros(2, 2, dtype=F64, requires_grad=True) * 1.0
    assert torch.equal(total_derivative(g, t, x, x, create_graph=False), torch.zeros(2, 2,
                                                                                      dtype=F64))


@pytest.mark.parametrize("mode, order", [("adjoint", 2), ("checkpointed", 2), ("adjoint", 3)])
def test_penalty_gradients_match_direct_backprop(mode, order):
    """All three penalties differentiate through the adjoint's backward solve (derivatives of
    f up to order K + 1) and the checkpointed mode as through direct backprop."""
    torch.manual_seed(5)
    field = MLP(2, 6).double()
    y0 = torch.randn(3, 2, dtype=F64)
    penalties = Penalties(kinetic=0.5, frobenius=0.3, taylor=0.2, order=order)
    grads = []
    for gradient in (DIRECT, Gradient(mode)):
        f = copy.deepcopy(field)
        _, y1, r = solve(f, y0, penalties, Solver("dopri5", rtol=1e-10, atol=1e-10), gradient,
                         generator=torch.Generator().manual_seed(6))
        loss = y1.pow(2).sum() + penalties.weighted(r)
        grads.append(torch.autograd.grad(loss, list(f.parameters())))
    for gd, gm in zip(*grads):
        torch.testing.assert_close(gm, gd, rtol=1e-6, atol=1e-9)


def test_cnf_penalises_the_point_not_the_log_density():
    """On a linear CNF the kinetic penalty is int ||A z(t)||^2 dt with z(t) = exp(A t) z0, not
    counting the log-density's rate tr(A)^2; the Frobenius rate is ||eps^T A||^2."""
    A = torch.tensor([[-0.3, 1.0], [-0.5, 0.2]], dtype=F64)
    cnf = CNF(LinearField(A), TIGHT, DIRECT, t1=T1,
              penalties=Penalties(kinetic=1.0, frobenius=1.0))
    z0 = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    out = cnf.to_target(z0, generator=torch.Generator().manual_seed(8))
    ts = torch.linspace(0, T1, 2001, dtype=F64)
    speeds = torch.stack([(z0 @ torch.linalg.matrix_exp(A * t).T @ A.T).pow(2).sum(1)
                          for t in ts])
    h = T1 / 2000
    simpson = h / 3 * (speeds[0] + speeds[-1] + 4 * speeds[1:-1:2].sum(0)
                       + 2 * speeds[2:-1:2].sum(0))
    torch.testing.assert_close(out.penalties[:, 0], simpson, rtol=1e-9, atol=1e-11)
    noise = cnf.penalised["to_target"].noise
    torch.testing.assert_close(out.penalties[:, 1], T1 * (noise @ A).pow(2).sum(1), rtol=1e-9,
                               atol=1e-11)
    assert cnf.to_target(z0, penalise=False).penalties is None
    cnf.eval()
    assert cnf.to_target(z0).penalties is None  # default: penalties in training mode only


def test_wrapper_is_counted_through_its_inner_dynamics():
    """NFE with penalties equals NFE without (the wrapper calls the counted inner module once
    per evaluation); step callbacks reach torchdiffeq through the wrapper."""
    torch.manual_seed(9)
    field = MLP(2, 8)
    y0 = torch.randn(5, 2)
    block = RegularisedODEBlock(field, Solver("dopri5", rtol=1e-6, atol=1e-6), DIRECT,
                                Penalties(kinetic=1.0, frobenius=1.0, taylor=1.0))
    nfe = NFECounter(block)
    steps = StepCounter(block, phases=nfe)
    assert nfe.blocks == ["func.inner"]
    with nfe.phase_("forward"):
        y1, r = block(y0)
    taken = steps.take("forward")
    assert y1.shape == (5, 2) and r.shape == (5, 3)
    assert taken["accepted"] > 0
    assert nfe.take("forward") == 2 + 6 * (taken["accepted"] + taken["rejected"])
    fixed = RegularisedODEBlock(field, Solver("rk4", step_size=0.25), DIRECT,
                                Penalties(kinetic=1.0))
    nfe2 = NFECounter(fixed)
    with nfe2.phase_("forward"):
        fixed(y0)
    assert nfe2.take("forward") == 16


def test_weighted_sum_and_names():
    p = Penalties(kinetic=0.5, taylor=2.0, order=3)
    assert p.names == ("kinetic", "taylor")
    values = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    assert float(p.weighted(values)) == pytest.approx(0.5 * 2.0 + 2.0 * 4.0)
    assert p.as_dict(values) == {"kinetic": 2.0, "taylor": 4.0}
    assert not Penalties().active


def test_bad_penalties_raise_config_error():
    with pytest.raises(ConfigError, match="kinetic"):
        Penalties(kinetic=-1.0)
    with pytest.raises(ConfigError, match="frobenius"):
        Penalties(frobenius=float("nan"))
    with pytest.raises(ConfigError, match="order"):
        Penalties(taylor=1.0, order=4)
    with pytest.raises(ConfigError, match="noise"):
        Penalties(frobenius=1.0, noise="uniform")
    with pytest.raises(ConfigError, match="at least one"):
        Regularised(Cubic(), Penalties())
    with pytest.raises(ConfigError, match="features"):
        Regularised(Cubic(), Penalties(kinetic=1.0), features=0)
    with pytest.raises(ConfigError, match="exceeds"):
        Regularised(Cubic(), Penalties(kinetic=1.0), features=5).initial_state(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="initial_state"):
        Regularised(Cubic(), Penalties(kinetic=1.0))(torch.tensor(0.0), torch.zeros(2, 3))
