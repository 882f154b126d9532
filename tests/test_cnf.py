"""Continuous normalizing flows and the planar flow (nodebench.cnf) against independent
references: autograd's full Jacobian, the closed form of a linear flow, Hutchinson's expectation,
the inverse map, hand-computed energies."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from nodebench.cnf import (
    CNF,
    ENERGIES,
    FreeFormField,
    LinearField,
    PlanarField,
    PlanarFlow,
    cnf_validity,
    dataset,
    density_matching_loss,
    energy,
    grid_points,
    log_density,
    log_normal,
    log_partition,
    mle_loss,
    sample,
    trace_autograd,
    trace_hutchinson,
    two_circles,
    two_moons,
)
from nodebench.errors import ConfigError
from nodebench.instruments import NFECounter, StepCounter
from nodebench.regularisers import Penalties
from nodebench.solvers import Gradient, Solver

F64 = torch.float64
TIGHT = Solver("dopri5", rtol=1e-10, atol=1e-10)
DIRECT = Gradient("direct")
A = torch.tensor([[-0.3, 1.0], [-0.5, 0.2]], dtype=F64)


def jacobian_trace(field, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """tr(df/dz) per sample from autograd's full (D, D) Jacobian of each sample."""
    traces = []
    for zb in z:
        jac = torch.autograd.functional.jacobian(lambda x: field(t, x[None])[0], zb)
        traces.append(torch.diagonal(jac).sum())
    return torch.stack(traces)


@pytest.mark.parametrize("dim, width", [(2, 5), (3, 4)])
def test_planar_closed_form_trace_matches_full_jacobian(dim, width):
    torch.manual_seed(0)
    field = PlanarField(dim, width).double()
    z = torch.randn(6, dim, dtype=F64) * 2
    for t in (0.0, 0.37, 1.0):
        tt = torch.tensor(t, dtype=F64)
        f, trace = field.forward_and_trace(tt, z)
        torch.testing.assert_close(f, field(tt, z), rtol=0, atol=1e-14)
        torch.testing.assert_close(trace, jacobian_trace(field, tt, z), rtol=1e-12, atol=1e-12)


