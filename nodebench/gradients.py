"""Gradient modes beyond ``direct`` and ``adjoint``: checkpointed, ACA and MALI.

Each mode is an object (:data:`MODES`) that owns how it differentiates through an ODE solve;
:func:`nodebench.solvers.odesolve` dispatches to it when ``gradient.mode`` names it, and
:func:`nodebench.solvers.check_compatible` asks it which solver settings it accepts.

All three integrate with nodebench's own explicit schemes (below), not torchdiffeq's, because
they must control the step sequence (which steps are accepted, which are rejected) and re-run
single steps in the backward pass. Every evaluation of ``f`` is a call of the dynamics module
``func(t, y)``, so :class:`nodebench.instruments.NFECounter` counts all of them, in both passes.

**Modes** (state shape ``S``, ``N`` accepted steps, ``s`` stages of the method):

* ``checkpointed`` (discretise-then-optimise with a checkpoint at every accepted step; diffrax's
  and SciML's checkpointed adjoints): the forward solve runs without a graph and stores the
  state at the start of each accepted step; the backward pass re-runs each step with a graph,
  last step first, and backpropagates through it. Its gradient is that of direct backprop
  through the same step sequence with the step sizes held constant. Memory O(N x S).
* ``aca`` (adaptive checkpoint adjoint, Zhuang et al., ICML 2020, Algorithm 1): the same
  discrete gradient, which is what ACA is: record the accepted grid ``(t_k, h_k)`` and the
  states in a graph-free forward pass (rejected trial steps are forgotten), then in reverse
  re-run each accepted step with a graph and accumulate the vector-Jacobian products
  ``a_k = (dy_{k+1}/dy_k)^T a_{k+1}`` and ``dL/dtheta += (dy_{k+1}/dtheta)^T a_{k+1}``.
  Both modes share one engine here (:class:`_CheckpointSolve`); with a checkpoint at every
  accepted step the two algorithms coincide, and they are kept apart because the literature
  (and issue 14's comparison) names them separately.
* ``mali`` (Zhuang et al., ICLR 2021, Algorithms 1-2): the asynchronous leapfrog integrator
  (ALF) on the augmented state ``(y, v)``, ``v0 = f(t0, y0)``; one step of size ``h``::

      s = t + h/2;  y_half = y + v h/2;  u = f(s, y_half)
      v_new = v + 2 eta (u - v)              (eta = 1: v_new = 2u - v, the undamped ALF)
      y_new = y_half + v_new h/2

  and its exact inverse (one ``f`` call, no iteration)::

      y_half = y_new - v_new h/2;  u = f(s, y_half)
      v = (v_new - 2 eta u) / (1 - 2 eta);   y = y_half - v h/2

  The forward pass keeps only the final ``(y, v)`` and the accepted step sizes (floats); the
  backward pass reconstructs each step's input by the inverse step and backpropagates through
  the re-run step: the gradient of the discrete ALF solve (up to the round-off of the
  reconstruction), memory O(S) flat in N. ``eta`` (``adjoint.eta``, 0 < eta <= 1, not 1/2
  where the inverse does not exist) is the paper's damping coefficient.
  Error estimate (nodebench's choice): ``e = y_new - (y + h v) = eta h (u - v)``, the
  difference between the ALF step and the explicit Euler step with the same ``v``, O(h^2);
  step control as below with exponent 1/2.

**Step control** of the adaptive methods (Hairer, Norsett & Wanner, Solving ODEs I, II.4): the
error ratio ``r = rms(e / (atol + rtol max(|y0|, |y1|)))`` over the whole tensor; a step is
accepted when ``r <= 1``; the next step is ``h min(ifactor, max(lower, safety r^(-1/(q+1))))``
with ``q`` the order of the embedded method and ``lower = dfactor`` when ``r > 1``, else 1 (an
accepted step never shrinks the next one; as torchdiffeq), clipped so that each output time in
``t`` is hit exactly (no interpolation: each output is the state of an accepted step; torchdiffeq
instead steps past the output time and interpolates, so its dopri5 step sequence differs).
The dopri5 error weights are Dormand & Prince's ``b - b_hat`` (torchdiffeq uses Shampine's
variant of ``b_hat``), another reason its steps differ from torchdiffeq's.
The first step is ``solver.options.first_step`` or Hairer's starting-step algorithm (one extra
``f`` call). Step sizes are constants for differentiation (no gradient flows through the
controller), as in ACA and MALI.

**NFE** (one solve over [t0, t1], ``N`` accepted and ``R`` rejected steps):

========================  ==========================  =======================================
mode / method             forward                     backward
========================  ==========================  =======================================
checkpointed, aca, fixed  ``s N``                     ``s N``
checkpointed, aca, dopri5 ``2 + 6 (N + R)`` (FSAL)    ``6 N``
mali, fixed step          ``1 + N``                   ``2 N + 1``
mali, adaptive            ``2 + N + R``               ``2 N + 1``
========================  ==========================  =======================================

(Adaptive rows: one call fewer when ``solver.options.first_step`` is set.)

Fixed-step grids are built per interval of ``t`` (steps of ``h`` from each output time); they
equal ``direct``'s grid over the whole span when the output times lie on it. ``max_num_steps``
bounds the attempted steps of the whole solve (torchdiffeq: per output interval).

No gradient is returned for the time points ``t``. Double backward is not supported
(``once_differentiable``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ConfigError, SolverFailure
from .solvers import fixed_step_count

# ---------------------------------------------------------------------------------------------
# Explicit Runge-Kutta tableaus (own transcription of the published coefficients).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method.

    ``c``: stage times (fractions of h); ``a``: row i holds the coefficients of stages 0..i-1
    for stage i (row 0 empty); ``b``: solution weights; ``e``: error weights ``b - b_hat`` of
    the embedded method (None: fixed-step only); ``q``: order of the embedded method (step
    control exponent ``1/(q+1)``); ``fsal``: the last stage is ``f(t1, y1)`` (first same as
    last), reused as the next step's first stage and not needed to form ``y1``.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...] | None = None
    q: int = 1
    fsal: bool = False

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def solution_stages(self) -> int:
        """Stages needed to form ``y1`` (the FSAL stage only serves the error estimate)."""
        return self.stages - 1 if self.fsal else self.stages


_DP5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP5_BHAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_BS3_B = (2 / 9, 1 / 3, 4 / 9, 0.0)
_BS3_BHAT = (7 / 24, 1 / 4, 1 / 3, 1 / 8)

TABLEAUS: dict[str, Tableau] = {
    "euler": Tableau("euler", (0.0,), ((),), (1.0,)),
    "midpoint": Tableau("midpoint", (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    # torchdiffeq's "rk4" is Kutta's 3/8 rule (rk4_alt_step_func); the same here.
    "rk4": Tableau("rk4", (0.0, 1 / 3, 2 / 3, 1.0),
                   ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                   (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
    # Dormand & Prince (1980), RK5(4)7M, FSAL.
    "dopri5": Tableau(
        "dopri5", (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         _DP5_B[:6]),
        _DP5_B, tuple(x - y for x, y in zip(_DP5_B, _DP5_BHAT)), q=4, fsal=True),
    # Bogacki & Shampine (1989), RK3(2), FSAL.
    "bosh3": Tableau("bosh3", (0.0, 0.5, 0.75, 1.0),
                     ((), (0.5,), (0.0, 0.75), _BS3_B[:3]),
                     _BS3_B, tuple(x - y for x, y in zip(_BS3_B, _BS3_BHAT)), q=2, fsal=True),
    # Heun's method with Euler as the embedded method.
    "adaptive_heun": Tableau("adaptive_heun", (0.0, 1.0), ((), (1.0,)), (0.5, 0.5),
                             (-0.5, 0.5), q=1),
}
FIXED = ("euler", "midpoint", "rk4")
ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun")
CONTROL_OPTIONS = {"first_step", "safety", "ifactor", "dfactor"}
CONTROL_DEFAULTS = {"safety": 0.9, "ifactor": 10.0, "dfactor": 0.2}


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _time(t: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(t, dtype=like.dtype, device=like.device)


def _rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


@dataclass(frozen=True)
class Control:
    """Step-size settings taken from a :class:`nodebench.solvers.Solver` (see module doc)."""

    step_size: float | None
    rtol: float
    atol: float
    max_num_steps: int
    first_step: float | None
    safety: float
    ifactor: float
    dfactor: float

    @classmethod
    def from_solver(cls, solver) -> Control:
        opts = {**CONTROL_DEFAULTS, **solver.options}
        return cls(step_size=None if solver.step_size is None else float(solver.step_size),
                   # fixed-step solvers carry no tolerances (None); they are unused there
                   rtol=float(solver.rtol or 0.0), atol=float(solver.atol or 0.0),
                   max_num_steps=int(solver.max_num_steps or 2 ** 31 - 1),
                   first_step=None if opts.get("first_step") is None
                   else float(opts["first_step"]),
                   safety=float(opts["safety"]), ifactor=float(opts["ifactor"]),
                   dfactor=float(opts["dfactor"]))

    def next_step(self, h: float, ratio: float, q: int) -> float:
        if ratio == 0.0:
            return h * self.ifactor
        factor = self.safety * ratio ** (-1.0 / (q + 1))
        lower = self.dfactor if ratio > 1.0 else 1.0
        return h * min(self.ifactor, max(factor, lower))

    def ratio(self, err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor) -> float:
        scale = self.atol + self.rtol * torch.maximum(y0.abs(), y1.abs())
        return _rms(err / scale)


def _initial_step(func: Callable, t0: float, y0: torch.Tensor, f0: torch.Tensor, q: int,
                  ctl: Control) -> float:
    """Hairer, Norsett & Wanner, Solving ODEs I, II.4 ("starting step size"); one ``f`` call."""
    if ctl.first_step is not None:
        return ctl.first_step
    scale = ctl.atol + ctl.rtol * y0.abs()
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = func(_time(t0 + h0, y0), y0 + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (q + 1))
    return min(100 * h0, h1)


def _check_times(t: torch.Tensor) -> list[float]:
    ts = [float(x) for x in t.detach().cpu().tolist()]
    if any(b <= a for a, b in itertools.pairwise(ts)):
        raise ValueError("gradient modes checkpointed, aca and mali need strictly increasing t")
    return ts


def _fixed_grid(t0: float, t1: float, h: float) -> list[tuple[float, float]]:
    """Steps ``(start, size)`` of at most ``h`` over [t0, t1]: the grid of ``direct`` with
    fixed-step methods (:func:`nodebench.solvers.fixed_grid`: steps of exactly ``h`` from t0,
    the last one ending at t1), per interval of ``t``."""
    n = fixed_step_count(t0, t1, h)
    starts = [t0 + k * h for k in range(n)]
    ends = starts[1:] + [t1]
    return [(s, e - s) for s, e in zip(starts, ends)]


def _params(func: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(p for p in func.parameters() if p.requires_grad)


def _accumulate(g: list[torch.Tensor], grads) -> None:
    for gi, d in zip(g, grads):
        if d is not None:
            gi.add_(d)


# ---------------------------------------------------------------------------------------------
# Runge-Kutta steps and the checkpointing engine (checkpointed, aca)
# ---------------------------------------------------------------------------------------------


def rk_stages(func: Callable, tab: Tableau, t0: float, y0: torch.Tensor, h: float,
              n: int, f0: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The first ``n`` stages ``k_i = f(t0 + c_i h, y0 + h sum_j a_ij k_j)`` of one step.

    ``f0``: a known first stage (FSAL), saving one call. Differentiable when grad is enabled.
    """
    ks: list[torch.Tensor] = []
    for i in range(n):
        if i == 0 and f0 is not None:
            ks.append(f0)
            continue
        yi = y0
        for aij, kj in zip(tab.a[i], ks):
            if aij != 0.0:
                yi = yi + (h * aij) * kj
        ks.append(func(_time(t0 + tab.c[i] * h, y0), yi))
    return ks


