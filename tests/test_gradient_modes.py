"""Gradient modes checkpointed, ACA and MALI (nodebench.gradients): exactness against direct
backprop on the same steps, finite differences, convergence to a tight reference, activation
memory, exact NFE, and the one-line errors for combinations that do not apply. All float64,
synthetic and small."""

import pytest
import torch
from torch import nn

from nodebench import config as C
from nodebench import gradients as G
from nodebench.errors import ConfigError
from nodebench.instruments import ActivationMeter, NFECounter, activation_mib
from nodebench.models.blocks import Dynamics, ODEBlock
from nodebench.solvers import Gradient, Solver, odesolve

T01 = torch.tensor([0.0, 1.0], dtype=torch.float64)
NEW_MODES = ("checkpointed", "aca", "mali")


class TanhMLP(Dynamics):
    """f(t, y) = W2 tanh(W1 [y, t] + b1) + b2: smooth, time-dependent, non-linear."""

    def __init__(self, dim=3, hidden=8):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim + 1, hidden), nn.Linear(hidden, dim)

    def forward(self, t, y):
        tt = torch.ones_like(y[:, :1]) * t
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], 1))))


def setup(seed=0, batch=4, dim=3):
    torch.manual_seed(seed)
    func = TanhMLP(dim).double()
    x = torch.randn(batch, dim, dtype=torch.float64)
    w = torch.randn(batch, dim, dtype=torch.float64)  # loss = sum(w * y(t1)): a generic cotangent
    return func, x, w


def grads_of(func, x, w, solver, gradient, t=T01):
    """[dL/dy0, dL/dtheta...] of L = sum_i sum(w * y(t_i)) for i >= 1."""
    func.zero_grad()
    xi = x.clone().requires_grad_(True)
    ys = odesolve(func, xi, t, solver, gradient)
    (ys[1:] * w).sum().backward()
    return [xi.grad.clone()] + [p.grad.clone() for p in func.parameters()]


def flat(gs):
    return torch.cat([g.reshape(-1) for g in gs])


def rel_err(a, b):
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


# --- exactness: checkpointed and aca are the discrete gradient of the same steps -------------

@pytest.mark.parametrize("mode", ["checkpointed", "aca"])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_checkpointed_and_aca_equal_direct_on_the_same_fixed_grid(mode, method):
    func, x, w = setup()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)  # an intermediate output too
    solver = Solver(method, step_size=0.125)
    direct = grads_of(func, x, w, solver, Gradient("direct"), t)
    ours = grads_of(func, x, w, solver, Gradient(mode), t)
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", ["checkpointed", "aca"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_checkpoint_gradient_equals_backprop_through_the_same_accepted_steps(mode,
                                                                                      method):
    # Direct backprop through nodebench's own adaptive solve (graph kept, step sizes are floats):
    # the same accepted steps, so the same discrete gradient to round-off.
    func, x, w = setup(1)
    solver = Solver(method, rtol=1e-5, atol=1e-5)
    ours = grads_of(func, x, w, solver, Gradient(mode))
    func.zero_grad()
    xi = x.clone().requires_grad_(True)
    grid, states, out_index = G.rk_forward(func, G.TABLEAUS[method], xi, [0.0, 1.0],
                                           G.Control.from_solver(solver))
    assert len(grid) >= 2
    (states[out_index[-1]] * w).sum().backward()
    ref = [xi.grad.clone()] + [p.grad.clone() for p in func.parameters()]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# --- MALI: the gradient of its own discrete ALF solve ----------------------------------------

@pytest.mark.parametrize("eta", [1.0, 0.8])
def test_mali_matches_central_finite_differences_of_its_discrete_solve(eta):
    func, x, w = setup(2, batch=2)
    solver, gradient = Solver("euler", step_size=0.1), Gradient("mali", eta=eta)
    ours = grads_of(func, x, w, solver, gradient)

    def loss(y0):
        with torch.no_grad():
            return float((odesolve(func, y0, T01, solver, gradient)[-1] * w).sum())

    eps = 1e-6
    fd_x = torch.zeros_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[i] = eps
        fd_x.view(-1)[i] = (loss(x + d.view_as(x)) - loss(x - d.view_as(x))) / (2 * eps)
    torch.testing.assert_close(ours[0], fd_x, rtol=1e-6, atol=1e-8)
    weight = func.l1.weight  # parameters: every entry of the first layer's weight
    fd_w = torch.zeros_like(weight)
    for i in range(weight.numel()):
        with torch.no_grad():
            weight.view(-1)[i] += eps
            up = loss(x)
            weight.view(-1)[i] -= 2 * eps
            down = loss(x)
            weight.view(-1)[i] += eps
        fd_w.view(-1)[i] = (up - down) / (2 * eps)
    torch.testing.assert_close(ours[1], fd_w, rtol=1e-6, atol=1e-8)