def test_autograd_trace_matches_full_jacobian():
    torch.manual_seed(1)
    field = FreeFormField(3, (16, 16)).double()
    z = torch.randn(5, 3, dtype=F64).requires_grad_(True)
    tt = torch.tensor(0.4, dtype=F64)
    trace = trace_autograd(field(tt, z), z, create_graph=False)
    torch.testing.assert_close(trace, jacobian_trace(field, tt, z.detach()), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("trace", ["closed_form", "autograd"])
def test_linear_flow_log_density_closed_form(trace):
    """dz/dt = A z: z(t1) = exp(A t1) z0 and log p changes by -t1 tr(A), both directions."""
    t1 = 0.7
    cnf = CNF(LinearField(A), TIGHT, DIRECT, t1=t1, trace=trace)
    z0 = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = cnf.to_target(z0)
    torch.testing.assert_close(out.points, z0 @ torch.linalg.matrix_exp(A * t1).T, rtol=1e-8,
                               atol=1e-9)
    torch.testing.assert_close(out.delta_logp, torch.full((8,), -t1 * float(A.trace()), dtype=F64),
                               rtol=1e-9, atol=1e-9)
    back = cnf.to_base(out.points)
    torch.testing.assert_close(back.points, z0, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(back.delta_logp, -out.delta_logp, rtol=1e-9, atol=1e-9)
    # density of the pushed-forward Gaussian: N(exp(-A t1) x) / |det exp(A t1)|
    x = out.points
    expected = log_normal(x @ torch.linalg.matrix_exp(-A * t1).T) - t1 * A.trace()
    torch.testing.assert_close(log_density(cnf, x), expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_estimate_unbiased_pointwise(noise):
    """The mean of eps^T J eps over many draws is tr(J) within 4 standard errors."""
    torch.manual_seed(3)
    field = PlanarField(2, 6).double()
    tt = torch.tensor(0.5, dtype=F64)
    z1 = torch.tensor([[0.3, -0.8]], dtype=F64)
    exact = float(field.forward_and_trace(tt, z1)[1].detach())
    n = 20000
    z = z1.expand(n, 2).clone().requires_grad_(True)
    if noise == "gaussian":
        eps = torch.randn(n, 2, dtype=F64)
    else:
        eps = torch.randint(0, 2, (n, 2)).to(F64) * 2 - 1
    est = trace_hutchinson(field(tt, z), z, eps, create_graph=False)
    se = float(est.std()) / math.sqrt(n)
    assert se > 0
    assert abs(float(est.mean()) - exact) < 4 * se


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_cnf_unbiased_over_a_solve(noise):
    """With the noise fixed per solve, the integrated estimate of int tr(J) dt is unbiased:
    its mean over many copies of one point is the exact (closed-form trace) value."""
    torch.manual_seed(4)
    field = PlanarField(2, 4).double()
    solver = Solver("rk4", step_size=0.125)
    exact = CNF(field, solver, DIRECT, trace="closed_form")
    hutch = CNF(field, solver, DIRECT, trace="hutchinson", noise=noise)
    z = torch.tensor([[0.5, -1.0]], dtype=F64).expand(4000, 2)
    with torch.no_grad():
        ref = exact.to_target(z[:1]).delta_logp
        est = hutch.to_target(z, generator=torch.Generator().manual_seed(5)).delta_logp
    se = float(est.std()) / math.sqrt(est.numel())
    assert abs(float(est.mean() - ref)) < 4 * se


@pytest.mark.parametrize("mode", ["direct", "adjoint", "checkpointed"])
@pytest.mark.parametrize("kind", ["planar", "free_form"])
def test_sampling_by_reversal_round_trip(mode, kind):
    """to_base(to_target(z)) returns z and the two log-density changes cancel."""
    torch.manual_seed(6)
    if kind == "planar":
        field, trace = PlanarField(2, 8).double(), "closed_form"
    else:
        field, trace = FreeFormField(2, (16, 16)).double(), "autograd"
    cnf = CNF(field, TIGHT, Gradient(mode), trace=trace)
    z = torch.randn(16, 2, dtype=F64)
    with torch.no_grad():
        out = cnf.to_target(z)
        back = cnf.to_base(out.points)
    assert (out.points - z).abs().max() > 1e-2  # the flow moved the points
    torch.testing.assert_close(back.points, z, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(back.delta_logp, -out.delta_logp, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("trace", ["closed_form", "hutchinson"])
def test_gradients_direct_and_adjoint_agree(trace):
    """The trace is differentiable in the adjoint's backward solve (create_graph handling)."""
    torch.manual_seed(7)
    field = PlanarField(2, 3).double()
    solver = Solver("dopri5", rtol=1e-10, atol=1e-10)
    grads = []
    for mode in ("direct", "adjoint"):
        cnf = CNF(copy.deepcopy(field), solver, Gradient(mode), trace=trace)
        loss, _ = density_matching_loss(cnf, ENERGIES["u1"], 8,
                                        generator=torch.Generator().manual_seed(8))
        grads.append(torch.autograd.grad(loss, list(cnf.parameters())))
    for gd, ga in zip(*grads):
        torch.testing.assert_close(ga, gd, rtol=1e-6, atol=1e-8)


def test_mle_gradient_matches_finite_differences():
    torch.manual_seed(9)
    field = PlanarField(2, 2, hidden=4).double()
    cnf = CNF(field, TIGHT, DIRECT)
    x = two_moons(6, generator=torch.Generator().manual_seed(10), dtype=F64)
    params = list(cnf.parameters())
    loss, _ = mle_loss(cnf, x)
    grads = torch.autograd.grad(loss, params)
    p, g = params[-1], grads[-1]  # the hypernetwork's last bias
    h = 1e-5
    for i in (0, 3, p.numel() - 1):
        with torch.no_grad():
            p.view(-1)[i] += h
            up = mle_loss(cnf, x)[0]
            p.view(-1)[i] -= 2 * h
            down = mle_loss(cnf, x)[0]
            p.view(-1)[i] += h
        assert float(g.view(-1)[i]) == pytest.approx(float(up - down) / (2 * h), rel=1e-5,
                                                     abs=1e-8)


def test_losses_of_the_identity_flow():
    """With f = 0 and U = |x|^2/2, log q(x) + U(x) = -log(2 pi) for every sample; the MLE loss
    of data x is the mean of -log N(x)."""
    cnf = CNF(LinearField(torch.zeros(2, 2, dtype=F64), learnable=True), TIGHT, DIRECT)
    loss, metrics = density_matching_loss(cnf, lambda x: 0.5 * x.pow(2).sum(1), 32)
    assert float(loss.detach()) == pytest.approx(-math.log(2 * math.pi), abs=1e-12)
    assert set(metrics) == {"loss"}
    x = torch.randn(10, 2, dtype=F64)
    nll = float(mle_loss(cnf, x)[0].detach())
    assert nll == pytest.approx(float(-log_normal(x).mean()), abs=1e-12)


# ------------------------------------------------------------------------ planar flow (NF)


@pytest.mark.parametrize("dim", [2, 3])
def test_planar_flow_logdet_matches_autograd_determinant(dim):
    torch.manual_seed(11)
    nf = PlanarFlow(dim, 5, scale=1.0).double()
    z = torch.randn(7, dim, dtype=F64)
    _, logdet = nf.forward_layers(z)
    for b in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda x: nf.forward_layers(x[None])[0][0], z[b])
        expected = float(torch.linalg.slogdet(jac)[1])
        assert float(logdet[b].detach()) == pytest.approx(expected, abs=1e-11)


def test_planar_flow_invertibility_constraint():
    nf = PlanarFlow(2, 3).double()
    with torch.no_grad():
        nf.w.copy_(torch.tensor([[1.0, 0.0], [0.3, -2.0], [1.0, 1.0]]))
        nf.u.copy_(torch.tensor([[-5.0, 0.0], [10.0, 0.0], [0.0, 0.0]]))
    wu_hat = (nf.w * nf.u_hat()).sum(1)
    assert bool((wu_hat > -1).all())
    # w^T u_hat = m(w^T u) = -1 + softplus(w^T u), here w^T u = -5
    assert float(wu_hat[0].detach()) == pytest.approx(-1 + math.log1p(math.exp(-5.0)), rel=1e-12)


@pytest.mark.parametrize("orientation", ["generative", "normalizing"])
def test_planar_flow_round_trip_and_inverse_gradient(orientation):
    torch.manual_seed(12)
    nf = PlanarFlow(2, 6, orientation, scale=1.0).double()
    z = torch.randn(9, 2, dtype=F64)
    out = nf.to_target(z)
    back = nf.to_base(out.points)
    torch.testing.assert_close(back.points, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back.delta_logp, -out.delta_logp, rtol=1e-12, atol=1e-12)
    # the numerical inverse's Jacobian is the inverse of the forward Jacobian
    x0 = out.points[0].detach()
    j_fwd = torch.autograd.functional.jacobian(lambda v: nf.to_base(v[None]).points[0], x0)
    j_inv = torch.autograd.functional.jacobian(lambda v: nf.to_target(v[None]).points[0],
                                               back.points[0].detach())
    torch.testing.assert_close(j_fwd @ j_inv, torch.eye(2, dtype=F64), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------- targets and datasets


def test_energies_at_hand_computed_points():
    def gauss(x, m, s):
        return math.exp(-0.5 * ((x - m) / s) ** 2)

    z = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]], dtype=F64)
    expected = {"u1": [], "u2": [], "u3": [], "u4": []}
    for z1, z2 in z.tolist():
        w1 = math.sin(2 * math.pi * z1 / 4)
        w2 = 3 * gauss(z1, 1, 0.6)
        w3 = 3 / (1 + math.exp(-(z1 - 1) / 0.3))
        r = math.hypot(z1, z2)
        expected["u1"].append(0.5 * ((r - 2) / 0.4) ** 2
                              - math.log(gauss(z1, 2, 0.6) + gauss(z1, -2, 0.6)))
        expected["u2"].append(0.5 * ((z2 - w1) / 0.4) ** 2)
        expected["u3"].append(-math.log(gauss(z2 - w1, 0, 0.35) + gauss(z2 - w1 + w2, 0, 0.35)))
        expected["u4"].append(-math.log(gauss(z2 - w1, 0, 0.4) + gauss(z2 - w1 + w3, 0, 0.35)))
    for name, values in expected.items():
        torch.testing.assert_close(energy(name)(z), torch.tensor(values, dtype=F64), rtol=1e-12,
                                   atol=1e-12)
    assert float(energy("u2")(z[2:3])) == 0.0  # on the sine wave


def test_log_partition_of_a_gaussian():
    assert log_partition(lambda z: 0.5 * z.pow(2).sum(1), limit=8.0, points=200) \
        == pytest.approx(math.log(2 * math.pi), abs=1e-4)


def test_datasets_shapes_radii_and_determinism():
    gen = torch.Generator().manual_seed(13)
    circles = two_circles(1000, generator=gen)
    assert circles.shape == (1000, 2) and circles.dtype == torch.float32
    radius = circles.norm(dim=1)
    assert float(radius[:500].median()) == pytest.approx(3.0, abs=0.1)
    assert float(radius[500:].median()) == pytest.approx(1.5, abs=0.1)
    moons = two_moons(1000, generator=torch.Generator().manual_seed(13), dtype=F64)
    assert moons.dtype == F64 and bool(moons.abs().max() < 4)
    # the upper moon sits above the lower one on average
    assert float(moons[:500, 1].mean()) > float(moons[500:, 1].mean()) + 1
    again = dataset("moons")(1000, generator=torch.Generator().manual_seed(13), dtype=F64)
    assert torch.equal(moons, again)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="closed-form"):
        CNF(FreeFormField(2), trace="closed_form")
    with pytest.raises(ConfigError, match="unknown trace"):
        CNF(PlanarField(2, 2), trace="exact")
    with pytest.raises(ConfigError, match="unknown noise"):
        CNF(PlanarField(2, 2), trace="hutchinson", noise="uniform")
    with pytest.raises(ConfigError, match="shape"):
        CNF(PlanarField(2, 2)).to_target(torch.zeros(3, 3))
    with pytest.raises(ConfigError, match="unknown target"):
        energy("banana")
    with pytest.raises(ConfigError, match="unknown dataset"):
        dataset("spirals")
    with pytest.raises(ConfigError, match="orientation"):
        PlanarFlow(2, 2, "backwards")


# ------------------------------------------------------------------------------ instruments


def test_instruments_count_each_evaluation_once():
    """rk4 with 4 steps over [0, 1]: 16 evaluations per solve, seen once each by the NFE
    counter, with or without the penalty wrapper; the step counter sees the 4 grid steps."""
    for penalties in (None, Penalties(kinetic=1.0, frobenius=1.0)):
        cnf = CNF(PlanarField(2, 4), Solver("rk4", step_size=0.25), DIRECT, penalties=penalties)
        nfe = NFECounter(cnf)
        steps = StepCounter(cnf, phases=nfe)
        with nfe.phase_("forward"):
            out = cnf.to_target(torch.randn(5, 2))
            cnf.to_base(out.points)
        assert nfe.take("forward") == 32
        assert (out.penalties is not None) == (penalties is not None)
        assert steps.take("forward")["grid"] == 8
        nfe.remove()
        steps.remove()


def test_adjoint_counts_backward_evaluations_through_the_penalty_wrapper():
    cnf = CNF(PlanarField(2, 4), Solver("dopri5", rtol=1e-5, atol=1e-5), Gradient("adjoint"),
              penalties=Penalties(kinetic=0.1))
    nfe = NFECounter(cnf)
    steps = StepCounter(cnf, phases=nfe)
    with nfe.phase_("forward"):
        loss, metrics = density_matching_loss(cnf, ENERGIES["u1"], 16)
    with nfe.phase_("backward"):
        loss.backward()
    forward, backward = nfe.take("forward"), nfe.take("backward")
    taken_f, taken_b = steps.take("forward"), steps.take("backward")
    assert forward == 2 + 6 * (taken_f["accepted"] + taken_f["rejected"])
    assert taken_f["accepted"] > 0 and taken_b["accepted"] > 0 and backward > 0
    assert set(metrics) == {"loss", "kinetic", "total"}


# -------------------------------------------------------------------------------- training


def test_a_few_steps_of_training_lower_the_loss():
    """MLE on Two Moons (CNF and NF) and density matching on U1 (CNF) improve in 30 steps."""
    torch.manual_seed(14)
    data = two_moons(256, generator=torch.Generator().manual_seed(15))
    solver = Solver("rk4", step_size=0.25)
    cases = [
        (CNF(PlanarField(2, 16), solver, DIRECT), lambda f: mle_loss(f, data)),
        (PlanarFlow(2, 16, "normalizing"), lambda f: mle_loss(f, data)),
        (CNF(PlanarField(2, 16), solver, DIRECT),
         lambda f: density_matching_loss(f, ENERGIES["u1"], 256,
                                         generator=torch.Generator().manual_seed(16))),
    ]
    for flow, objective in cases:
        opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
        first = float(objective(flow)[0].detach())
        for _ in range(30):
            opt.zero_grad()
            objective(flow)[0].backward()
            opt.step()
        assert float(objective(flow)[0].detach()) < first - 0.05, type(flow).__name__
    samples = sample(cases[0][0], 50)
    assert samples.shape == (50, 2) and bool(torch.isfinite(samples).all())


def test_grid_points_layout():
    grid = grid_points(2.0, 4, F64)
    assert grid.shape == (16, 2)
    image = grid.reshape(4, 4, 2)
    torch.testing.assert_close(image[0, :, 0], torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=F64))
    torch.testing.assert_close(image[:, 0, 1], torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=F64))


