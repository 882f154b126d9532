"""Penalties that make Neural ODEs cheaper to solve, integrated along the solve as extra state.

A :class:`Regularised` module wraps any dynamics ``f(t, y)`` (a
:class:`~nodebench.models.Dynamics`, a CNF's :class:`~nodebench.cnf.CNFDynamics`, any
``nn.Module`` called as ``f(t, y)`` on a batch ``y`` of shape (B, *S)) and solves the
augmented system

    d/dt [y, r_1, ..., r_k] = [f(t, y), rho_1(t, y), ..., rho_k(t, y)],   r_i(t0) = 0,

so that after one solve over [t0, t1] each ``r_i(t1)`` is the penalty ``int_{t0}^{t1} rho_i dt``
of that sample, computed by the same solver, gradient mode and error control as the model.
The penalty rates (per sample, on the first ``features`` entries ``z`` of the flattened state;
all of them by default, the point without the log-density for a CNF):

* ``kinetic`` (RNODE, Finlay et al. 2020, "How to train your neural ODE", the kinetic-energy
  term of their regularised objective): ``rho = ||f_z(t, y)||^2``, the squared speed.
* ``frobenius`` (RNODE, Finlay et al. 2020, the Jacobian term of the same objective):
  ``rho = ||eps^T df_z/dz||^2`` with ``eps`` ~ N(0, I) (or Rademacher), drawn once per solve by
  :meth:`Regularised.initial_state`; its expectation over ``eps`` is ``||df_z/dz||_F^2``
  (Hutchinson's estimator, as in Finlay et al.). One vector-Jacobian product per
  evaluation.
* ``taylor`` (TayNODE, Kelly et al. 2020, "Learning differential equations that are easy to
  solve"): ``rho = ||d^K z/dt^K||^2``, the K-th total time derivative of the solution
  through the point ``(t, y)``, for ``K`` = :attr:`Penalties.order` in {2, 3}. Built with
  reverse-mode autograd only: ``d^{k+1} z/dt^{k+1} = dg_k/dt + (dg_k/dy) f`` with
  ``g_1 = f``, each step a Jacobian-vector product taken by the double-vjp trick
  (``u -> (dg/d(t, y))^T u`` is linear in ``u``; differentiating it against the tangent
  ``(1, f)`` gives ``dg/dt + (dg/dy) f``). Exact (no estimator), and no extra call of ``f``;
  its cost grows quickly with K (a graph of order K + 1 derivatives for training), which is why
  only K = 2 and 3 are offered and tested. Kelly et al. compute the same quantity with
  Taylor-mode AD (JAX's ``jet``), which is cheaper for large K; torch has no Taylor mode.

Units: the state's units squared per time unit, integrated over time (``kinetic``:
``|y|^2 / time``; ``frobenius``: ``1 / time``; ``taylor``: ``|y|^2 / time^(2K - 1)``). Every
rate is a sum over the penalised entries, as in the papers' equations; Finlay et al.'s code
(cfinlay/ffjord-rnode) averages over the entries instead and halves the kinetic term, so their
weights lambda correspond to ``lambda / (2 d)`` and ``lambda / d`` here (d = ``features``).

**Counting.** The wrapper is *not* a :class:`~nodebench.models.Dynamics`: it calls its inner
module once per evaluation (``self.inner(t, y)``), and the NFE counters of
:mod:`nodebench.instruments`, which hook every ``Dynamics`` module of the model, count that call:
NFE stays the number of evaluations the solver asked for, with or without penalties. The
penalties' own cost (a vjp, a nested double-vjp) is not an evaluation and shows only in wall
time, which is why the regularisation study reports seconds as well as NFE. The step callbacks
that :class:`~nodebench.instruments.StepCounter` sets on the inner module are forwarded
(attribute look-ups of ``callback_*`` names are passed to the inner module, which is where
torchdiffeq 0.2.5 finds them on the function it is given).

**Assumptions.** Samples of the batch do not interact in ``f`` (as in every model here), so that
one Hutchinson vector per sample estimates that sample's Jacobian norm. The penalty channels are
part of the solved state and take part in the adaptive error control like any other entry (in
RNODE's code too); their values grow from 0, so they tighten the control when they are large.
With ``gradient=adjoint`` the Frobenius noise is the one drawn for the forward solve, held by the
module until the next :meth:`Regularised.initial_state`: call ``backward()`` before the next
solve with the same module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .solvers import Gradient, Solver, check_compatible, odesolve

NOISES = ("gaussian", "rademacher")
TAYLOR_ORDERS = (2, 3)
PENALTIES = ("kinetic", "frobenius", "taylor")
_CALLBACKS = ("callback_step", "callback_accept_step", "callback_reject_step",
              "callback_step_adjoint", "callback_accept_step_adjoint",
              "callback_reject_step_adjoint")


def draw_noise(like: torch.Tensor, kind: str = "gaussian",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise of ``like``'s shape, dtype and device with E[eps eps^T] = I.

    ``gaussian``: N(0, 1) entries; ``rademacher``: +-1 with probability 1/2 each (the lower
    variance choice for Hutchinson's estimator, Grathwohl et al. 2019).
    Gaussian draws are made in float64 and cast, so that one generator seed gives the same noise
    in every dtype (a float64 reference solve sees the noise of a float32 run).
    Raises ConfigError for another ``kind``.
    """
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=torch.float64, device=like.device,
                           generator=generator).to(like.dtype)
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ConfigError(f"unknown noise {kind!r}; choose one of: {', '.join(NOISES)}")


