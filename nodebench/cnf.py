"""Continuous normalizing flows (Chen et al. 2018, section 4) and the discrete planar flow they
are compared with (Rezende & Mohamed 2015), on 2-D densities.

**Instantaneous change of variables** (Chen et al. 2018, Theorem 1): if ``dz/dt = f(t, z)`` then
``d log p(z(t))/dt = -tr(df/dz)``. A CNF solves the augmented state ``y = [z, l]`` (B, D + 1)
with ``dl/dt = -tr(df/dz)``, ``l(t0) = 0``, in one ODE solve: ``l(t1)`` is the change of the
log-density carried along the flow.

Vector fields (:class:`VectorField`, ``f(t, z)`` with ``z`` (B, D), ``t`` a 0-d tensor):

* :class:`PlanarField` (Chen et al. 2018 section 4, time-dependent dynamics): M planar units
  with gating, ``f(t, z) = sum_n sigma_n(t) u_n(t) h(w_n(t)^T z + b_n(t))``, ``h = tanh``, where
  ``w_n, u_n`` (D,), ``b_n`` and the gate logit of ``sigma_n = sigmoid(.)`` are the output of a
  hypernetwork of ``t`` (two tanh layers of ``hidden`` units, as in torchdiffeq's
  ``examples/cnf.py``; in the paper a neural network of t produces u, w and b). Its trace
  has a closed form, ``tr(df/dz) = sum_n sigma_n h'(a_n) u_n^T w_n``, exact in any D, O(M D).
* :class:`FreeFormField` (FFJORD, Grathwohl et al. 2019): an MLP of ``z`` whose every layer is
  modulated by ``t`` (FFJORD's "concatsquash" layers: ``(W x + b) * sigmoid(a t + c) + d t``).
* :class:`LinearField`: ``f(t, z) = z A^T``; ``tr(df/dz) = tr(A)``. The test case with a closed
  form: ``z(t) = exp(A t) z0`` and ``log p`` changes by ``-t tr(A)``.

Trace (``trace=`` of :class:`CNF`): ``closed_form`` (fields that have one:
:class:`ClosedFormTrace`), ``autograd`` (exact, D vector-Jacobian products, one per coordinate:
the choice for a free-form field in 2-D), ``hutchinson`` (FFJORD, Grathwohl et al. 2019,
section 3: ``tr(J) ~ eps^T J eps`` with ``eps`` Gaussian or Rademacher, drawn once per solve
and held fixed during it, which keeps the dynamics a smooth ODE and makes the estimate of
``int tr(J) dt`` unbiased; one vjp per evaluation).

**Flows** (:class:`Flow`: :class:`CNF`, :class:`PlanarFlow`) move points between the base
density N(0, I) and the data/target side in both directions and report the change of the
log-density carried along: ``to_target(z) -> (x, delta)`` with
``log q(x) = log N(z; 0, I) + delta``, and ``to_base(x) -> (z, delta)`` with
``log p(x) = log N(z; 0, I) - delta``. For the CNF both are ODE solves over [0, t1] (``to_base``
solves the time-reversed dynamics ``-f(t1 - s, z)`` forwards in s, so every gradient mode, which
all integrate forwards in time, applies to both directions; sampling by reversing the flow is
``to_target``). The planar flow computes one direction in closed form and inverts the other
numerically (:class:`PlanarFlow`).

**Losses** (Chen et al. 2018 section 4.1):

* density matching, :func:`density_matching_loss`: the reverse KL, ``E_{z ~ N(0, I)}[log q(x) +
  U(x)]`` with ``x = to_target(z)`` and the target ``p(x) ∝ exp(-U(x))``; it equals
  ``KL(q || p) - log Z`` (the free energy of Rezende & Mohamed 2015), so it is bounded below
  by ``-log Z``.
* maximum likelihood, :func:`mle_loss`: ``-E_data[log p(x)]`` (nats per sample).

Targets (:data:`ENERGIES`: Rezende & Mohamed 2015 Table 1, U1-U4) and data
(:data:`DATASETS`: Two Circles and Two Moons, Chen et al. 2018 Figure 5).

Counting: :class:`CNFDynamics` is a :class:`~nodebench.models.Dynamics`, the module the solver
calls; the field inside it is a plain ``nn.Module``, so each evaluation is counted once by the
instruments of :mod:`nodebench.instruments`. A CNF has two dynamics modules (``to_target`` and
``to_base``) sharing one field.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .errors import ConfigError
from .models.blocks import Dynamics
from .regularisers import NOISES, Penalties, Regularised, draw_noise, solve_with_penalties
from .solvers import Gradient, Solver, check_compatible, odesolve
from .validity import DEFAULT_THRESHOLD, reference_solver, relative_error

TRACES = ("closed_form", "autograd", "hutchinson")
LOG_2PI = math.log(2.0 * math.pi)
DENSITY_TOL = 1e-5  # rtol = atol of the CNF solves in Chen et al. 2018 section 4.1


def log_normal(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per row: ``z`` (B, D) -> (B,), in nats."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)


# ------------------------------------------------------------------------------ vector fields


class VectorField(nn.Module):
    """A time-dependent vector field ``f(t, z)`` on R^D: ``t`` 0-d, ``z`` (B, D) -> (B, D).

    Subclasses set ``dim``. A field is not a :class:`~nodebench.models.Dynamics` itself: the
    :class:`CNFDynamics` around it is the module the solver calls and the instruments count.
    """

    dim: int

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ClosedFormTrace(VectorField):
    """A field that returns ``tr(df/dz)`` in closed form along with ``f``."""

    def forward_and_trace(self, t: torch.Tensor, z: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """``(f (B, D), tr(df/dz) (B,))`` at ``(t, z)``."""
        raise NotImplementedError


class PlanarField(ClosedFormTrace):
    """The planar CNF's field with gating (Chen et al. 2018 section 4).

    ``f(t, z) = sum_{n=1}^{M} sigma_n(t) u_n(t) tanh(w_n(t)^T z + b_n(t))``; the hypernetwork
    ``t -> tanh(Linear(1, H)) -> tanh(Linear(H, H)) -> Linear(H, M (2 D + 2))`` gives ``w``
    (M, D), ``u`` (M, D), ``b`` (M,) and the gate logits (M,) (``sigma = sigmoid``).

    Args:
        dim: D, the dimension of z.
        width: M, the number of hidden units (Chen et al.: 1, 2, 32 in Figure 4, 64 in
            Figure 5).
        hidden: H, the width of the hypernetwork (32 in torchdiffeq's example).
    """

    def __init__(self, dim: int = 2, width: int = 32, hidden: int = 32) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("width", width), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"PlanarField {name} must be a positive integer, got {value!r}")
        self.dim, self.width = dim, width
        self.hyper = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                   nn.Tanh(), nn.Linear(hidden, width * (2 * dim + 2)))

    def parameters_at(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(w (M, D), u (M, D), b (M,), sigma (M,))`` at time ``t`` (0-d)."""
        m, d = self.width, self.dim
        dtype = self.hyper[0].weight.dtype
        out = self.hyper(t.reshape(1, 1).to(dtype)).reshape(-1)
        w = out[: m * d].reshape(m, d)
        u = out[m * d: 2 * m * d].reshape(m, d)
        b = out[2 * m * d: 2 * m * d + m]
        gate = torch.sigmoid(out[2 * m * d + m:])
        return w, u, b, gate

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w, u, b, gate = self.parameters_at(t)
        return (gate * torch.tanh(z @ w.T + b)) @ u

    def forward_and_trace(self, t: torch.Tensor, z: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        w, u, b, gate = self.parameters_at(t)
        h = torch.tanh(z @ w.T + b)                        # (B, M)
        f = (gate * h) @ u                                 # (B, D)
        trace = ((1.0 - h * h) * gate) @ (u * w).sum(1)    # sum_n sigma_n h'(a_n) u_n.w_n, (B,)
        return f, trace


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-modulated layer: ``(W x + b) * sigmoid(a t + c) + d t``; ``x`` (B, I)
    -> (B, O)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(1, 1).to(x.dtype)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus,
                                                   "elu": nn.ELU}


class FreeFormField(VectorField):
    """FFJORD's free-form field (Grathwohl et al. 2019, toy 2-D experiments): concatsquash
    layers ``D -> hidden[0] -> ... -> D`` with ``activation`` between them (not after the last).

    Args:
        dim: D.
        hidden: widths of the hidden layers (FFJORD's 2-D runs: 64-64-64).
        activation: ``tanh``, ``softplus`` or ``elu`` (smooth, so that the trace and the
            regularisers' higher derivatives exist).
    """

    def __init__(self, dim: int = 2, hidden: tuple[int, ...] = (64, 64, 64),
                 activation: str = "tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of: "
                              + ", ".join(ACTIVATIONS))
        widths = (dim, *hidden, dim)
        self.dim = dim
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b)
                                    for a, b in itertools.pairwise(widths))
        self.act = ACTIVATIONS[activation]()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = z
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