def test_mali_adaptive_equals_backprop_through_the_same_alf_steps():
    # The backward pass reconstructs the states by inverse ALF steps: the gradient equals that of
    # the discrete solve with the graph kept, up to the reconstruction's round-off.
    func, x, w = setup(3)
    solver = Solver("dopri5", rtol=1e-5, atol=1e-5)
    ours = grads_of(func, x, w, solver, Gradient("mali"))
    func.zero_grad()
    xi = x.clone().requires_grad_(True)
    grid, outputs, _, _, _ = G.alf_forward(func, xi, [0.0, 1.0], G.Control.from_solver(solver),
                                           1.0)
    assert len(grid) >= 5
    (outputs[-1] * w).sum().backward()
    ref = [xi.grad.clone()] + [p.grad.clone() for p in func.parameters()]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_alf_inverse_step_reconstructs_the_input():
    func, x, _ = setup(4)
    with torch.no_grad():
        v = func(torch.tensor(0.0, dtype=torch.float64), x)
        for eta in (1.0, 0.7, 0.3):
            y1, v1, _ = G.alf_step(func, 0.2, 0.05, x, v, eta)
            y0, v0 = G.alf_inverse(func, 0.2, 0.05, y1, v1, eta)
            torch.testing.assert_close(y0, x, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(v0, v, rtol=1e-12, atol=1e-13)


# --- convergence to a float64 tight-tolerance reference --------------------------------------

@pytest.mark.parametrize("mode,loose,tight", [
    ("direct", 1e-3, 1e-8), ("adjoint", 1e-3, 1e-8), ("checkpointed", 1e-3, 1e-8),
    ("aca", 1e-3, 1e-8), ("mali", 1e-3, 1e-6)])
def test_every_mode_converges_to_the_reference_as_the_tolerance_tightens(mode, loose, tight):
    func, x, w = setup(5)
    ref = grads_of(func, x, w, Solver("dopri5", rtol=1e-12, atol=1e-12), Gradient("direct"))
    errs = [rel_err(grads_of(func, x, w, Solver("dopri5", rtol=tol, atol=tol), Gradient(mode)),
                    ref) for tol in (loose, tight)]
    assert errs[1] < errs[0] / 10
    assert errs[1] < (1e-3 if mode == "mali" else 1e-5)


# --- activation memory: O(steps x state) for checkpointed/aca, flat for mali -----------------

def saved_bytes(block, x):
    meter = ActivationMeter(block)
    with meter.measure(x.device):   # the meter counts what the graph of `loss` still holds
        loss = block(x.clone().requires_grad_(True)).square().sum()
    del loss
    return meter.last_bytes


@pytest.mark.parametrize("mode", NEW_MODES)
def test_activation_memory_grows_by_the_state_per_step_or_is_flat(mode):
    func, x, _ = setup(6, batch=16, dim=5)
    state = x.numel() * x.element_size()
    method = "euler" if mode == "mali" else "rk4"
    mem = {n: saved_bytes(ODEBlock(func, Solver(method, step_size=1 / n), Gradient(mode)), x)
           for n in (2, 4, 8)}
    if mode == "mali":
        assert mem[2] == mem[4] == mem[8] > 0                      # O(state)
    else:
        assert mem[4] - mem[2] == 2 * state                        # O(steps x state)
        assert mem[8] - mem[4] == 4 * state
    direct = {n: saved_bytes(ODEBlock(func, Solver("rk4", step_size=1 / n), Gradient("direct")),
                             x) for n in (2, 4)}
    assert direct[4] - direct[2] > 4 * state                       # RK-Net keeps every stage


# --- NFE, forward and backward, exact ----------------------------------------------------------

@pytest.mark.parametrize("mode,method,expected", [
    ("checkpointed", "rk4", (16, 16)), ("aca", "rk4", (16, 16)),
    ("checkpointed", "midpoint", (8, 8)), ("aca", "euler", (4, 4)),
    ("mali", "euler", (1 + 4, 2 * 4 + 1))])
def test_nfe_exact_per_mode_fixed_step(mode, method, expected):
    func, x, _ = setup(7)
    block = ODEBlock(func, Solver(method, step_size=0.25), Gradient(mode))
    r = activation_mib(block, x.clone().requires_grad_(True))
    assert (r["nfe_forward"], r["nfe_backward"]) == expected


@pytest.mark.parametrize("mode", NEW_MODES)
def test_nfe_adaptive_follows_the_step_counts(mode):
    func, x, w = setup(8)
    solver = Solver("dopri5", rtol=1e-5, atol=1e-5)
    ctl = G.Control.from_solver(solver)
    with torch.no_grad():
        if mode == "mali":
            n = len(G.alf_forward(func, x, [0.0, 1.0], ctl, 1.0)[0])
        else:
            n = len(G.rk_forward(func, G.TABLEAUS["dopri5"], x, [0.0, 1.0], ctl)[0])
    counter = NFECounter(func)
    xi = x.clone().requires_grad_(True)
    with counter.phase_("forward"):
        out = odesolve(func, xi, T01, solver, Gradient(mode))
    with counter.phase_("backward"):
        (out[-1] * w).sum().backward()
    f, b = counter.take("forward"), counter.take("backward")
    if mode == "mali":  # v0, starting step, one per attempted step; backward 2 per step + v0
        assert f >= 2 + n and b == 2 * n + 1
    else:  # dopri5 with FSAL: 2 + 6 per attempted step; backward 6 per accepted step
        assert (f - 2) % 6 == 0 and f >= 2 + 6 * n and b == 6 * n


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,gradient,message", [
    (Solver("implicit_euler", step_size=0.1), Gradient("aca"), "needs an explicit Runge-Kutta"),
    (Solver("explicit_adams", step_size=0.1), Gradient("checkpointed"),
     "needs an explicit Runge-Kutta"),
    (Solver("dopri8"), Gradient("aca"), "needs an explicit Runge-Kutta"),
    (Solver("rk4", step_size=0.1), Gradient("mali"), "mali is its own integrator"),
    (Solver("dopri5"), Gradient("checkpointed", norm="seminorm"), "seminorm needs"),
])
def test_bad_combinations_give_one_line_config_errors(solver, gradient, message):
    with pytest.raises(ConfigError, match=message) as info:
        ODEBlock(TanhMLP(), solver, gradient)
    assert "\n" not in str(info.value)
    if "Runge-Kutta" in message:
        assert "dopri5" in str(info.value) and "rk4" in str(info.value)
    if "mali" in message:
        assert "solver=dopri5" in str(info.value) and "solver=euler" in str(info.value)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.5, -1.0])