@dataclass(frozen=True)
class Penalties:
    """Which penalties to integrate and their weights in the loss.

    Args:
        kinetic: weight lambda_K of ``int ||f||^2 dt`` (0: not computed).
        frobenius: weight lambda_J of ``int ||df/dz||_F^2 dt`` (Hutchinson estimate; 0: not
            computed).
        taylor: weight of TayNODE's ``int ||d^K z/dt^K||^2 dt`` (0: not computed).
        order: K of the Taylor penalty, 2 or 3.
        noise: ``gaussian`` or ``rademacher``, the Hutchinson vectors of the Frobenius term.

    Raises:
        ConfigError: a negative or non-finite weight, an order outside {2, 3}, an unknown noise.
    """

    kinetic: float = 0.0
    frobenius: float = 0.0
    taylor: float = 0.0
    order: int = 2
    noise: str = "gaussian"

    def __post_init__(self) -> None:
        for name in PENALTIES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"penalty weight {name} must be a number >= 0, got {value!r}")
        if self.order not in TAYLOR_ORDERS or isinstance(self.order, bool):
            raise ConfigError(f"taylor order must be one of {TAYLOR_ORDERS} (K = 1 is the "
                              f"kinetic penalty; higher orders are not built), got {self.order!r}")
        if self.noise not in NOISES:
            raise ConfigError(f"unknown noise {self.noise!r}; choose one of: {', '.join(NOISES)}")

    @property
    def names(self) -> tuple[str, ...]:
        """The penalties with a positive weight, in the order of the state's extra channels."""
        return tuple(name for name in PENALTIES if getattr(self, name) > 0)

    @property
    def active(self) -> bool:
        return bool(self.names)

    def weighted(self, values: torch.Tensor) -> torch.Tensor:
        """``sum_i lambda_i mean_b values[b, i]``: the term to add to the loss (a scalar).

        ``values``: (B, k), the integrated penalties of :meth:`Regularised.split`, columns in the
        order of :attr:`names`.
        """
        weights = torch.tensor([float(getattr(self, n)) for n in self.names], dtype=values.dtype,
                               device=values.device)
        return (values.mean(0) * weights).sum()

    def as_dict(self, values: torch.Tensor) -> dict[str, float]:
        """The batch means of ``values`` (B, k) by name, e.g. ``{"kinetic": 0.3}``."""
        means = values.detach().mean(0)
        return {name: float(means[i]) for i, name in enumerate(self.names)}


def total_derivative(g: torch.Tensor, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor,
                     create_graph: bool) -> torch.Tensor:
    """``dg/dt + (dg/dx) v`` for ``g`` (B, m) computed from ``t`` (a 0-d tensor) and ``x``
    (B, n), with ``v`` (B, n) the velocity of ``x``: the derivative of ``g(t, x(t))`` along a
    trajectory with ``dx/dt = v``. Shape (B, m).

    The double-vjp trick (reverse mode only): ``w(u) = (dg/d(t, x))^T u`` is linear in ``u``;
    its vjp against the tangent ``(1, v)`` is ``dg/dt + (dg/dx) v``. ``g`` must have been
    computed with a graph to ``t`` and ``x`` (those not reached count as zero); with
    ``create_graph`` the result can be differentiated again, also through ``v``.
    """
    u = torch.zeros_like(g, requires_grad=True)
    gt, gx = torch.autograd.grad(g, (t, x), u, create_graph=True, allow_unused=True)
    outputs, tangents = [], []
    if gt is not None and gt.requires_grad:
        outputs.append(gt)
        tangents.append(torch.ones_like(gt))
    if gx is not None and gx.requires_grad:
        outputs.append(gx)
        tangents.append(v)
    if not outputs:
        return torch.zeros_like(g)
    (out,) = torch.autograd.grad(outputs, u, tangents, create_graph=create_graph,
                                 allow_unused=True)
    return torch.zeros_like(g) if out is None else out