def _combine(y0: torch.Tensor, h: float, weights: tuple[float, ...],
             ks: list[torch.Tensor]) -> torch.Tensor:
    out = y0
    for w, k in zip(weights, ks):
        if w != 0.0:
            out = out + (h * w) * k
    return out


def rk_step(func: Callable, tab: Tableau, t0: float, y0: torch.Tensor, h: float) -> torch.Tensor:
    """``y1`` of one step (``tab.solution_stages`` calls of ``f``); differentiable."""
    ks = rk_stages(func, tab, t0, y0, h, tab.solution_stages)
    return _combine(y0, h, tab.b, ks)


def _notify(func: Callable, name: str, t: float, y: torch.Tensor, h: float) -> None:
    """Call ``func.<name>(t, y, dt)`` when the dynamics has it: torchdiffeq 0.2.5's step
    callbacks (``callback_step`` at each attempt, ``callback_accept_step`` /
    ``callback_reject_step`` on the verdict, ``*_adjoint`` in a backward pass), so
    :class:`nodebench.instruments.StepCounter` counts nodebench's own integrators' steps too."""
    callback = getattr(func, name, None)
    if callback is not None:
        callback(_time(t, y), y, _time(h, y))


def _march(func: Callable, name: str, ts: list[float], ctl: Control, q: int, state: list,
           attempt: Callable, h0: float | None, on_output: Callable | None = None):
    """The step loop shared by the Runge-Kutta and ALF integrators: fixed grid when ``h0`` is
    None (``ctl.step_size``), else adaptive from the first step ``h0`` (module doc: step
    control, output times hit exactly).

    ``state`` is the integrator's mutable state, a list whose first item is ``y``;
    ``attempt(t, h, state) -> (new_state, err)`` tries one step (``err`` None on a fixed grid)
    and may update ``state`` in place with what stays valid after a rejection (e.g. ``f(t, y)``).
    ``on_output(state)`` is called at each output time after the first. Returns ``(grid,
    marks, accepted)``: the accepted steps ``[(t_k, h_k)]``, the number of accepted steps when
    each output time is reached (``marks[0] = 0``), and the list of accepted states.

    Raises SolverFailure when ``max_num_steps`` attempts are exceeded, the step underflows, or
    the state turns non-finite.
    """
    grid: list[tuple[float, float]] = []
    marks, accepted = [0], []
    if h0 is None:
        for t0, t1 in itertools.pairwise(ts):
            for s, h in _fixed_grid(t0, t1, ctl.step_size):
                _notify(func, "callback_step", s, state[0], h)
                state, _ = attempt(s, h, state)
                grid.append((s, h))
                accepted.append(state)
            marks.append(len(grid))
            if on_output is not None:
                on_output(state)
        return grid, marks, accepted
    h, attempts, t = h0, 0, ts[0]
    for t_out in ts[1:]:
        while t < t_out:
            attempts += 1
            if attempts > ctl.max_num_steps:
                raise SolverFailure(f"max_num_steps exceeded ({ctl.max_num_steps}) in "
                                    f"{name} at t={t:.4g}")
            step = min(h, t_out - t)
            last = step >= t_out - t
            if not t + step > t or not math.isfinite(step):
                raise SolverFailure(f"underflow in dt {step!r} in {name} at t={t:.4g}")
            _notify(func, "callback_step", t, state[0], step)
            new, err = attempt(t, step, state)
            ratio = ctl.ratio(err, state[0], new[0])
            if not math.isfinite(ratio):
                raise SolverFailure(f"non-finite state in {name} at t={t:.4g}")
            if ratio <= 1.0:
                _notify(func, "callback_accept_step", t, state[0], step)
                grid.append((t, step))
                t = t_out if last else t + step
                state = new
                accepted.append(state)
            else:
                _notify(func, "callback_reject_step", t, state[0], step)
            h = ctl.next_step(step, ratio, q)
        marks.append(len(grid))
        if on_output is not None:
            on_output(state)
    return grid, marks, accepted