class LinearField(ClosedFormTrace):
    """``f(t, z) = z A^T`` with a fixed (buffer) or learnable matrix ``A`` (D, D)."""

    def __init__(self, A: torch.Tensor, learnable: bool = False) -> None:
        super().__init__()
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ConfigError(f"A must be a square matrix, got shape {tuple(A.shape)}")
        self.dim = A.shape[0]
        if learnable:
            self.A = nn.Parameter(A.clone())
        else:
            self.register_buffer("A", A.clone())

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T

    def forward_and_trace(self, t, z):
        return self.forward(t, z), torch.diagonal(self.A).sum().expand(z.shape[0])


# ---------------------------------------------------------------------------- trace estimators


def trace_autograd(f: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Exact ``tr(df/dz)`` per sample by D vector-Jacobian products (one per coordinate).

    ``f`` (B, D) computed from ``z`` (B, D) with a graph; samples must not interact. (B,).
    """
    total = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for i in range(f.shape[1]):
        (g,) = torch.autograd.grad(f[:, i].sum(), z, create_graph=create_graph, retain_graph=True)
        total = total + g[:, i]
    return total


def trace_hutchinson(f: torch.Tensor, z: torch.Tensor, noise: torch.Tensor,
                     create_graph: bool) -> torch.Tensor:
    """Hutchinson's estimate ``eps^T (df/dz) eps`` per sample (B,) for the noise ``eps``
    (B, D) (Grathwohl et al. 2019 section 3; unbiased when ``E[eps eps^T] = I``)."""
    (vjp,) = torch.autograd.grad(f, z, noise, create_graph=create_graph, retain_graph=True)
    return (vjp * noise).sum(1)


# ------------------------------------------------------------------------------ CNF dynamics


class CNFDynamics(Dynamics):
    """``d/dt [z, l] = [f(t, z), -tr(df/dz)]`` on the state ``y = [z, l]`` (B, D + 1).

    With ``reverse=True``, the time-reversed system in ``s = t1 - t``:
    ``d/ds [z, l] = [-f(t1 - s, z), +tr(df/dz)(t1 - s, z)]``; solved over s in [0, t1] it
    carries points from t = t1 back to t = 0 (``l`` then accumulates ``log p(t=0) - log p(t1)``
    along the path).

    Args:
        field: the vector field.
        trace: ``closed_form`` (the field must be a :class:`ClosedFormTrace`), ``autograd``
            (exact) or ``hutchinson``.
        noise: ``gaussian`` or ``rademacher`` (Hutchinson only); drawn by :meth:`draw_noise`
            before each solve and held until the next (with the adjoint, backward must come
            before the next solve of this module).
        reverse: solve the time-reversed system.
        t1: end of the flow's time interval (used by ``reverse``).

    Raises:
        ConfigError: an unknown trace or noise, ``closed_form`` for a field without one.
    """

    def __init__(self, field: VectorField, trace: str = "closed_form", noise: str = "gaussian",
                 reverse: bool = False, t1: float = 1.0) -> None:
        super().__init__()
        if not isinstance(field, VectorField):
            raise ConfigError(f"a CNF field must be a nodebench.cnf.VectorField, got "
                              f"{type(field).__name__}")
        if trace not in TRACES:
            raise ConfigError(f"unknown trace {trace!r}; choose one of: {', '.join(TRACES)}")
        if trace == "closed_form" and not isinstance(field, ClosedFormTrace):
            raise ConfigError(f"trace=closed_form needs a field with a closed-form trace "
                              f"(PlanarField, LinearField), not {type(field).__name__}; use "
                              "trace=autograd or trace=hutchinson")
        if noise not in NOISES:
            raise ConfigError(f"unknown noise {noise!r}; choose one of: {', '.join(NOISES)}")
        self.field = field
        self.trace, self.noise_kind, self.reverse, self.t1 = trace, noise, reverse, float(t1)
        self.noise: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.field.dim

    def draw_noise(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Draw this solve's Hutchinson noise, shaped like the points ``z`` (B, D)."""
        if self.trace == "hutchinson":
            self.noise = draw_noise(z, self.noise_kind, generator)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.dim
        grad_on = torch.is_grad_enabled()
        time = (self.t1 - t) if self.reverse else t
        with torch.enable_grad():
            z = y[:, :d]
            if self.trace == "closed_form":
                f, trace = self.field.forward_and_trace(time, z)
            else:
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                f = self.field(time, z)
                if self.trace == "autograd":
                    trace = trace_autograd(f, z, create_graph=grad_on)
                else:
                    if self.noise is None or self.noise.shape != f.shape:
                        raise RuntimeError("Hutchinson noise does not match the state: call "
                                           "draw_noise() with this batch before solving")
                    trace = trace_hutchinson(f, z, self.noise, create_graph=grad_on)
        out = torch.cat([-f, trace[:, None]], 1) if self.reverse \
            else torch.cat([f, -trace[:, None]], 1)
        return out if grad_on else out.detach()

    def extra_repr(self) -> str:
        noise = f", noise={self.noise_kind}" if self.trace == "hutchinson" else ""
        return f"trace={self.trace}{noise}, reverse={self.reverse}, t1={self.t1:g}"


# ---------------------------------------------------------------------------------- the flows


class FlowOutput(NamedTuple):
    """Points carried by a flow (B, D); the change of log-density along the map ``delta``
    (B,), nats; the integrated penalties (B, k) or None (:mod:`nodebench.regularisers`)."""

    points: torch.Tensor
    delta_logp: torch.Tensor
    penalties: torch.Tensor | None = None


class Flow(nn.Module):
    """A normalizing flow between N(0, I) on R^D and the target/data side (module doc).

    ``to_target(z)``: ``log q(x) = log N(z) + delta``; ``to_base(x)``: ``log p(x) = log N(z) -
    delta``. ``penalties`` is the :class:`~nodebench.regularisers.Penalties` the flow
    integrates (None: none).
    """

    dim: int
    penalties: Penalties | None = None

    def to_target(self, z: torch.Tensor, generator: torch.Generator | None = None
                  ) -> FlowOutput:  # pragma: no cover
        """Carry base points ``z`` (B, D) to the target side; ``generator``: for any noise the
        flow draws (Hutchinson's)."""
        raise NotImplementedError

    def to_base(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> FlowOutput:  # pragma: no cover
        """Carry points ``x`` (B, D) of the target side to the base."""
        raise NotImplementedError


class CNF(Flow):
    """A continuous normalizing flow over t in [0, t1]: the base at t = 0, the data at t = t1.

    Args:
        field: the vector field (:class:`PlanarField`, :class:`FreeFormField`, ...).
        solver: numerics (default dopri5 with rtol = atol = 1e-5, Chen et al.'s density
            tolerance).
        gradient: how gradients are taken (default the adjoint, as in Chen et al.).
        t1: length of the flow's time interval.
        trace: ``closed_form``, ``autograd`` or ``hutchinson`` (:class:`CNFDynamics`).
        noise: Hutchinson's noise, ``gaussian`` or ``rademacher``.
        penalties: RNODE/TayNODE penalties integrated on ``z`` (not on the log-density) in
            every solve while ``penalise`` (default: in training mode); see
            :mod:`nodebench.regularisers`. The Frobenius term draws its own noise and takes its
            own vjp, also with ``trace=hutchinson`` (RNODE's code reuses the trace's noise and
            vjp for both, saving one vjp per evaluation).

    Raises:
        ConfigError: an invalid trace, noise, solver or gradient combination.
    """

    def __init__(self, field: VectorField, solver: Solver | None = None,
                 gradient: Gradient | None = None, *, t1: float = 1.0,
                 trace: str = "closed_form", noise: str = "gaussian",
                 penalties: Penalties | None = None) -> None:
        super().__init__()
        self.solver = solver if solver is not None else Solver("dopri5", rtol=DENSITY_TOL,
                                                               atol=DENSITY_TOL)
        self.gradient = gradient if gradient is not None else Gradient("adjoint")
        check_compatible(self.solver, self.gradient)
        if not (isinstance(t1, (int, float)) and math.isfinite(t1) and t1 > 0):
            raise ConfigError(f"t1 must be a positive number, got {t1!r}")
        self.field = field
        self.dim = field.dim
        self.dynamics = nn.ModuleDict({
            "to_target": CNFDynamics(field, trace, noise, reverse=False, t1=t1),
            "to_base": CNFDynamics(field, trace, noise, reverse=True, t1=t1)})
        self.penalties = penalties if penalties is not None and penalties.active else None
        self.penalised = None if self.penalties is None else nn.ModuleDict({
            key: Regularised(dyn, self.penalties, features=self.dim)
            for key, dyn in self.dynamics.items()})
        self.t1 = float(t1)

    def _transport(self, key: str, points: torch.Tensor, penalise: bool | None,
                   generator: torch.Generator | None) -> FlowOutput:
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ConfigError(f"points must have shape (B, {self.dim}), got {tuple(points.shape)}")
        penalise = self.training if penalise is None else penalise
        dynamics = self.dynamics[key]
        dynamics.draw_noise(points, generator)
        y0 = torch.cat([points, points.new_zeros(points.shape[0], 1)], 1)
        # made in the points' dtype from the Python float: a float32 buffer cast to float64 would
        # carry float32's rounding of t1 (7e-9 relative) into every solve
        t = torch.tensor([0.0, self.t1], dtype=points.dtype, device=points.device)
        if penalise and self.penalised is not None:
            y, r = solve_with_penalties(self.penalised[key], y0, t, self.solver, self.gradient,
                                        generator)
            y, r = y[-1], r[-1]
            # for the training loop (nodebench.regularisers.take_penalties); consumed by
            # _with_penalties when a loss function of this module adds them itself
            self.pending_penalties = (self.penalties.weighted(r), self.penalties.as_dict(r))
        else:
            y, r = odesolve(dynamics, y0, t, self.solver, self.gradient)[-1], None
        return FlowOutput(y[:, :self.dim], y[:, self.dim], r)

    def to_target(self, z: torch.Tensor, generator: torch.Generator | None = None,
                  penalise: bool | None = None) -> FlowOutput:
        """Carry base points ``z`` (B, D) from t = 0 to t = t1 (sampling, density matching)."""
        return self._transport("to_target", z, penalise, generator)

    def to_base(self, x: torch.Tensor, generator: torch.Generator | None = None,
                penalise: bool | None = None) -> FlowOutput:
        """Carry data points ``x`` (B, D) from t = t1 back to t = 0 (maximum likelihood)."""
        return self._transport("to_base", x, penalise, generator)

    def extra_repr(self) -> str:
        return f"solver={self.solver.describe()}, gradient={self.gradient.describe()}, " \
               f"t1={self.t1:g}"


ORIENTATIONS = ("generative", "normalizing")


class PlanarFlow(Flow):
    """K planar layers (Rezende & Mohamed 2015 section 4.1):
    ``g_k(z) = z + u_hat_k tanh(w_k^T z + b_k)``, with
    ``log|det dg_k/dz| = log|1 + u_hat_k^T psi_k(z)|``, ``psi_k(z) = tanh'(w_k^T z + b_k) w_k``.

    Invertibility (their appendix): ``u_hat = u + (m(w^T u) - w^T u) w / ||w||^2`` with
    ``m(x) = -1 + softplus(x)``, so that ``w^T u_hat > -1`` and each layer is a bijection.

    Orientation: ``generative`` (the layers map base -> target: density matching, as in Rezende
    & Mohamed) or ``normalizing`` (the layers map data -> base: maximum likelihood, Chen et al.
    Figure 5). The other direction inverts each layer numerically: along ``w`` the layer is the
    scalar map ``alpha -> alpha + c tanh(alpha + b)`` (``alpha = w^T z``, ``c = w^T u_hat``),
    increasing, solved by bisection on ``[s - |c|, s + |c|]`` to machine precision; one Newton
    step with a graph then gives the inverse's gradient (implicit function theorem).

    Args:
        dim: D.
        layers: K.
        orientation: ``generative`` or ``normalizing``.
        scale: standard deviation of the initial ``w`` and ``u`` (``b`` starts at 0).
    """

    def __init__(self, dim: int = 2, layers: int = 32, orientation: str = "generative",
                 scale: float = 0.1) -> None:
        super().__init__()
        if orientation not in ORIENTATIONS:
            raise ConfigError(f"unknown orientation {orientation!r}; choose one of: "
                              + ", ".join(ORIENTATIONS))
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ConfigError(f"layers must be a positive integer, got {layers!r}")
        self.dim, self.layers, self.orientation = dim, layers, orientation
        self.w = nn.Parameter(torch.randn(layers, dim) * scale)
        self.u = nn.Parameter(torch.randn(layers, dim) * scale)
        self.b = nn.Parameter(torch.zeros(layers))

    def u_hat(self) -> torch.Tensor:
        """The constrained ``u_hat`` (K, D), ``w_k^T u_hat_k > -1``."""
        wu = (self.w * self.u).sum(1)
        m = -1.0 + nn.functional.softplus(wu)
        return self.u + ((m - wu) / self.w.pow(2).sum(1))[:, None] * self.w

    def forward_layers(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g_K o ... o g_1 (z), sum_k log|det dg_k/dz|)``: (B, D), (B,)."""
        u_hat = self.u_hat()
        logdet = z.new_zeros(z.shape[0])
        for k in range(self.layers):
            h = torch.tanh(z @ self.w[k] + self.b[k])                      # (B,)
            psi_u = (1.0 - h * h) * (self.w[k] @ u_hat[k])                  # psi(z)^T u_hat
            logdet = logdet + torch.log(torch.abs(1.0 + psi_u))
            z = z + h[:, None] * u_hat[k]
        return z, logdet

    def inverse_layers(self, y: torch.Tensor, iterations: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, sum_k log|det dg_k/dz|)`` with ``z = g_1^-1 o ... o g_K^-1 (y)``: (B, D), (B,).

        ``iterations``: bisection halvings per layer (64 reach machine precision in float64 for
        any ``|c|`` below 1e3).
        """
        u_hat = self.u_hat()
        logdet = y.new_zeros(y.shape[0])
        for k in reversed(range(self.layers)):
            w, b, uk = self.w[k], self.b[k], u_hat[k]
            c = w @ uk
            s = y @ w
            with torch.no_grad():
                lo, hi = s - c.abs(), s + c.abs()
                for _ in range(iterations):
                    mid = 0.5 * (lo + hi)
                    above = mid + c * torch.tanh(mid + b) > s
                    hi = torch.where(above, mid, hi)
                    lo = torch.where(above, lo, mid)
                alpha0 = 0.5 * (lo + hi)
            th = torch.tanh(alpha0 + b)
            alpha = alpha0 - (alpha0 + c * th - s) / (1.0 + c * (1.0 - th * th))  # Newton, graph
            h = torch.tanh(alpha + b)
            y = y - h[:, None] * uk
            logdet = logdet + torch.log(torch.abs(1.0 + (1.0 - h * h) * c))
        return y, logdet

    def to_target(self, z: torch.Tensor, generator: torch.Generator | None = None) -> FlowOutput:
        if self.orientation == "generative":
            x, logdet = self.forward_layers(z)
            return FlowOutput(x, -logdet)
        x, logdet = self.inverse_layers(z)
        return FlowOutput(x, logdet)

    def to_base(self, x: torch.Tensor, generator: torch.Generator | None = None) -> FlowOutput:
        if self.orientation == "normalizing":
            z, logdet = self.forward_layers(x)
            return FlowOutput(z, -logdet)
        z, logdet = self.inverse_layers(x)
        return FlowOutput(z, logdet)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layers={self.layers}, orientation={self.orientation}"


# ----------------------------------------------------------------------- targets and datasets


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * math.pi * z[:, 0] / 4.0)


def _w2(z: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.exp(-0.5 * ((z[:, 0] - 1.0) / 0.6) ** 2)


def _w3(z: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.sigmoid((z[:, 0] - 1.0) / 0.3)


def _neg_logsumexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``-log(exp(a) + exp(b))``, elementwise and stable."""
    return -torch.logaddexp(a, b)


def energy_u1(z: torch.Tensor) -> torch.Tensor:
    """U1, the ring with two modes: ``1/2 ((||z|| - 2)/0.4)^2 - log(exp(-1/2 ((z1 - 2)/0.6)^2)
    + exp(-1/2 ((z1 + 2)/0.6)^2))``."""
    ring = 0.5 * ((z.norm(dim=1) - 2.0) / 0.4) ** 2
    return ring + _neg_logsumexp(-0.5 * ((z[:, 0] - 2.0) / 0.6) ** 2,
                                 -0.5 * ((z[:, 0] + 2.0) / 0.6) ** 2)


def energy_u2(z: torch.Tensor) -> torch.Tensor:
    """U2, the sine wave: ``1/2 ((z2 - w1(z))/0.4)^2``, ``w1(z) = sin(2 pi z1 / 4)``."""
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2


def energy_u3(z: torch.Tensor) -> torch.Tensor:
    """U3, two waves joined by a bump: ``-log(exp(-1/2 ((z2 - w1)/0.35)^2) +
    exp(-1/2 ((z2 - w1 + w2)/0.35)^2))``, ``w2(z) = 3 exp(-1/2 ((z1 - 1)/0.6)^2)``."""
    d = z[:, 1] - _w1(z)
    return _neg_logsumexp(-0.5 * (d / 0.35) ** 2, -0.5 * ((d + _w2(z)) / 0.35) ** 2)


def energy_u4(z: torch.Tensor) -> torch.Tensor:
    """U4, two waves joined by a step: ``-log(exp(-1/2 ((z2 - w1)/0.4)^2) +
    exp(-1/2 ((z2 - w1 + w3)/0.35)^2))``, ``w3(z) = 3 sigmoid((z1 - 1)/0.3)``."""
    d = z[:, 1] - _w1(z)
    return _neg_logsumexp(-0.5 * (d / 0.4) ** 2, -0.5 * ((d + _w3(z)) / 0.35) ** 2)


# name -> U: the unnormalised target p(z) ∝ exp(-U(z)); z (B, 2) -> U (B,), nats.
# Rezende & Mohamed 2015 Table 1. U2-U4 do not decay along z1 (their mass is infinite on R^2):
# as in the paper's plots they are meant on the box [-4, 4]^2; :func:`log_partition` integrates
# over such a box.
ENERGIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "u1": energy_u1, "u2": energy_u2, "u3": energy_u3, "u4": energy_u4}


def energy(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The energy function ``name`` of :data:`ENERGIES`; ConfigError naming the choices."""
    if name not in ENERGIES:
        raise ConfigError(f"unknown target {name!r}; choose one of: {', '.join(ENERGIES)}")
    return ENERGIES[name]


def log_partition(U: Callable[[torch.Tensor], torch.Tensor], limit: float = 4.0,
                  points: int = 400) -> float:
    """``log Z = log int exp(-U(z)) dz`` over the box [-limit, limit]^2 by the midpoint rule
    on ``points`` x ``points`` cells (float64). With it, density matching's loss + log Z
    estimates KL(q || p) (of the target restricted to the box)."""
    cell = (2.0 * limit / points) ** 2
    grid = grid_points(limit, points, torch.float64)
    return float(torch.logsumexp(-U(grid), 0) + math.log(cell))


def two_circles(n: int, noise: float = 0.08, factor: float = 0.5, scale: float = 3.0,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """Two concentric circles (Chen et al. 2018 Figure 5), (n, 2): half the points at radius
    ``scale``, half at ``factor * scale``, angles uniform, then Gaussian noise of standard
    deviation ``noise * scale`` per coordinate. The constants are those of FFJORD's "circles"
    (scikit-learn's ``make_circles(factor=0.5, noise=0.08)`` times 3)."""
    inner = torch.arange(n) >= n // 2
    angle = 2.0 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    radius = torch.where(inner, factor, 1.0).to(torch.float64)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (scale * x).to(dtype)


def two_moons(n: int, noise: float = 0.1, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Two interleaved half circles (Chen et al. 2018 Figure 5), (n, 2): scikit-learn's
    ``make_moons`` construction (upper moon ``(cos a, sin a)``, lower moon
    ``(1 - cos a, 1/2 - sin a)``, ``a`` uniform in [0, pi], Gaussian noise ``noise``), mapped by
    ``2 x + (-1, -0.2)`` to centre it, as FFJORD's "moons"."""
    lower = torch.arange(n) >= n // 2
    a = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    x = torch.where(lower, 1.0 - torch.cos(a), torch.cos(a))
    y = torch.where(lower, 0.5 - torch.sin(a), torch.sin(a))
    pts = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator,
                                                       dtype=torch.float64)
    return (2.0 * pts + torch.tensor([-1.0, -0.2], dtype=torch.float64)).to(dtype)


# name -> sampler(n, generator=..., dtype=...) -> (n, 2)
DATASETS: dict[str, Callable[..., torch.Tensor]] = {"circles": two_circles, "moons": two_moons}


def dataset(name: str) -> Callable[..., torch.Tensor]:
    """The sampler ``name`` of :data:`DATASETS`; ConfigError naming the choices."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


# ------------------------------------------------ config builders (conf/model, conf/dataset)


def _penalties(penalties) -> Penalties | None:
    if penalties is None or isinstance(penalties, Penalties):
        return penalties
    try:
        return Penalties(**dict(penalties))
    except TypeError as err:
        raise ConfigError(f"model.penalties: {err}") from None


def planar_cnf(solver: Solver, gradient: Gradient, dim: int = 2, units: int = 32,
               hidden: int = 32, t1: float = 1.0, trace: str = "closed_form",
               noise: str = "gaussian", penalties=None, orientation: str = "generative") -> CNF:
    """The planar CNF of Chen et al. 2018 section 4 (``conf/model/cnf.yaml``): a :class:`CNF`
    over [0, ``t1``] with a :class:`PlanarField` of ``units`` = M hidden units and a
    hypernetwork of ``hidden`` units. ``penalties``: a dict of :class:`Penalties` fields (RNODE,
    TayNODE). ``orientation`` is accepted for symmetry with :func:`planar_nf` and ignored: a CNF
    is an ODE solve in both directions. Raises ConfigError for invalid values."""
    if orientation not in ORIENTATIONS:
        raise ConfigError(f"unknown orientation {orientation!r}; choose one of: "
                          + ", ".join(ORIENTATIONS))
    _check_units(units)
    return CNF(PlanarField(dim, units, hidden), solver, gradient, t1=t1, trace=trace, noise=noise,
               penalties=_penalties(penalties))


def planar_nf(dim: int = 2, units: int = 32, orientation: str = "generative",
              scale: float = 0.1) -> PlanarFlow:
    """The planar normalizing flow of Rezende & Mohamed 2015 (``conf/model/planar_nf.yaml``):
    :class:`PlanarFlow` with K = ``units`` layers, the baseline of Chen et al. 2018 Figures 4-5.
    ``orientation`` comes from the dataset: ``generative`` for density matching,
    ``normalizing`` for maximum likelihood."""
    _check_units(units)
    return PlanarFlow(dim, units, orientation, scale)


def _check_units(units) -> None:
    if not isinstance(units, int) or isinstance(units, bool) or units < 1:
        raise ConfigError(f"model.units must be a positive integer, got {units!r}")


@dataclasses.dataclass
class DensityTarget:
    """A 2-D target density ``p(x) ∝ exp(-U(x))`` for density matching (Chen et al. 2018
    Figure 4): ``name`` (u1..u4), ``U`` (B, 2) -> (B,), ``log_z`` (:func:`log_partition` over
    [-``limit``, ``limit``]^2), ``test_z`` (N, 2): fixed base draws on which the loss and the
    KL are evaluated."""

    name: str
    U: Callable[[torch.Tensor], torch.Tensor]
    log_z: float
    limit: float
    test_z: torch.Tensor


def density_target(target: str = "u1", limit: float = 4.0, test_samples: int = 4096,
                   seed: int = 0) -> DensityTarget:
    """``conf/dataset/density.yaml``: the energy ``target`` of :data:`ENERGIES` with its log
    partition function and ``test_samples`` base draws (generator seeded by ``seed``).
    Raises ConfigError for an unknown target or a non-positive size."""
    U = energy(target)
    if not isinstance(test_samples, int) or test_samples < 1:
        raise ConfigError(f"dataset.test_samples must be a positive integer, got {test_samples!r}")
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    return DensityTarget(target, U, log_partition(U, limit), float(limit),
                         torch.randn(test_samples, 2, generator=gen))


@dataclasses.dataclass
class PointSamples:
    """Samples of a 2-D data density for maximum likelihood (Chen et al. 2018 Figure 5):
    ``x`` (N, 2) training points, ``test_x`` (M, 2) held-out points."""

    name: str
    x: torch.Tensor
    test_x: torch.Tensor


def point_samples(sampler: str = "circles", n_train: int = 8192, n_test: int = 2048,
                  noise: float | None = None, seed: int = 0) -> PointSamples:
    """``conf/dataset/two_circles.yaml``, ``two_moons.yaml``: ``n_train`` + ``n_test`` samples
    of :data:`DATASETS` ``sampler`` (``noise``: the sampler's default when None), generator seeded
    by ``seed``. Raises ConfigError for an unknown name or a non-positive size."""
    draw = dataset(sampler)
    for key, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"dataset.{key} must be a positive integer, got {value!r}")
    gen = torch.Generator().manual_seed(int(seed))
    extra = {} if noise is None else {"noise": float(noise)}
    x = draw(n_train + n_test, generator=gen, **extra)
    order = torch.randperm(n_train + n_test, generator=gen)  # the samplers order by component
    x = x[order]
    return PointSamples(sampler, x[:n_train], x[n_train:])


# ---------------------------------------------------------------- validity (observed from outside)


def cnf_validity(cnf: CNF, z: torch.Tensor, threshold: float | None = None, seed: int = 0
                 ) -> dict:
    """Solve-validity checks of a CNF at the base points ``z`` (B, D), as
    :mod:`nodebench.validity` does for ODE blocks (not called by model code):

    * ``reference_error``, ``logp_reference_error``: ``to_target(z)``'s points and log-density
      change against a float64 copy of the CNF solved by dopri5 at rtol = atol = 1e-8
      (direct mode); the same Hutchinson noise in both (one generator seed), so only the
      solve differs;
    * ``round_trip_error``: ``to_base(to_target(z))`` against ``z`` with the CNF's own solver;
    * ``valid``: all three below ``threshold`` (default
      :data:`nodebench.validity.DEFAULT_THRESHOLD`, 1e-2).

    Errors are relative 2-norms over the batch (:func:`nodebench.validity.relative_error`).
    No penalties are integrated. Solver failures propagate.
    """
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    reference = copy.deepcopy(cnf).double()
    reference.solver, reference.gradient = reference_solver(), Gradient("direct")
    with torch.no_grad():
        out = cnf.to_target(z, torch.Generator(z.device).manual_seed(seed), penalise=False)
        ref = reference.to_target(z.double(), torch.Generator(z.device).manual_seed(seed),
                                  penalise=False)
        back = cnf.to_base(out.points, torch.Generator(z.device).manual_seed(seed + 1),
                           penalise=False)
    errors = {"reference_error": relative_error(out.points, ref.points),
              "logp_reference_error": relative_error(out.delta_logp, ref.delta_logp),
              "round_trip_error": relative_error(back.points, z)}
    return {**errors, "valid": all(e < threshold for e in errors.values()),
            "threshold": threshold}


# ------------------------------------------------------------------------------------ losses


def _like(flow: Flow) -> torch.Tensor:
    return next(flow.parameters())


def sample_base(flow: Flow, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws of N(0, I) in the flow's dimension, dtype and device: (n, D)."""
    p = _like(flow)
    return torch.randn(n, flow.dim, dtype=p.dtype, device=p.device, generator=generator)


def sample(flow: Flow, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` samples of the flow's density by carrying base draws to the target side (for a
    CNF trained by maximum likelihood: reversing the direction of training). (n, D)."""
    return flow.to_target(sample_base(flow, n, generator), generator).points


def log_density(flow: Flow, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """``log p(x)`` of the flow's density at ``x`` (B, D) -> (B,), nats."""
    out = flow.to_base(x, generator)
    return log_normal(out.points) - out.delta_logp


def grid_points(limit: float = 4.0, points: int = 100, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """The centres of a ``points`` x ``points`` grid of cells on [-limit, limit]^2, (P * P, 2),
    row-major with z2 along rows: ``values.reshape(P, P)`` is an image whose row i has
    ``z2 = centre_i`` (matplotlib's ``imshow(..., origin="lower", extent=(-limit, limit,
    -limit, limit))``). For the density figures (Chen et al. 2018 Figures 4 and 5)."""
    edge = torch.linspace(-limit, limit, points + 1, dtype=torch.float64)
    mid = 0.5 * (edge[1:] + edge[:-1])
    z2, z1 = torch.meshgrid(mid, mid, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], 1).to(dtype)


def _with_penalties(flow: Flow, loss: torch.Tensor, out: FlowOutput
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    metrics = {"loss": float(loss.detach())}
    if hasattr(flow, "pending_penalties"):
        flow.pending_penalties = None  # added here: not again by a training loop
    if out.penalties is None or flow.penalties is None:
        return loss, metrics
    metrics.update(flow.penalties.as_dict(out.penalties))
    total = loss + flow.penalties.weighted(out.penalties)
    metrics["total"] = float(total.detach())
    return total, metrics


def density_matching_loss(flow: Flow, U: Callable[[torch.Tensor], torch.Tensor],
                          batch_size: int, generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Chen et al. 2018 section 4.1, density matching: the reverse KL's Monte Carlo estimate
    ``mean_b [log q(x_b) + U(x_b)]``, ``x_b = to_target(z_b)``, ``z_b ~ N(0, I)``, which is
    ``KL(q || p) - log Z`` in expectation (nats).

    Returns ``(objective, metrics)``: the objective to minimise (the loss plus the weighted
    penalties, if the flow integrates any) and ``{"loss", and per penalty its batch mean,
    "total"}`` as floats. The caller runs ``backward()`` and the optimiser step.
    """
    z = sample_base(flow, batch_size, generator)
    out = flow.to_target(z, generator)
    loss = (log_normal(z) + out.delta_logp + U(out.points)).mean()
    return _with_penalties(flow, loss, out)


def mle_loss(flow: Flow, x: torch.Tensor, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Chen et al. 2018 section 4.1, maximum likelihood: ``-mean_b log p(x_b)`` for data ``x``
    (B, D), nats per sample. Returns ``(objective, metrics)`` as :func:`density_matching_loss`.
    """
    out = flow.to_base(x, generator)
    loss = -(log_normal(out.points) - out.delta_logp).mean()
    return _with_penalties(flow, loss, out)


__all__ = [
    "CNF",
    "DATASETS",
    "ENERGIES",
    "CNFDynamics",
    "ClosedFormTrace",
    "DensityTarget",
    "Flow",
    "FlowOutput",
    "FreeFormField",
    "LinearField",
    "PlanarField",
    "PlanarFlow",
    "PointSamples",
    "VectorField",
    "cnf_validity",
    "dataset",
    "density_matching_loss",
    "density_target",
    "energy",
    "energy_u1",
    "energy_u2",
    "energy_u3",
    "energy_u4",
    "grid_points",
    "log_density",
    "log_normal",
    "log_partition",
    "mle_loss",
    "planar_cnf",
    "planar_nf",
    "point_samples",
    "sample",
    "sample_base",
    "trace_autograd",
    "trace_hutchinson",
    "two_circles",
    "two_moons",
]
