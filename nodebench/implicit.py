"""Implicit fixed-step ODE solvers: backward Euler, implicit midpoint ("Crank-Nicolson" of seed
004) and the trapezoidal rule (the classical Crank-Nicolson), with direct and adjoint gradients.

torchdiffeq 0.2.5 has no implicit one-step method, so nodebench integrates these itself; they are
registered in :data:`nodebench.solvers.EXTRA_SOLVERS` and chosen like any other method
(``solver=implicit_euler solver.step_size=0.05``).

**The schemes.** All three are one family, a step of size ``h`` from ``(t0, y0)``::

    y1 = y0 + h * [ (1 - theta) * f(t0, y0) + theta * f(t0 + c*h, y0 + c*(y1 - y0)) ]

=================  =====  ===  ===============================================  =====
name               theta  c    formula                                          order
=================  =====  ===  ===============================================  =====
implicit_euler     1      1    y1 = y0 + h f(t1, y1)        (seed 004 eq. 9)    1
crank_nicolson     1      1/2  y1 = y0 + h f(t0 + h/2, (y0 + y1)/2)  (eq. 10)   2
trapezoid          1/2    1    y1 = y0 + h/2 (f(t0, y0) + f(t1, y1))            2
=================  =====  ===  ===============================================  =====

``crank_nicolson`` is named after seed 004 (Ul Ala 2021, section 2.5.2), which calls the
*implicit midpoint rule* "a version of the Crank-Nicolson scheme" and says it is "not the same as
taking the average of the forward and backwards Euler"; the average is ``trapezoid`` (what
numerical analysis calls Crank-Nicolson). Both are A-stable and of order 2; they differ for
nonlinear ``f`` and in their NFE (the trapezoid needs ``f(t0, y0)`` too).

**The nonlinear step equation** ``y = G(y)`` is solved by fixed-point (Picard) iteration with
Anderson acceleration (type II, Walker & Ni 2011; ``anderson`` = memory ``m``, 0 = plain Picard),
mixed separately for each sample of the batch (dim 0 of the state).
Why not Newton-Krylov: every Newton-Krylov iteration needs Jacobian-vector products of a
convolutional ``f`` (a double backward per Krylov vector), while a fixed-point iteration costs one
``f`` evaluation and nothing else. Plain Picard converges when ``h * theta * c * Lip(f) < 1``, which
holds for most steps of the seed's study (h = 0.05 on normalised conv dynamics, Lip about 3-7:
measured 3-4 iterations per step at tol 1e-3). When it does not hold (stiff ``f``, e.g. ``y' = -50 y`` with ``h = 0.1``,
where ``h * Lip = 5``) Picard diverges; Anderson acceleration, which on a linear problem is
equivalent to GMRES (Walker & Ni 2011, Thm 2.2), still converges, in a few iterations when the
stiffness sits in a few directions per sample. It does not rescue every case: GroupNorm
dynamics on an exactly constant image (Lip about 100-150, see nodebench/shapes.py) stall it.
Nor does any step solver rescue a step equation that is ill-conditioned in itself: solving
the implicit midpoint or the trapezoid *backwards in time* (the adjoint's state reconstruction
below) means solving with the matrix ``I + (h/2) J``, nearly singular where ``J`` has an
eigenvalue near ``-2/h`` (-40 at h = 0.05), the directions the forward step damps to almost
nothing. That is where seed 004's study failed under ``crank_nicolson`` with recomputed states
(Anderson stagnating at residuals of 1e-3 to 2e-2 after 2-6 epochs, 7 Dec 2026), and why the
adjoint keeps the forward states by default (``adjoint_states``, below).
If the iterates do not meet the tolerance within
``max_iters`` evaluations (or turn non-finite), :class:`~nodebench.errors.SolverFailure` is raised
and the trainer records the run as failed.

Convergence test: ``max|G(x) - x| <= tol * (1 + max|G(x)|)`` over the whole batch. The initial
guess of a step is the linear extrapolation of the previous step (free); ``y0`` on the first step.
The adjoint's backward state solve (recomputed states) does the same with the previous
backward step.

**NFE.** Every evaluation of ``f`` is a call of the dynamics module, so
:class:`~nodebench.instruments.NFECounter` counts it. Per step: the iterations (each one ``f``
evaluation; the iterate that passes the test is the step's result, so no extra evaluation), plus
1 for ``f(t0, y0)`` when ``theta < 1`` (trapezoid; it is re-evaluated each step rather than
reused from the previous one, because with direct gradients its graph must start at ``y0``).
The adjoint's backward step: 1 for the linearisation, plus 1 for ``f(t0, y0)`` (trapezoid),
plus the state iterations with recomputed states; its ``a`` iterations call no ``f``.
``STATS`` counts the state and the adjoint iterations of a backward step together.

**Iterations** are observable from outside the model through the module-level :data:`STATS`
(:class:`IterationStats`): ``STATS.take()`` returns and resets
``{"forward_iters", "forward_steps", "backward_iters", "backward_steps"}``. The trainer calls
``STATS.take()`` after each training iteration (next to ``nfe.take``) and logs the mean iterations
per step as ``train/implicit_iters_forward`` / ``_backward`` (TensorBoard) and per epoch in
``metrics.csv``; ``summary.json`` holds the run's totals (``implicit_iterations``).

**Gradients** (:class:`nodebench.solvers.Gradient`):

* ``direct``: implicit differentiation of each converged step. The iteration runs with autograd
  recording only the last evaluation's graph (earlier iterates are detached), so the step's output
  ``y1 = G(x*)`` is differentiable in ``y0`` and the parameters but not through the iteration. A
  tensor hook on ``y1`` replaces the incoming gradient ``v`` by the solution ``w`` of
  ``w = v + (dG/dy)^T w`` (implicit function theorem, as in deep equilibrium models, Bai et al.
  2019), solved with the same accelerated fixed-point iteration using vector-Jacobian products
  (no extra ``f`` calls). The result is the exact derivative of the discrete scheme (to ``tol``):
  it matches finite differences of the solver's output. Memory: one graph of ``f`` per step,
  O(steps), like RK-Net; backprop through all iterations would be O(steps x iterations) and no
  more exact.
* ``adjoint`` for ``implicit_euler``: its step is undone exactly by an explicit one,
  ``y0 = y1 - h f(t1, y1)``, so the backward pass retraces the forward states with one ``f`` call
  per step and no iteration (the implicit backward state solve of the generic scheme below
  stalled in training, see the shapes study), and solves the exact discrete adjoint
  ``a0 = a1 + h J(t1, y1)^T a0`` by the fixed-point iteration on vector-Jacobian products:
  gradients equal the direct ones (to ``tol``). With ``adjoint_states: recomputed`` the
  explicit reversal gives the states (O(1) memory; its rounding errors grow by ``|1 - h lam|``
  per step in strongly damped directions); with ``stored`` (the default, below) the forward
  states replace it.
* ``adjoint`` for the others: ODE-Net style (Chen et al. 2018, eqs. 4-5; seed 004 eqs. 6-7). The
  forward pass keeps no graph; the backward pass integrates the augmented system ``dy/dt = f``,
  ``da/dt = -a df/dy``, ``dg/dt = -a df/dtheta`` from t1 back to t0 with the *same* implicit
  scheme and step: ``f`` is linearised once at the step's implicit evaluation point and the
  ``a`` equation, linear, is solved by the same iteration with vector-Jacobian products only
  (a well-conditioned solve: ``I - (h/2) J^T`` for the midpoint rule); ``g`` follows. The
  states ``y`` at the step boundaries come from ``solver.options.adjoint_states``:

  - ``stored`` (default): kept from the forward pass, detached (memory: one state per step,
    no graphs, as ACA's checkpoints, Zhuang et al. 2020); no state solve in the backward pass.
  - ``recomputed``: solved for backwards, step by step (fixed point, one ``f`` call per
    iteration, started from the previous backward step's extrapolation); memory O(1) in the
    number of steps, but ill-conditioned for stiff dissipative dynamics (above).

  The implicit midpoint rule is symmetric (stepping back with ``-h`` retraces the forward
  states exactly), so the two choices give the same gradient wherever the backward solve
  converges, and it is the exact discrete gradient (to ``tol``). For the trapezoid the adjoint
  equation's discretisation differs from the exact discrete adjoint by O(h^2) (tested against
  finite differences). (Iterating on ``(y, a)`` jointly is the same scheme but stalls for
  implicit_euler on ReLU dynamics: the ``a`` part jumps whenever a ReLU mask flips.)

No gradient is returned for the time points ``t``: a ``t`` that requires one is refused
(ConfigError) rather than silently given none.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ConfigError, SolverFailure
from .solvers import EXTRA_SOLVERS, Gradient, Solver, fixed_step_count

DEFAULTS = {"tol": 1e-4, "max_iters": 100, "anderson": 20, "adjoint_states": "stored"}
ADJOINT_STATES = ("stored", "recomputed")


@dataclass(frozen=True)
class Scheme:
    """One member of the theta/c family in the module docstring."""

    name: str
    theta: float  # weight of the implicit evaluation; 1 - theta goes to f(t0, y0)
    c: float      # where the implicit evaluation sits: time t0 + c*h, state y0 + c*(y1 - y0)
    order: int
    explicit_reverse: bool = False  # the step is inverted exactly by an explicit step (adjoint)


class IterationStats:
    """Fixed-point iterations and steps of the implicit solvers since the last :meth:`take`.

    ``forward_*``: forward solves (training and evaluation); ``backward_*``: the adjoint's backward
    solve, or the implicit-function-theorem linear solves of direct gradients.
    """

    KEYS = ("forward_iters", "forward_steps", "backward_iters", "backward_steps")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(self.KEYS, 0)

    def add(self, phase: str, iters: int) -> None:
        self.counts[f"{phase}_iters"] += iters
        self.counts[f"{phase}_steps"] += 1

    def take(self) -> dict[str, int]:
        """Return the counts and reset them to zero."""
        out, self.counts = self.counts, dict.fromkeys(self.KEYS, 0)
        return out


STATS = IterationStats()


def fixed_point(G: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, tol: float,
                max_iters: int, anderson: int, what: str,
                batch_dim: int = 0) -> tuple[torch.Tensor, int]:
    """Solve ``x = G(x)`` by fixed-point iteration with per-sample Anderson acceleration.

    ``G`` receives detached iterates. Returns ``(g, iters)``: ``g = G(x)`` as ``G`` returned it
    (possibly with a graph) for the first iterate ``x`` passing the test
    ``max|g - x| <= tol * (1 + max|g|)`` (over the whole tensor), and the number of evaluations
    of ``G``. Anderson mixing is done separately for each index along ``batch_dim`` (each sample
    of a batch gets its own ``anderson`` secant directions, as in deep-equilibrium solvers): a
    batch holds many independent systems, each with its own few stiff directions.
    Raises SolverFailure after ``max_iters`` evaluations or on a non-finite iterate, ConfigError
    if ``max_iters`` < 1 or ``anderson`` < 0.
    """
    if max_iters < 1 or anderson < 0:
        raise ConfigError(f"fixed-point iteration needs max_iters >= 1 and anderson >= 0, got "
                          f"{max_iters} and {anderson}")
    x = x0.detach()
    b = x.shape[batch_dim] if x.dim() else 1

    def rows(v: torch.Tensor) -> torch.Tensor:  # (B, D) view, float64 for the small solves
        return (v.movedim(batch_dim, 0) if v.dim() else v).reshape(b, -1).double()

    moved_shape = (x.movedim(batch_dim, 0) if x.dim() else x).shape
    gs: list[torch.Tensor] = []  # G(x_k) as (B, D), newest last (at most anderson + 1)
    fs: list[torch.Tensor] = []  # residuals G(x_k) - x_k as (B, D)
    for k in range(1, max_iters + 1):
        g = G(x)
        gd = g.detach()
        f = gd - x
        err = f.abs().max()
        scale = 1.0 + gd.abs().max()
        if not bool(torch.isfinite(err)):
            raise SolverFailure(f"{what}: non-finite iterate after {k} fixed-point iterations")
        if err <= tol * scale:
            return g, k
        if anderson == 0:
            x = gd
            continue
        gs.append(rows(gd))
        fs.append(rows(f))
        if len(fs) > anderson + 1:
            gs.pop(0)
            fs.pop(0)
        if len(fs) == 1:
            x = gd
            continue
        dF = torch.stack([q - p for p, q in itertools.pairwise(fs)], dim=2)  # (B, D, m)
        dG = torch.stack([q - p for p, q in itertools.pairwise(gs)], dim=2)
        A = dF.transpose(1, 2) @ dF  # (B, m, m)
        rhs = dF.transpose(1, 2) @ fs[-1].unsqueeze(2)  # (B, m, 1)
        reg = 1e-10 * A.diagonal(dim1=1, dim2=2).amax(dim=1) + 1e-300
        A = A + reg[:, None, None] * torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
        try:
            gamma = torch.linalg.solve(A, rhs)
        except torch.linalg.LinAlgError:  # singular despite the regularisation: a failed step
            raise SolverFailure(f"{what}: singular Anderson system after {k} fixed-point "
                                f"iterations; try a smaller step_size or anderson=0") from None
        mixed = (gs[-1] - (dG @ gamma).squeeze(2)).to(x.dtype).reshape(moved_shape)
        x = mixed.movedim(0, batch_dim) if x.dim() else mixed
    raise SolverFailure(f"{what}: fixed-point iteration did not converge in {max_iters} "
                        f"iterations (residual {float(err):.3g} > tol {tol:g} x {float(scale):.3g};"
                        f" try a smaller step_size, a larger max_iters, or anderson > 0)")


def _steps(t0: float, t1: float, h: float, eps: float = 2.220446049250313e-16) -> int:
    """Number of equal steps of at most ``h`` covering [t0, t1] (Honchar's ode_solve):
    :func:`nodebench.solvers.fixed_step_count`, so that a whole number of steps of ``h`` is that
    number even when ``t1`` is not exact in binary (``eps``: the precision of the times)."""
    return fixed_step_count(t0, t1, h, eps)


def _grid(t: torch.Tensor, h: float) -> list[tuple[int, float, float, int]]:
    """(output index i, start time, signed step, number of steps) for each interval of ``t``."""
    ts = t.tolist()
    eps = torch.finfo(t.dtype).eps if t.is_floating_point() else 2.220446049250313e-16
    out = []
    for i in range(len(ts) - 1):
        n = _steps(ts[i], ts[i + 1], h, eps)
        out.append((i, ts[i], (ts[i + 1] - ts[i]) / n, n))
    return out


def check_options(options: dict) -> None:
    """Type and range of the implicit solvers' options (``tol`` > 0, ``max_iters`` >= 1,
    ``anderson`` >= 0, ``adjoint_states`` in :data:`ADJOINT_STATES`); raises ConfigError naming
    the first bad one."""
    tol = options.get("tol", DEFAULTS["tol"])
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) \
            or tol <= 0:
        raise ConfigError(f"solver.options.tol must be a positive number, got {tol!r}")
    for key, low in (("max_iters", 1), ("anderson", 0)):
        value = options.get(key, DEFAULTS[key])
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"solver.options.{key} must be an integer >= {low}, got {value!r}")
    states = options.get("adjoint_states", DEFAULTS["adjoint_states"])
    if states not in ADJOINT_STATES:
        raise ConfigError(f"solver.options.adjoint_states must be one of "
                          f"{', '.join(ADJOINT_STATES)}, got {states!r}")


class _Implicit:
    """Base of the registered implicit solvers; subclasses set SCHEME."""

    SCHEME: Scheme
    OPTIONS = tuple(DEFAULTS)
    check_options = staticmethod(check_options)  # called by Solver on construction

    @classmethod
    def integrate(cls, func: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor, solver: Solver,
                  gradient: Gradient) -> torch.Tensor:
        """``y(t)`` for ``dy/dt = func(t, y)``, ``y(t[0]) = y0``; shapes (T,) -> (T, *y0.shape).

        Raises:
            ConfigError: ``t`` requires a gradient (these solvers give none for the times).
            SolverFailure: a step's fixed-point iteration does not converge.
        """
        if torch.is_tensor(t) and t.requires_grad and torch.is_grad_enabled():
            raise ConfigError(f"solver {cls.SCHEME.name!r} gives no gradient for the time points "
                              f"t, and t requires one: detach t or use a torchdiffeq method")
        opts = {**DEFAULTS, **solver.options}
        cfg = (cls.SCHEME, float(solver.step_size), float(opts["tol"]), int(opts["max_iters"]),
               int(opts["anderson"]), opts["adjoint_states"] == "stored")
        if gradient.mode == "adjoint":
            params = tuple(p for p in func.parameters() if p.requires_grad)
            return _AdjointSolve.apply(func, cfg, y0, t, *params)
        return _forward(func, y0, t, cfg, differentiable=True)


def _time(t: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(t, dtype=like.dtype, device=like.device)


def _guess(y: torch.Tensor, prev: tuple | None, step: float) -> torch.Tensor:
    """Initial guess of a step of signed size ``step`` from ``y``: the previous step's increment
    ``prev = (increment, its step)`` scaled to this step (linear extrapolation), or ``y`` on the
    first step; detached."""
    return (y if prev is None else y + prev[0] * (step / prev[1])).detach()


def _forward(func: Callable, y0: torch.Tensor, t: torch.Tensor, cfg: tuple,
             differentiable: bool, steps: list | None = None) -> torch.Tensor:
    """Step through the grid; with ``differentiable`` each step is differentiable by the IFT.
    ``steps``, if given, receives the state at the end of every step (detached), in order."""
    scheme, h, tol, max_iters, anderson, _ = cfg
    theta, c = scheme.theta, scheme.c
    record = differentiable and torch.is_grad_enabled()
    ys = [y0]
    y, prev = y0, None  # prev: (previous step's increment, its step) for the initial guess
    for i, start, dt, n in _grid(t, h):
        for j in range(n):
            t0 = start + j * dt
            k0 = func(_time(t0, y), y) if theta < 1 else None
            tc = _time(t0 + c * dt, y)

            kept: dict = {}

            def G(x: torch.Tensor, y_=y, k0_=k0, tc_=tc, dt_=dt, kept_=kept) -> torch.Tensor:
                x = kept_["x"] = x.detach().requires_grad_(record)  # the IFT hook's leaf
                with torch.set_grad_enabled(record):
                    incr = theta * func(tc_, y_ + c * (x - y_))
                    if k0_ is not None:
                        incr = incr + (1 - theta) * k0_
                    return y_ + dt_ * incr

            guess = _guess(y, prev, dt)
            y1, iters = fixed_point(G, guess, tol, max_iters, anderson,
                                       f"{scheme.name} step at t={t0:.4g}")
            STATS.add("forward", iters)
            if record and y1.requires_grad:
                # The hook sits on an alias so that its own vector-Jacobian products through y1
                # do not trigger it again.
                hooked = y1.view_as(y1)
                hooked.register_hook(_ift_hook(y1, kept["x"], tol, max_iters, anderson,
                                               scheme.name))
                y1 = hooked
            prev = ((y1 - y).detach(), dt)
            y = y1
            if steps is not None:
                steps.append(y.detach())
        ys.append(y)
    return torch.stack(ys)


def _ift_hook(y1: torch.Tensor, x: torch.Tensor, tol: float, max_iters: int, anderson: int,
              name: str) -> Callable:
    """Gradient hook on a converged step ``y1 = G(x)``: returns ``w = v + (dG/dx)^T w``."""

    def hook(v: torch.Tensor) -> torch.Tensor:
        def H(w: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(y1, x, w, retain_graph=True, allow_unused=True)
            return v if vjp is None else v + vjp

        w, iters = fixed_point(H, v, tol, max_iters, anderson, f"{name} gradient (IFT)")
        STATS.add("backward", iters)
        return w

    return hook


class _Linearised:
    """``f(t, y)`` evaluated once with its graph kept, for repeated vector-Jacobian products."""

    def __init__(self, func: Callable, t: torch.Tensor, y: torch.Tensor,
                 params: tuple[torch.Tensor, ...]) -> None:
        self.params = params
        with torch.enable_grad():
            self.y = y.detach().requires_grad_(True)
            self.graph = func(t, self.y)
        self.f = self.graph.detach()

    def vjp(self, a: torch.Tensor) -> torch.Tensor:
        """``a^T df/dy``, shape of ``y``."""
        (g,) = torch.autograd.grad(self.graph, self.y, a, retain_graph=True, allow_unused=True)
        return torch.zeros_like(a) if g is None else g

    def param_vjp(self, a: torch.Tensor) -> list[torch.Tensor]:
        """``a^T df/dtheta`` for each parameter."""
        if not self.params:
            return []
        grads = torch.autograd.grad(self.graph, self.params, a, retain_graph=True,
                                    allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(self.params, grads)]


def _backward_euler_reverse_step(func: Callable, s0: float, ds: float, y: torch.Tensor,
                                 a: torch.Tensor, g: list[torch.Tensor],
                                 params: tuple[torch.Tensor, ...], cfg: tuple):
    """One backward step of the implicit_euler adjoint, from (s0, y1, a1) to (s0 + ds, y0, a0).

    The forward step y1 = y0 + h f(t1, y1) is inverted exactly by an explicit step,
    y0 = y1 - h f(t1, y1) (one call of f, no iteration, so it cannot fail), and the adjoint is
    the exact discrete one: a0 = a1 + h J(t1, y1)^T a0 (linear; vector-Jacobian products only),
    dL/dtheta += h a0^T df/dtheta(t1, y1). ``g`` is updated in place; h = -ds.
    """
    scheme, _, tol, max_iters, anderson, _ = cfg
    lin = _Linearised(func, _time(s0, y), y, params)
    y0 = y + ds * lin.f

    def Ga(w: torch.Tensor) -> torch.Tensor:
        return a - ds * lin.vjp(w)

    a0, iters = fixed_point(Ga, a, tol, max_iters, anderson,
                            f"{scheme.name} adjoint step at t={s0:.4g}")
    STATS.add("backward", iters)
    for gi, d in zip(g, lin.param_vjp(a0)):
        gi.add_(d, alpha=-ds)
    return y0, a0


class _AdjointSolve(torch.autograd.Function):
    """Forward: the implicit solve without a graph. Backward: the adjoint system, same scheme."""

    @staticmethod
    def forward(ctx, func, cfg, y0, t, *params):
        steps: list | None = [] if cfg[5] else None  # adjoint_states == "stored"
        with torch.no_grad():
            ys = _forward(func, y0, t, cfg, differentiable=False, steps=steps)
        ctx.func, ctx.cfg = func, cfg
        # the states at the start of each step, in order (stored), or none (recomputed)
        ctx.steps = [y0.detach(), *steps[:-1]] if steps else None
        ctx.save_for_backward(t, ys, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        t, ys, *params = ctx.saved_tensors
        func, cfg = ctx.func, ctx.cfg
        scheme, h, tol, max_iters, anderson, _ = cfg
        theta, c = scheme.theta, scheme.c
        params = tuple(params)
        stored = ctx.steps  # None: recompute the states by solving backwards
        ctx.steps = None
        y, a = ys[-1], grad_ys[-1]
        g = [torch.zeros_like(p) for p in params]
        prev = None  # (previous backward step's state increment, its signed step): the guess

        for i, start, dt, n in reversed(_grid(t, h)):
            end = start + n * dt
            for j in range(n):
                s0, ds = end - j * dt, -dt  # integrate backwards: signed step -dt
                earlier = stored.pop() if stored is not None else None
                if scheme.explicit_reverse:
                    y, a = _backward_euler_reverse_step(func, s0, ds, y, a, g, params, cfg)
                    if earlier is not None:
                        y = earlier
                    continue
                sc = _time(s0 + c * ds, y)
                k0 = _Linearised(func, _time(s0, y), y, params) if theta < 1 else None
                k0_a = -k0.vjp(a) if k0 is not None else None

                # 1) the state, backwards: y1 = y + ds [theta f(sc, y + c (y1 - y)) + ...]
                def Gy(x: torch.Tensor, y_=y, k0_=k0, sc_=sc, ds_=ds) -> torch.Tensor:
                    incr = theta * func(sc_, y_ + c * (x - y_))
                    if k0_ is not None:
                        incr = incr + (1 - theta) * k0_.f
                    return y_ + ds_ * incr

                # initial guess: the previous backward step's increment extrapolated, as in
                # the forward pass (y itself is a step h f away from the solution, the
                # extrapolation O(h^2); with the far guess Anderson stalled in training)
                if earlier is not None:
                    y1, iters_y = earlier, 0
                else:
                    guess = _guess(y, prev, ds)
                    with torch.no_grad():
                        y1, iters_y = fixed_point(Gy, guess, tol, max_iters, anderson,
                                                  f"{scheme.name} adjoint step (state) at "
                                                  f"t={s0:.4g}")
                    prev = ((y1 - y).detach(), ds)
                # 2) the adjoint, linear in a1 once y1 is known: f linearised at the implicit
                # evaluation point (one call of func), then vector-Jacobian products only.
                lin = _Linearised(func, sc, y + c * (y1 - y), params)

                def Ga(w: torch.Tensor, a_=a, lin_=lin, k0_a_=k0_a, ds_=ds) -> torch.Tensor:
                    incr = -theta * lin_.vjp(a_ + c * (w - a_))
                    if k0_a_ is not None:
                        incr = incr + (1 - theta) * k0_a_
                    return a_ + ds_ * incr

                a1, iters_a = fixed_point(Ga, a, tol, max_iters, anderson,
                                          f"{scheme.name} adjoint step (adjoint) at t={s0:.4g}")
                STATS.add("backward", iters_y + iters_a)
                # 3) dL/dtheta += -ds [theta a f_theta(implicit point) + (1 - theta) a f_theta(s0)]
                for gi, d in zip(g, lin.param_vjp(a + c * (a1 - a))):
                    gi.add_(d, alpha=-ds * theta)
                if k0 is not None:
                    for gi, d in zip(g, k0.param_vjp(a)):
                        gi.add_(d, alpha=-ds * (1 - theta))
                y, a = y1, a1
            a = a + grad_ys[i]
        return (None, None, a, None, *g)


class ImplicitEuler(_Implicit):
    """Backward Euler, ``y1 = y0 + h f(t1, y1)`` (seed 004 eq. 9); order 1, L-stable."""

    SCHEME = Scheme("implicit_euler", theta=1.0, c=1.0, order=1, explicit_reverse=True)


class CrankNicolson(_Implicit):
    """Seed 004's "Crank-Nicolson" (eq. 10): the implicit midpoint rule,
    ``y1 = y0 + h f(t0 + h/2, (y0 + y1)/2)``; order 2, A-stable. Not the trapezoid."""

    SCHEME = Scheme("crank_nicolson", theta=1.0, c=0.5, order=2)


class Trapezoid(_Implicit):
    """The classical Crank-Nicolson / trapezoidal rule,
    ``y1 = y0 + h/2 (f(t0, y0) + f(t1, y1))``; order 2, A-stable; one more f call per step."""

    SCHEME = Scheme("trapezoid", theta=0.5, c=1.0, order=2)


IMPLICIT_SOLVERS = {cls.SCHEME.name: cls for cls in (ImplicitEuler, CrankNicolson, Trapezoid)}
EXTRA_SOLVERS.update(IMPLICIT_SOLVERS)