def rk_forward(func: Callable, tab: Tableau, y0: torch.Tensor, ts: list[float], ctl: Control):
    """The solve (graph-free under no_grad; with grad enabled, direct backprop through the
    same steps). Returns ``(grid, states, out_index)``: the accepted steps
    ``[(t_k, h_k)]``, the states ``[y_0, ..., y_N]`` at their ends (``y_0`` the initial
    state) and, for each output time ``ts[i]``, the index of its state in ``states``.

    Raises SolverFailure when ``max_num_steps`` attempts are exceeded, the step underflows, or
    the state turns non-finite; ConfigError for a fixed-step method without a step size.
    """
    if tab.e is None:  # fixed grid
        if ctl.step_size is None:
            raise ConfigError(f"{tab.name} is fixed-step: set solver.step_size")

        def fixed(t: float, h: float, state: list):
            return [rk_step(func, tab, t, state[0], h)], None

        grid, marks, accepted = _march(func, tab.name, ts, ctl, tab.q, [y0], fixed, None)
        return grid, [y0] + [s[0] for s in accepted], marks

    def adaptive(t: float, h: float, state: list):
        y, f0 = state
        if f0 is None:
            state[1] = f0 = func(_time(t, y), y)  # still valid if the step is rejected
        ks = rk_stages(func, tab, t, y, h, tab.stages, f0)
        y1 = _combine(y, h, tab.b, ks)
        err = _combine(torch.zeros_like(y), h, tab.e, ks)
        return [y1, ks[-1] if tab.fsal else None], err

    f0 = func(_time(ts[0], y0), y0)
    h0 = _initial_step(func, ts[0], y0, f0, tab.q, ctl)
    grid, marks, accepted = _march(func, tab.name, ts, ctl, tab.q, [y0, f0], adaptive, h0)
    return grid, [y0] + [s[0] for s in accepted], marks