class Regularised(nn.Module):
    """The dynamics ``inner`` with the penalties of ``penalties`` appended as extra state.

    State: (B, n + k) with ``n = prod(S)`` the flattened state of ``inner`` (shape (B, *S)) and
    ``k = len(penalties.names)`` integrated penalties; build it with :meth:`initial_state` and
    read it with :meth:`split`. Rates as in the module docstring, on the first ``features``
    entries of the flattened state (None: all ``n``).

    Args:
        inner: the dynamics, called as ``inner(t, y)`` with ``y`` (B, *S); returns (B, *S).
        penalties: which penalties (at least one weight > 0).
        features: number of leading entries of the flattened state that are penalised (a CNF
            passes its point dimension, leaving out the log-density).

    Raises:
        ConfigError: no active penalty, or ``features`` not a positive integer.
    """

    def __init__(self, inner: nn.Module, penalties: Penalties, features: int | None = None
                 ) -> None:
        super().__init__()
        if not penalties.active:
            raise ConfigError("Regularised needs at least one penalty with a weight > 0")
        if features is not None and (not isinstance(features, int) or isinstance(features, bool)
                                     or features < 1):
            raise ConfigError(f"features must be a positive integer, got {features!r}")
        self.inner = inner
        self.penalties = penalties
        self.features = features
        self.shape: tuple[int, ...] | None = None
        self.noise: torch.Tensor | None = None

    def __getattr__(self, name: str):
        # torchdiffeq looks up step callbacks on the function it is given; StepCounter sets them
        # on the inner (Dynamics) module.
        if name in _CALLBACKS:
            return getattr(self.inner, name)
        return super().__getattr__(name)

    @property
    def names(self) -> tuple[str, ...]:
        return self.penalties.names

    def initial_state(self, y0: torch.Tensor, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
        """``[y0 flattened, 0, ..., 0]`` (B, n + k) for the state ``y0`` (B, *S).

        Records the state shape and draws this solve's Frobenius noise (B, features). Raises
        ConfigError if ``features`` exceeds ``n``.
        """
        batch = y0.shape[0]
        self.shape = tuple(y0.shape[1:])
        flat = y0.reshape(batch, -1)
        m = self._features(flat.shape[1])
        if "frobenius" in self.names:
            self.noise = draw_noise(flat[:, :m], self.penalties.noise, generator)
        return torch.cat([flat, flat.new_zeros(batch, len(self.names))], dim=1)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state (..., B, *S), penalties (..., B, k))`` of an augmented state (..., B, n + k),
        e.g. the solution at all output times (T, B, n + k)."""
        k = len(self.names)
        state = y[..., :-k]
        return state.reshape(*y.shape[:-1], *self.shape), y[..., -k:]

    def _features(self, n: int) -> int:
        if self.features is None:
            return n
        if self.features > n:
            raise ConfigError(f"features={self.features} exceeds the state size {n}")
        return self.features

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``d/dt [y, r]`` (B, n + k) at time ``t`` (0-d) and augmented state ``y`` (B, n + k)."""
        if self.shape is None:
            raise RuntimeError("call initial_state() before solving with Regularised")
        names = self.names
        batch = y.shape[0]
        n = y.shape[1] - len(names)
        m = self._features(n)
        grad_on = torch.is_grad_enabled()
        needs_x = "frobenius" in names or "taylor" in names
        with torch.enable_grad():
            x = y[:, :n]
            if needs_x and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            tt = t
            if "taylor" in names and not t.requires_grad:
                tt = t.detach().requires_grad_(True)
            f = self.inner(tt, x.reshape(batch, *self.shape)).reshape(batch, n)
            fz = f[:, :m]
            rates = []
            if "kinetic" in names:
                rates.append(fz.pow(2).sum(1))
            if "frobenius" in names:
                noise = self.noise
                if noise is None or noise.shape != fz.shape:
                    raise RuntimeError("Frobenius noise does not match the state: call "
                                       "initial_state() with this batch before solving")
                (vjp,) = torch.autograd.grad(fz, x, noise, create_graph=grad_on,
                                             retain_graph=True)
                rates.append(vjp[:, :m].pow(2).sum(1))
            if "taylor" in names:
                g = fz
                for level in range(1, self.penalties.order):
                    last = level == self.penalties.order - 1
                    g = total_derivative(g, tt, x, f, create_graph=grad_on or not last)
                rates.append(g.pow(2).sum(1))
        out = torch.cat([f, torch.stack(rates, dim=1)], dim=1)
        return out if grad_on else out.detach()

    def extra_repr(self) -> str:
        parts = [f"{n}={getattr(self.penalties, n):g}" for n in self.names]
        if "taylor" in self.names:
            parts.append(f"order={self.penalties.order}")
        if "frobenius" in self.names:
            parts.append(f"noise={self.penalties.noise}")
        return ", ".join(parts) + (f", features={self.features}" if self.features else "")


