"""Solver and gradient-mode specifications, validated, and the one place that calls torchdiffeq.

Numerics (method, tolerances, step size, step limit) live in :class:`Solver`; how gradients are
taken (direct backprop through the solver's operations, or the adjoint method) lives in
:class:`Gradient`. Both are built by Hydra from ``conf/solver/*.yaml`` and ``conf/adjoint/*.yaml``.
torchdiffeq only *warns* about an unknown option and silently takes a single step over the whole
interval when a fixed-step method is given no step size; here both are errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS

from .errors import ConfigError

# Methods with an error estimate and step-size control, and the option keys torchdiffeq reads.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
ADAPTIVE_OPTIONS = {"first_step", "safety", "ifactor", "dfactor", "step_t", "jump_t"}
# Fixed-grid methods (step_size is required) and their option keys.
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
FIXED_OPTIONS = {"perturb", "interp"}
EXTRA_OPTIONS: dict[str, set[str]] = {"implicit_adams": {"max_iters"}}

# Methods nodebench implements itself (registered by nodebench.implicit, if present).
EXTRA_SOLVERS: dict[str, type] = {}


def available_methods() -> list[str]:
    """All solver names a config may use: torchdiffeq's plus nodebench's own."""
    names = [m for m in ADAPTIVE_METHODS + FIXED_METHODS if m in _TORCHDIFFEQ_SOLVERS]
    return names + sorted(EXTRA_SOLVERS)


def is_fixed_step(method: str) -> bool:
    return method in FIXED_METHODS or method in EXTRA_SOLVERS


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


DEFAULT_TOL = 1e-3  # rtol and atol of methods that use tolerances, when not given
# Fixed-grid methods that read rtol/atol: torchdiffeq's implicit_adams (its corrector iteration).
_TOLERANCE_FIXED = ("implicit_adams",)


def uses_tolerances(method: str) -> bool:
    """True for the methods that read ``rtol``/``atol`` (adaptive ones and implicit_adams)."""
    return method in ADAPTIVE_METHODS or method in _TOLERANCE_FIXED


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _check_option(key: str, value: Any) -> None:
    """Type and range of one torchdiffeq option value; ConfigError naming it otherwise."""
    name = f"solver.options.{key}"
    if key == "first_step":
        _check_positive(name, value)
    elif key in ("safety", "dfactor"):
        if not _is_number(value) or not 0 < value <= 1:
            raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")
    elif key == "ifactor":
        if not _is_number(value) or value < 1:
            raise ConfigError(f"{name} must be a number >= 1, got {value!r}")
    elif key in ("step_t", "jump_t"):
        values = value.tolist() if torch.is_tensor(value) else value
        if not isinstance(values, (list, tuple)) or not all(_is_number(v) for v in values):
            raise ConfigError(f"{name} must be a list of finite times, got {value!r}")
    elif key == "perturb":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    elif key == "interp":
        if value not in ("linear", "cubic"):
            raise ConfigError(f"{name} must be linear or cubic, got {value!r}")
    elif key == "max_iters":  # noqa: SIM102 - one branch per option
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def fixed_step_count(t0: float, t1: float, h: float, eps: float = 2.220446049250313e-16) -> int:
    """Number of fixed steps of size at most ``h`` over [t0, t1] (either direction).

    ``round(|t1 - t0| / h)`` when that ratio is within 1e-9 (plus the rounding error of times of
    machine precision ``eps``, e.g. float32 times) of a whole number, so that t1 = 0.3, h = 0.1 is
    3 steps although 0.3 is not exact in binary; otherwise ``ceil`` (the last step is shorter).
    """
    ratio = abs(t1 - t0) / h
    nearest = round(ratio)
    slack = 1e-9 + 4.0 * eps * (abs(t0) + abs(t1)) / h
    if nearest >= 1 and abs(ratio - nearest) <= slack:
        return int(nearest)
    return max(1, math.ceil(ratio))


def fixed_grid(h: float) -> Callable:
    """torchdiffeq ``grid_constructor`` for step ``h``: :func:`fixed_step_count` steps from
    ``t[0]`` to ``t[-1]``, each of length ``h`` except a shorter last one when ``h`` does not
    divide the interval; the last point is exactly ``t[-1]``."""

    def construct(func, y0, t: torch.Tensor) -> torch.Tensor:
        t0, t1 = float(t[0]), float(t[-1])
        n = fixed_step_count(t0, t1, h, torch.finfo(t.dtype).eps)
        direction = 1.0 if t1 >= t0 else -1.0
        grid = t[0] + direction * h * torch.arange(n + 1, dtype=t.dtype, device=t.device)
        grid[-1] = t[-1]
        return grid

    return construct


@dataclass(frozen=True)
class Solver:
    """An ODE solver configuration (method and numerics), validated on construction.

    Args:
        method: a torchdiffeq method name (``dopri5``, ``rk4``, ...) or one of nodebench's own.
        rtol, atol: tolerances of adaptive methods and implicit_adams (None: 1e-3); giving
            them to another fixed-step method is an error (it would ignore them).
        step_size: step of fixed-grid methods; required for them, rejected for adaptive ones.
            The grid has :func:`fixed_step_count` steps over each solve's interval.
        max_num_steps: step limit of adaptive methods; exceeding it fails the run.
        options: further options for this method, each checked for type and range; unknown
            keys are an error, None values are dropped.

    Raises:
        ConfigError: an unknown method or option, a value of the wrong type or range, a
            fixed-step method without a step size, a setting the method would ignore.
    """

    method: str = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    step_size: float | None = None
    max_num_steps: int | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        methods = available_methods()
        if self.method not in methods:
            raise ConfigError(f"unknown solver method {self.method!r}; choose one of: "
                              + ", ".join(methods))
        if uses_tolerances(self.method):
            for name in ("rtol", "atol"):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, DEFAULT_TOL)
                _check_positive(f"solver.{name}", getattr(self, name))
        elif self.rtol is not None or self.atol is not None:
            hint = ("its fixed-point tolerance is solver.options.tol"
                    if self.method in EXTRA_SOLVERS else "they would be ignored")
            raise ConfigError(f"solver.rtol and solver.atol apply to adaptive methods (and "
                              f"implicit_adams), not to fixed-step {self.method!r}: remove them "
                              f"({hint})")
        else:
            # not given, not used: torchdiffeq still receives a number (explicit_adams converts
            # it to a tensor and never reads it)
            object.__setattr__(self, "rtol", DEFAULT_TOL)
            object.__setattr__(self, "atol", DEFAULT_TOL)
        # null-valued options are placeholders (conf/solver/*.yaml): not passed on
        options = {k: v for k, v in dict(self.options or {}).items() if v is not None}
        object.__setattr__(self, "options", options)
        if is_fixed_step(self.method):
            if self.step_size is None:
                raise ConfigError(f"solver {self.method!r} is fixed-step: set solver.step_size "
                                  "(e.g. solver.step_size=0.25 for 4 steps over [0, 1])")
            _check_positive("solver.step_size", self.step_size)
            if self.max_num_steps is not None:
                raise ConfigError(f"solver.max_num_steps applies to adaptive methods, "
                                  f"not to fixed-step {self.method!r}")
            allowed = FIXED_OPTIONS | EXTRA_OPTIONS.get(self.method, set())
            if self.method in EXTRA_SOLVERS:
                allowed = set(getattr(EXTRA_SOLVERS[self.method], "OPTIONS", ()))
        else:
            if self.step_size is not None:
                raise ConfigError(f"solver.step_size applies to fixed-step methods, not to "
                                  f"adaptive {self.method!r} (use solver.options.first_step)")
            if self.max_num_steps is not None and (
                    not isinstance(self.max_num_steps, int) or isinstance(self.max_num_steps, bool)
                    or self.max_num_steps <= 0):
                raise ConfigError("solver.max_num_steps must be a positive integer, got "
                                  f"{self.max_num_steps!r}")
            allowed = ADAPTIVE_OPTIONS | EXTRA_OPTIONS.get(self.method, set())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for solver "
                              f"{self.method!r}; allowed: {', '.join(sorted(allowed)) or 'none'}")
        if self.method in EXTRA_SOLVERS and hasattr(EXTRA_SOLVERS[self.method], "check_options"):
            EXTRA_SOLVERS[self.method].check_options(options)
        else:
            for key, value in options.items():
                _check_option(key, value)

    def torchdiffeq_options(self) -> dict:
        """The ``options=`` dict for ``torchdiffeq.odeint``.

        Fixed-step methods get an explicit ``grid_constructor`` (:func:`fixed_grid`) instead of
        ``step_size``: the number of steps is :func:`fixed_step_count`, never one extra step of
        rounding-error length. ``step_t``/``jump_t`` lists become tensors.
        """
        opts = dict(self.options)
        for key in ("step_t", "jump_t"):
            if key in opts and not torch.is_tensor(opts[key]):
                opts[key] = torch.tensor([float(v) for v in opts[key]], dtype=torch.float64)
        if is_fixed_step(self.method):
            opts["grid_constructor"] = fixed_grid(float(self.step_size))
        elif self.max_num_steps is not None:
            opts["max_num_steps"] = int(self.max_num_steps)
        return opts

    def describe(self) -> str:
        if is_fixed_step(self.method):
            return f"{self.method} h={self.step_size:g}"
        return f"{self.method} rtol={self.rtol:g} atol={self.atol:g}"


@dataclass(frozen=True)
class Gradient:
    """How gradients flow through an ODE block.

    Args:
        mode: ``direct`` (backprop through the solver's operations: Chen et al.'s RK-Net, memory
            O(NFE)), ``adjoint`` (solve the adjoint ODE backwards: ODE-Net, memory O(1)), or one
            of :data:`nodebench.gradients.MODES`: ``checkpointed`` (store the state of each
            accepted step, recompute each step's graph in backward; O(steps x state)),
            ``aca`` (adaptive checkpoint adjoint, Zhuang et al. ICML 2020) or ``mali`` (the
            reversible asynchronous leapfrog integrator, Zhuang et al. ICLR 2021; O(state)).
        rtol, atol: tolerances of the backward (adjoint) solve; ``None`` means the forward ones.
        norm: ``default`` or ``seminorm`` (Kidger et al. 2021: the step-size controller of the
            backward solve ignores the parameter-gradient channels; fewer backward NFE).
        eta: MALI's damping coefficient of the ALF step, in (0, 1], not 0.5 (1 = undamped);
            used by ``mode=mali`` only.
    """

    mode: str = "adjoint"
    rtol: float | None = None
    atol: float | None = None
    norm: str = "default"
    eta: float = 1.0

    MODES = ("direct", "adjoint", "checkpointed", "aca", "mali")
    NORMS = ("default", "seminorm")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise ConfigError(f"unknown gradient mode {self.mode!r}; choose one of: "
                              + ", ".join(self.MODES))
        if self.norm not in self.NORMS:
            raise ConfigError(f"unknown adjoint norm {self.norm!r}; choose one of: "
                              + ", ".join(self.NORMS))
        _check_positive("adjoint.rtol", self.rtol, allow_none=True)
        _check_positive("adjoint.atol", self.atol, allow_none=True)
        if self.mode == "mali":
            from .gradients import check_eta
            check_eta(self.eta)

    def describe(self) -> str:
        if self.mode == "direct":
            return "direct"
        if self.mode == "mali":
            return "mali" + (f" eta={self.eta:g}" if self.eta != 1.0 else "")
        if self.mode in ("checkpointed", "aca"):
            return self.mode
        return "adjoint" + ("+seminorm" if self.norm == "seminorm" else "")


def check_compatible(solver: Solver, gradient: Gradient) -> None:
    """Reject combinations torchdiffeq would silently ignore, and solvers a gradient mode does
    not apply to (``checkpointed``/``aca``: explicit Runge-Kutta methods; ``mali``: its own ALF
    integrator, configured by ``solver=dopri5`` or ``solver=euler``); one-line ConfigError."""
    if gradient.norm == "seminorm" and (gradient.mode != "adjoint" or is_fixed_step(solver.method)):
        raise ConfigError("adjoint=seminorm needs model.gradient=adjoint and an adaptive solver "
                          f"(got {gradient.mode}, {solver.method!r})")
    if gradient.mode not in ("direct", "adjoint"):
        from .gradients import MODES as GRADIENT_MODES  # checkpointed, aca, mali
        GRADIENT_MODES[gradient.mode].check(solver, gradient)


def odesolve(func: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor, solver: Solver,
             gradient: Gradient) -> torch.Tensor:
    """Integrate ``dy/dt = func(t, y)`` from ``y0`` over the times ``t``; returns ``y(t)``.

    Shapes: ``y0`` (*S), ``t`` (T,), result (T, *S). The only call site of torchdiffeq in
    nodebench, so every model gets the same validated options and gradient mode.
    """
    if gradient.mode not in ("direct", "adjoint"):
        # checkpointed, aca, mali: nodebench's own integrators (nodebench.gradients), which own
        # how they differentiate. check_compatible has vetted the solver for them.
        from .gradients import MODES as GRADIENT_MODES
        return GRADIENT_MODES[gradient.mode].solve(func, y0, t, solver, gradient)
    method: str | Callable = solver.method
    options = solver.torchdiffeq_options()
    if solver.method in EXTRA_SOLVERS:
        # torchdiffeq accepts only its own names; nodebench's own methods integrate here.
        return EXTRA_SOLVERS[solver.method].integrate(func, y0, t, solver, gradient)
    if gradient.mode == "direct":
        return torchdiffeq.odeint(func, y0, t, rtol=solver.rtol, atol=solver.atol,
                                  method=method, options=options)
    adjoint_options = dict(options)
    if gradient.norm == "seminorm":  # validated to be an adaptive method by check_compatible
        adjoint_options["norm"] = "seminorm"
    return torchdiffeq.odeint_adjoint(
        func, y0, t, rtol=solver.rtol, atol=solver.atol, method=method, options=options,
        adjoint_rtol=gradient.rtol if gradient.rtol is not None else solver.rtol,
        adjoint_atol=gradient.atol if gradient.atol is not None else solver.atol,
        adjoint_method=method, adjoint_options=adjoint_options,
        adjoint_params=tuple(func.parameters()))