class _CheckpointSolve(torch.autograd.Function):
    """Forward: graph-free solve storing the state of every accepted step (saved for
    backward, so the activation meter sees them). Backward: re-run each step with a graph,
    last first, and accumulate vector-Jacobian products."""

    @staticmethod
    def forward(ctx, func, tab, ctl, y0, t, *params):
        ts = _check_times(t)
        with torch.no_grad():
            grid, states, out_index = rk_forward(func, tab, y0, ts, ctl)
            stacked = torch.stack(states)
        ctx.func, ctx.tab, ctx.grid, ctx.out_index = func, tab, grid, out_index
        ctx.save_for_backward(stacked, *params)
        return stacked[out_index]  # advanced indexing: a copy, not a view of the saved states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        stacked, *params = ctx.saved_tensors
        params = tuple(params)
        func, tab, grid = ctx.func, ctx.tab, ctx.grid
        pending: dict[int, torch.Tensor] = {}
        for i, k in enumerate(ctx.out_index):
            pending[k] = grad_out[i] if k not in pending else pending[k] + grad_out[i]
        a = torch.zeros_like(stacked[0])
        g = [torch.zeros_like(p) for p in params]
        for k in range(len(grid), 0, -1):
            if k in pending:
                a = a + pending[k]
            t0, h = grid[k - 1]
            _notify(func, "callback_step_adjoint", t0, stacked[k - 1], h)  # a re-run step
            with torch.enable_grad():
                y = stacked[k - 1].detach().requires_grad_(True)
                y1 = rk_step(func, tab, t0, y, h)
                grads = torch.autograd.grad(y1, (y,) + params, a, allow_unused=True)
            a = torch.zeros_like(a) if grads[0] is None else grads[0]
            _accumulate(g, grads[1:])
        if 0 in pending:
            a = a + pending[0]
        return (None, None, None, a, None, *g)


