"""Implicit fixed-step solvers (nodebench.implicit): order, stability, exact NFE and iteration
counts, gradients against finite differences, and the configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nodebench import implicit
from nodebench.config import build_solver, compose
from nodebench.errors import ConfigError, SolverFailure
from nodebench.instruments import NFECounter
from nodebench.models.blocks import Dynamics
from nodebench.solvers import Gradient, Solver, available_methods, odesolve

METHODS = ("implicit_euler", "crank_nicolson", "trapezoid")
ORDER = {"implicit_euler": 1, "crank_nicolson": 2, "trapezoid": 2}
T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)


class Linear1(Dynamics):
    """f(t, y) = lam * y with a trainable lam."""

    def __init__(self, lam: float) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor(lam, dtype=torch.float64))

    def forward(self, t, y):
        return self.lam * y


class Constant(Dynamics):
    """f(t, y) = c: every scheme is exact and the step equation does not depend on y."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, t, y):
        return self.c * torch.ones_like(y)


class TinyMLP(Dynamics):
    """A nonlinear, time-dependent field on R^2 with 3 + 3 + 6 + 2 = 14 parameters."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(0.7 * torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.b1 = nn.Parameter(0.3 * torch.randn(3, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(0.7 * torch.randn(3, 2, generator=g, dtype=torch.float64))
        self.b2 = nn.Parameter(torch.tensor([0.2, -0.1], dtype=torch.float64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1 + self.b1 + t) @ self.w2 + self.b2 * torch.cos(t)


def solve(func, y0, t, method, h, mode="direct", **options):
    opts = {"tol": 1e-12, "max_iters": 100, **options}
    return odesolve(func, y0, t, Solver(method, step_size=h, options=opts), Gradient(mode))


def test_registered_and_validated():
    assert set(METHODS) <= set(available_methods())
    with pytest.raises(ConfigError, match="unknown option"):
        Solver("implicit_euler", step_size=0.1, options={"tolerance": 1e-3})
    with pytest.raises(ConfigError, match="step_size"):
        Solver("crank_nicolson")


@pytest.mark.parametrize("method", METHODS)
def test_solver_configs_compose(method):
    cfg = compose(["dataset=synthetic", f"solver={method}", "solver.step_size=0.05"])
    solver = build_solver(cfg)
    assert solver.method == method and solver.step_size == 0.05
    assert solver.options == {"tol": 1e-4, "max_iters": 100, "anderson": 20,
                              "adjoint_states": "stored"}
    with pytest.raises(ConfigError, match="adjoint_states must be one of stored, recomputed"):
        Solver(method, step_size=0.1, options={"adjoint_states": "kept"})


@pytest.mark.parametrize("method", METHODS)
def test_closed_form_and_order(method):
    """y' = -y on [0, 1]: the step's amplification factor is known exactly; the global error
    against exp(-1) halves (order 1) or quarters (order 2) with h."""
    lam = -1.0
    factor = {"implicit_euler": lambda z: 1 / (1 - z),
              "crank_nicolson": lambda z: (1 + z / 2) / (1 - z / 2),
              "trapezoid": lambda z: (1 + z / 2) / (1 - z / 2)}[method]
    errors = []
    for n in (10, 20, 40):
        h = 1.0 / n
        y = solve(Linear1(lam), torch.ones(1, dtype=torch.float64), T01, method, h)
        assert y[-1].item() == pytest.approx(factor(h * lam) ** n, rel=1e-10)
        errors.append(abs(y[-1].item() - math.exp(lam)))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert rates == pytest.approx([ORDER[method]] * 2, abs=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_stiff_stability(method):
    """y' = -50 y, h = 0.1 (h * |lam| = 5): explicit Euler's factor |1 - 5| = 4 blows up, the
    implicit schemes decay (factors 1/6 and -3/7); plain Picard iteration diverges, Anderson
    acceleration converges."""
    y0 = torch.ones(1, dtype=torch.float64)
    explicit = odesolve(Linear1(-50.0), y0, T01, Solver("euler", step_size=0.1), Gradient("direct"))
    assert abs(explicit[-1].item()) > 1e5
    y = solve(Linear1(-50.0), y0, T01, method, 0.1)
    expected = (1 / 6) ** 10 if method == "implicit_euler" else (-3 / 7) ** 10
    assert y[-1].item() == pytest.approx(expected, rel=1e-8)
    with pytest.raises(SolverFailure, match="did not converge"):
        solve(Linear1(-50.0), y0, T01, method, 0.1, anderson=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["direct", "adjoint", "adjoint-recomputed"])
def test_exact_nfe_and_iterations(method, mode):
    """Constant f, N = 10 steps. Step 1 starts from y0: 2 iterations (the second confirms the
    first). Later steps start from the previous step's extrapolation, already exact: 1 iteration.
    The trapezoid adds f(t0, y0) per step. The adjoint's backward step with stored states: 1 call
    to linearise f, 1 adjoint iteration (a' = 0), +1 call for the trapezoid's f(t0, y0); with
    recomputed states (crank_nicolson, trapezoid) it first solves for the state as the forward
    pass does (2 iterations for the first backward step, which starts from its current state,
    1 for the others, which start from the previous backward step's extrapolation). Direct
    gradients call f no more (the implicit-function-theorem solve uses vector-Jacobian
    products: 1 iteration, since dG/dy = 0)."""
    n = 10
    func = Constant(0.5)
    nfe = NFECounter(func)
    y0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    implicit.STATS.take()
    states = "recomputed" if mode.endswith("recomputed") else "stored"
    mode = mode.split("-")[0]
    with nfe.phase_("forward"):
        y = solve(func, y0, T01, method, 1.0 / n, mode=mode, adjoint_states=states)
    with nfe.phase_("backward"):
        y[-1].sum().backward()
    extra = n if method == "trapezoid" else 0
    assert nfe.take("forward") == (n + 1) + extra
    stats = implicit.STATS.take()
    assert stats["forward_iters"] == n + 1 and stats["forward_steps"] == n
    if mode == "adjoint" and (method == "implicit_euler" or states == "stored"):
        # implicit_euler: the exact explicit reversal's one call; stored: the linearisation
        assert nfe.take("backward") == n + extra
        assert stats["backward_iters"] == n and stats["backward_steps"] == n
    elif mode == "adjoint":  # state iterations (n + 1) + 1 linearisation per step; 1 adjoint
        assert nfe.take("backward") == (n + 1) + n + extra  # iteration per step (no f call)
        assert stats["backward_iters"] == (n + 1) + n and stats["backward_steps"] == n
    else:
        assert nfe.take("backward") == 0
        assert stats["backward_iters"] == n and stats["backward_steps"] == n
    assert torch.allclose(y[-1], torch.full((3,), 0.5, dtype=torch.float64))
    assert func.c.grad.item() == pytest.approx(3.0)  # d/dc sum(c * t1 * ones(3)) = 3
    assert torch.allclose(y0.grad, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("method", METHODS)
def test_nfe_equals_iterations_nonlinear(method):
    """On a nonlinear field every forward f call is an iteration (or the trapezoid's f(t0, y0))."""
    func = TinyMLP()
    nfe = NFECounter(func)
    implicit.STATS.take()
    with nfe.phase_("forward"):
        solve(func, torch.randn(4, 2, dtype=torch.float64), T01, method, 0.1)
    stats = implicit.STATS.take()
    extra = stats["forward_steps"] if method == "trapezoid" else 0
    assert stats["forward_steps"] == 10
    assert nfe.take("forward") == stats["forward_iters"] + extra
    assert stats["forward_iters"] > 2 * stats["forward_steps"]  # really iterates


def _loss(func, y0, method, h, mode, **options):
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    y = solve(func, y0, t, method, h, mode=mode, **options)
    weights = torch.arange(1.0, 1.0 + y0.numel(), dtype=torch.float64).view_as(y0)
    return (y[1] * weights).sum() + (y[2] ** 2).sum()


def _grads(func, y0, method, h, mode, **options):
    y0 = y0.clone().requires_grad_(True)
    func.zero_grad()
    _loss(func, y0, method, h, mode, **options).backward()
    return torch.cat([y0.grad.flatten()] + [p.grad.flatten() for p in func.parameters()])


def _finite_differences(func, y0, method, h, eps=1e-6):
    out = []
    with torch.no_grad():
        for k in range(y0.numel()):
            d = torch.zeros_like(y0).view(-1)
            d[k] = eps
            d = d.view_as(y0)
            out.append((_loss(func, y0 + d, method, h, "direct")
                        - _loss(func, y0 - d, method, h, "direct")) / (2 * eps))
        for p in func.parameters():
            flat = p.view(-1)
            for k in range(flat.numel()):
                old = flat[k].item()
                flat[k] = old + eps
                plus = _loss(func, y0, method, h, "direct")
                flat[k] = old - eps
                minus = _loss(func, y0, method, h, "direct")
                flat[k] = old
                out.append((plus - minus) / (2 * eps))
    return torch.stack(out)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_vs_finite_differences(method):
    """Direct gradients (implicit function theorem per step) equal central finite differences of
    the discrete solution. Adjoint gradients of the trapezoid (the adjoint ODE solved backwards
    with the same scheme) approach them at order 2 in h; the implicit midpoint (crank_nicolson)
    is symmetric and implicit_euler is reversed exactly by an explicit step, so their backward
    passes retrace the forward states and their adjoint gradients are exact too, whether the
    adjoint takes the states stored from the forward pass or recomputes them."""
    func = TinyMLP()
    y0 = torch.randn(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = {"stored": [], "recomputed": []}  # the adjoint's, with each source of states
    for h in (0.25, 0.125):
        fd = _finite_differences(func, y0, method, h)
        direct = _grads(func, y0, method, h, "direct")
        assert torch.allclose(direct, fd, atol=1e-7, rtol=1e-7)
        for states, errs in errors.items():
            adjoint = _grads(func, y0, method, h, "adjoint", adjoint_states=states)
            errs.append((adjoint - fd).abs().max().item())
    for adjoint_errors in errors.values():
        if method in ("crank_nicolson", "implicit_euler"):  # symmetric / exactly reversed
            assert max(adjoint_errors) < 1e-7
        else:
            assert adjoint_errors[0] > 1e-5  # a real O(h^p) discrepancy, shrinking at the order:
            assert math.log2(adjoint_errors[0] / adjoint_errors[1]) == pytest.approx(
                ORDER[method], abs=0.25)


class Matrix(Dynamics):
    """f(t, y) = y @ A^T with a trainable matrix A."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, y):
        return y @ self.a.T


def test_stored_adjoint_states_survive_a_step_the_backward_solve_cannot_undo():
    """crank_nicolson, h = 0.05, y' = A y with A = Q diag(-38, -0.5) Q^T (Q a 30 degree rotation),
    y0 = (1, 1), loss = y(0.05)[0] + y(1)[1]. The stiff direction's step factor
    r = (1 + z/2) / (1 - z/2), z = h (-38) = -1.9, is 0.026: solving a step backwards multiplies
    the errors in that direction by 1 / r = 39 (the backward step's matrix I + z/2 is nearly
    singular), and rounding errors of the slow direction's size feed it. With the states stored from the forward pass the
    adjoint gradients equal the direct ones (the implicit midpoint's exact discrete adjoint;
    direct gradients are checked against finite differences above); solved backwards
    (recomputed), the backward state solve stagnates at 4.6e-12 against the tolerance 1.2e-12
    three steps in (at t = 0.85), the failure that stopped the shapes study's training."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    q = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    a = q @ torch.diag(torch.tensor([-38.0, -0.5], dtype=torch.float64)) @ q.T
    t = torch.tensor([0.0, 0.05, 1.0], dtype=torch.float64)

    def grads(mode, states="stored"):
        func = Matrix(a)
        y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
        y = solve(func, y0, t, "crank_nicolson", 0.05, mode=mode, adjoint_states=states)
        (y[1, 0] + y[2, 1]).backward()
        return torch.cat([y0.grad, func.a.grad.flatten()])

    exact = grads("direct")
    assert torch.allclose(grads("adjoint"), exact, rtol=1e-9, atol=1e-12)
    with pytest.raises(SolverFailure, match=r"adjoint step \(state\) at t=0.85: fixed-point"):
        grads("adjoint", "recomputed")  # stagnates as in the shapes study's training


def test_conv_model_float32_trains_with_both_modes():
    """A conv ODE block in float32 with the default options: finite loss and gradients, and the
    two gradient modes agree to the adjoint's O(h^2) for crank_nicolson."""
    from nodebench.models.blocks import ConvODEFunc, ODEBlock

    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5)
    grads = {}
    for mode in ("direct", "adjoint"):
        torch.manual_seed(0)
        block = ODEBlock(ConvODEFunc(8), Solver("crank_nicolson", step_size=0.25,
                                                options={"tol": 1e-6}), Gradient(mode))
        block(x).square().mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in block.parameters()])
        assert torch.isfinite(grads[mode]).all()
    assert torch.allclose(grads["direct"], grads["adjoint"], atol=1e-4, rtol=1e-3)


def test_max_iters_failure_is_a_solver_failure():
    with pytest.raises(SolverFailure, match="did not converge in 1 iterations"):
        solve(TinyMLP(), torch.ones(1, 2, dtype=torch.float64), T01, "implicit_euler", 0.1,
              max_iters=1)