def solve_with_penalties(func: Regularised, y0: torch.Tensor, t: torch.Tensor, solver: Solver,
                         gradient: Gradient, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``dy/dt = func.inner(t, y)`` from ``y0`` (B, *S) over ``t`` (T,) with the penalties
    integrated alongside. Returns ``(y(t) (T, B, *S), penalties (T, B, k))``; the penalties at
    ``t[-1]`` are the integrals over [t[0], t[-1]].

    Raises ConfigError for an incompatible solver and gradient mode (as
    :func:`nodebench.solvers.check_compatible`); solver failures as :func:`odesolve`.
    """
    check_compatible(solver, gradient)
    state = odesolve(func, func.initial_state(y0, generator), t, solver, gradient)
    return func.split(state)


class RegularisedODEBlock(nn.Module):
    """Like :class:`nodebench.models.ODEBlock` (maps ``x`` (B, *S) to ``y(t1)``, ``y(0) = x``),
    returning also the integrated penalties: ``forward(x) -> (y(t1) (B, *S), penalties (B, k))``.

    Args:
        func: the dynamics (a :class:`~nodebench.models.Dynamics`, counted by the instruments).
        solver, gradient: as for ODEBlock.
        penalties: which penalties, with their weights (:meth:`Penalties.weighted` gives the
            loss term).
        t1: end of the integration interval [0, t1].
    """

    def __init__(self, func: nn.Module, solver: Solver, gradient: Gradient,
                 penalties: Penalties, t1: float = 1.0) -> None:
        super().__init__()
        check_compatible(solver, gradient)
        self.func = Regularised(func, penalties)
        self.solver = solver
        self.gradient = gradient
        self.penalties = penalties
        self.t1 = float(t1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor([0.0, self.t1], dtype=x.dtype, device=x.device)
        y, r = solve_with_penalties(self.func, x, t, self.solver, self.gradient)
        return y[-1], r[-1]


def take_penalties(model: nn.Module) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Collect the penalties that the last training forward of ``model`` integrated.

    The protocol with the training loop: a module that integrated penalties during a training
    forward (e.g. :class:`nodebench.models.ODEBlock` with ``penalties``) stores
    ``self.pending_penalties = (term, values)``, ``term`` the weighted scalar tensor to add to
    the loss (:meth:`Penalties.weighted`), ``values`` the batch means by name
    (:meth:`Penalties.as_dict`). This sums the terms of every module of ``model`` with a
    non-None ``pending_penalties``, merges the values (summed per name) and resets each to None.

    Returns ``(term, values)``; ``(None, {})`` when no module has pending penalties.
    """
    term: torch.Tensor | None = None
    values: dict[str, float] = {}
    for module in model.modules():
        pending = getattr(module, "pending_penalties", None)
        if pending is None:
            continue
        part, named = pending
        term = part if term is None else term + part
        for name, value in named.items():
            values[name] = values.get(name, 0.0) + float(value)
        module.pending_penalties = None
    return term, values


__all__ = ["NOISES", "PENALTIES", "Penalties", "Regularised", "RegularisedODEBlock", "draw_noise",
           "solve_with_penalties", "take_penalties", "total_derivative"]