# ---------------------------------------------------------------------------------------------
# MALI: the asynchronous leapfrog integrator (ALF)
# ---------------------------------------------------------------------------------------------


def alf_step(func: Callable, t0: float, h: float, y: torch.Tensor, v: torch.Tensor,
             eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One (damped) ALF step (Zhuang et al. 2021, Algorithm 1); one call of ``f``.

    Returns ``(y_new, v_new, err)`` with ``err = eta h (u - v)`` (module doc). Differentiable.
    """
    y_half = y + (0.5 * h) * v
    u = func(_time(t0 + 0.5 * h, y), y_half)
    v_new = v + (2.0 * eta) * (u - v)
    y_new = y_half + (0.5 * h) * v_new
    return y_new, v_new, (eta * h) * (u - v)


def alf_inverse(func: Callable, t0: float, h: float, y_new: torch.Tensor, v_new: torch.Tensor,
                eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact inverse of :func:`alf_step` (Algorithm 2): ``(y, v)`` from ``(y_new, v_new)``;
    one call of ``f``. Requires ``eta != 1/2``."""
    y_half = y_new - (0.5 * h) * v_new
    u = func(_time(t0 + 0.5 * h, y_new), y_half)
    v = (v_new - (2.0 * eta) * u) / (1.0 - 2.0 * eta)
    return y_half - (0.5 * h) * v, v


def alf_forward(func: Callable, y0: torch.Tensor, ts: list[float], ctl: Control, eta: float):
    """The ALF solve (graph-free under no_grad). Returns ``(grid, outputs, out_step, y_N,
    v_N)``: the accepted steps ``[(t_k, h_k)]``, the states at the output times, the number of
    accepted steps taken when each output time is reached, and the final augmented state.
    Fixed grid with ``solver.step_size``, else adaptive (error estimate of order 1, module doc)."""
    v0 = func(_time(ts[0], y0), y0)
    outputs = [y0]
    last = [y0, v0]

    def attempt(t: float, h: float, state: list):
        y1, v1, err = alf_step(func, t, h, state[0], state[1], eta)
        return [y1, v1], err

    def output(state: list) -> None:
        outputs.append(state[0])
        last[:] = state

    h0 = None if ctl.step_size is not None else _initial_step(func, ts[0], y0, v0, 1, ctl)
    grid, marks, _ = _march(func, "mali (ALF)", ts, ctl, 1, [y0, v0], attempt, h0, output)
    return grid, outputs, marks, last[0], last[1]


class _MALISolve(torch.autograd.Function):
    """Forward: graph-free ALF solve keeping only the final ``(y, v)``. Backward: reconstruct
    each step's input by the inverse step, re-run the step with a graph, accumulate VJPs."""

    @staticmethod
    def forward(ctx, func, ctl, eta, y0, t, *params):
        ts = _check_times(t)
        with torch.no_grad():
            grid, outputs, out_step, y, v = alf_forward(func, y0, ts, ctl, eta)
            out = torch.stack(outputs)
        ctx.func, ctx.eta, ctx.grid, ctx.out_step, ctx.t0 = func, eta, grid, out_step, ts[0]
        ctx.save_for_backward(y.clone(), v.clone(), *params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, v, *params = ctx.saved_tensors
        params = tuple(params)
        func, eta, grid = ctx.func, ctx.eta, ctx.grid
        pending: dict[int, torch.Tensor] = {}
        for i, k in enumerate(ctx.out_step):
            pending[k] = grad_out[i] if k not in pending else pending[k] + grad_out[i]
        a_y, a_v = torch.zeros_like(y), torch.zeros_like(v)
        g = [torch.zeros_like(p) for p in params]
        for k in range(len(grid), 0, -1):
            if k in pending:
                a_y = a_y + pending[k]
            t0, h = grid[k - 1]
            with torch.no_grad():
                y, v = alf_inverse(func, t0, h, y, v, eta)
            _notify(func, "callback_step_adjoint", t0, y, h)  # a reconstructed, re-run step
            with torch.enable_grad():
                yp = y.detach().requires_grad_(True)
                vp = v.detach().requires_grad_(True)
                y1, v1, _ = alf_step(func, t0, h, yp, vp, eta)
                grads = torch.autograd.grad((y1, v1), (yp, vp) + params, (a_y, a_v),
                                            allow_unused=True)
            a_y = torch.zeros_like(a_y) if grads[0] is None else grads[0]
            a_v = torch.zeros_like(a_v) if grads[1] is None else grads[1]
            _accumulate(g, grads[2:])
        if 0 in pending:
            a_y = a_y + pending[0]
        # v0 = f(t0, y0): one more call, through which a_v reaches y0 and the parameters.
        with torch.enable_grad():
            yp = y.detach().requires_grad_(True)
            v0 = func(_time(ctx.t0, y), yp)
            grads = torch.autograd.grad(v0, (yp,) + params, a_v, allow_unused=True)
        if grads[0] is not None:
            a_y = a_y + grads[0]
        _accumulate(g, grads[1:])
        return (None, None, None, a_y, None, *g)


# ---------------------------------------------------------------------------------------------
# The mode objects
# ---------------------------------------------------------------------------------------------


class GradientMode:
    """How one gradient mode differentiates through a solve (base class)."""

    name: str = ""

    def check(self, solver, gradient) -> None:
        """Raise ConfigError (one line, naming the valid combinations) if ``solver`` does not
        apply to this mode."""
        raise NotImplementedError

    def solve(self, func: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor, solver,
              gradient) -> torch.Tensor:
        """``y(t)`` for ``dy/dt = func(t, y)``, ``y(t[0]) = y0``; shapes ``y0`` (*S), ``t``
        (T,) strictly increasing, result (T, *S). Raises SolverFailure on a failed solve."""
        raise NotImplementedError


class _RKCheckpointMode(GradientMode):
    def check(self, solver, gradient) -> None:
        valid = ", ".join(FIXED + ADAPTIVE)
        if solver.method not in TABLEAUS:
            raise ConfigError(f"model.gradient={self.name} needs an explicit Runge-Kutta solver "
                              f"({valid}; fixed-step ones with solver.step_size), got "
                              f"solver={solver.method}")
        allowed = CONTROL_OPTIONS if solver.method in ADAPTIVE else set()
        unknown = sorted(set(solver.options) - allowed)
        if unknown:
            raise ConfigError(f"solver.options {', '.join(unknown)} not supported with "
                              f"model.gradient={self.name} and solver={solver.method}; allowed: "
                              f"{', '.join(sorted(allowed)) or 'none'}")
        if gradient.norm != "default":
            raise ConfigError(f"adjoint.norm={gradient.norm} applies to model.gradient=adjoint "
                              f"only, not {self.name}")

    def solve(self, func, y0, t, solver, gradient):
        self.check(solver, gradient)  # also for callers that bypass ODEBlock's check
        tab = TABLEAUS[solver.method]
        return _CheckpointSolve.apply(func, tab, Control.from_solver(solver), y0, t,
                                      *_params(func))


class Checkpointed(_RKCheckpointMode):
    """``checkpointed``: store the state at every accepted step, recompute each step's graph
    in backward (module doc). Memory O(steps x state)."""

    name = "checkpointed"


class ACA(_RKCheckpointMode):
    """``aca``: adaptive checkpoint adjoint (Zhuang et al., ICML 2020; module doc)."""

    name = "aca"


class MALI(GradientMode):
    """``mali``: the ALF integrator with reversible backward pass (Zhuang et al., ICLR 2021).

    Solver settings: ``solver=dopri5`` (its rtol, atol, max_num_steps and options first_step,
    safety, ifactor, dfactor drive ALF's step control; the Dormand-Prince tableau is not used)
    or ``solver=euler solver.step_size=h`` (fixed-step ALF with step h). Damping
    ``adjoint.eta`` in (0, 1], not 1/2 (1 = undamped).
    """

    name = "mali"

    def check(self, solver, gradient) -> None:
        if solver.method not in ("dopri5", "euler"):
            raise ConfigError("model.gradient=mali is its own integrator (ALF): use solver=dopri5 "
                              "(adaptive ALF with solver.rtol/atol) or solver=euler "
                              f"solver.step_size=h (fixed-step ALF), got solver={solver.method}")
        allowed = CONTROL_OPTIONS if solver.method == "dopri5" else set()
        unknown = sorted(set(solver.options) - allowed)
        if unknown:
            raise ConfigError(f"solver.options {', '.join(unknown)} not supported with "
                              "model.gradient=mali; allowed: "
                              + (", ".join(sorted(allowed)) or "none"))
        if gradient.norm != "default":
            raise ConfigError(f"adjoint.norm={gradient.norm} applies to model.gradient=adjoint "
                              "only, not mali")
        check_eta(gradient.eta)

    def solve(self, func, y0, t, solver, gradient):
        self.check(solver, gradient)
        return _MALISolve.apply(func, Control.from_solver(solver), float(gradient.eta), y0, t,
                                *_params(func))


def check_eta(eta) -> None:
    """MALI's damping: 0 < eta <= 1 and eta != 1/2 (the inverse step divides by 1 - 2 eta)."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 < eta <= 1 \
            or eta == 0.5:
        raise ConfigError(f"adjoint.eta (MALI's damping) must be in (0, 1] and not 0.5, "
                          f"got {eta!r}")


MODES: dict[str, GradientMode] = {m.name: m for m in (Checkpointed(), ACA(), MALI())}

__all__ = ["ACA", "MALI", "MODES", "TABLEAUS", "Checkpointed", "Control", "GradientMode",
           "Tableau", "alf_forward", "alf_inverse", "alf_step", "check_eta", "rk_forward",
           "rk_stages", "rk_step"]