def test_mali_eta_validated(eta):
    with pytest.raises(ConfigError, match="adjoint.eta"):
        Gradient("mali", eta=eta)


def test_unknown_mode_lists_all_modes():
    with pytest.raises(ConfigError, match="checkpointed, aca, mali"):
        Gradient("backsolve")


@pytest.mark.parametrize("model", ["odenet", "rknet", "anode"])
@pytest.mark.parametrize("mode", NEW_MODES)
def test_config_selects_mode_for_every_ode_model(model, mode):
    cfg = C.compose([f"model={model}", f"model.gradient={mode}"])
    net = C.build_model(cfg, 1, 28, 10)
    blocks = [m for m in net.modules() if isinstance(m, ODEBlock)]
    assert blocks and all(b.gradient.mode == mode for b in blocks)
    assert blocks[0].gradient.eta == 1.0


@pytest.mark.parametrize("mode,solver", [("checkpointed", ["solver=rk4", "solver.step_size=0.5"]),
                                         ("aca", ["solver=rk4", "solver.step_size=0.5"]),
                                         ("mali", ["solver=euler", "solver.step_size=0.5"])])
def test_odenet_training_step_with_each_mode(mode, solver):
    cfg = C.compose(["model=odenet", f"model.gradient={mode}", *solver])
    torch.manual_seed(0)
    net = C.build_model(cfg, 1, 28, 10)
    x, y = torch.rand(2, 1, 28, 28), torch.randint(0, 10, (2,))
    r = activation_mib(net, x, y)
    expected = {"checkpointed": (8, 8), "aca": (8, 8), "mali": (3, 5)}[mode]
    assert (r["nfe_forward"], r["nfe_backward"]) == expected
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