def test_every_gradient_mode_agrees_on_a_penalised_ffjord():
    """Free-form field, Hutchinson trace and all three penalties: the gradient of the
    density-matching objective is the same (to the solver tolerance) in the adjoint and
    checkpointing modes as in direct backprop. (mali agrees too, to 1e-9 at rtol 1e-9, but its
    second-order ALF steps need thousands of evaluations at such tolerances: too slow here.)"""
    torch.manual_seed(17)
    field = FreeFormField(2, (8, 8)).double()
    penalties = Penalties(kinetic=0.1, frobenius=0.1, taylor=0.1)
    solver = Solver("dopri5", rtol=1e-8, atol=1e-8)
    grads = {}
    for mode in ("direct", "adjoint", "checkpointed", "aca"):
        cnf = CNF(copy.deepcopy(field), solver, Gradient(mode), trace="hutchinson",
                  penalties=penalties)
        loss, metrics = density_matching_loss(cnf, ENERGIES["u2"], 8,
                                              generator=torch.Generator().manual_seed(18))
        assert set(metrics) == {"loss", "kinetic", "frobenius", "taylor", "total"}
        grads[mode] = torch.cat([g.reshape(-1) for g in
                                 torch.autograd.grad(loss, list(cnf.parameters()))])
    for mode, g in grads.items():
        assert float((g - grads["direct"]).norm() / grads["direct"].norm()) < 1e-5, mode


@pytest.mark.parametrize("trace", ["closed_form", "hutchinson"])
def test_cnf_validity_checks(trace):
    """A tight solve passes; a one-step Euler solve of the same flow fails the checks."""
    torch.manual_seed(19)
    field = PlanarField(2, 8, hidden=8)
    z = torch.randn(32, 2)
    good = cnf_validity(CNF(field, Solver("dopri5", rtol=1e-6, atol=1e-6), DIRECT, t1=3.0,
                            trace=trace), z)
    assert good["valid"] and good["reference_error"] < 1e-4
    assert good["logp_reference_error"] < 1e-4 and good["round_trip_error"] < 1e-4
    bad = cnf_validity(CNF(field, Solver("euler", step_size=3.0), DIRECT, t1=3.0, trace=trace),
                       z, threshold=1e-3)
    assert not bad["valid"] and bad["round_trip_error"] > 1e-3
