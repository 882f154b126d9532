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


@dataclass(frozen=True)
class Solver:
    """An ODE solver configuration (method and numerics), validated on construction.

    Args:
        method: a torchdiffeq method name (``dopri5``, ``rk4``, ...) or one of nodebench's own.
        rtol, atol: tolerances of adaptive methods (ignored by fixed-step ones).
        step_size: step of fixed-grid methods; required for them, rejected for adaptive ones.
        max_num_steps: step limit of adaptive methods; exceeding it fails the run.
        options: further torchdiffeq options for this method; unknown keys are an error.
    """

    method: str = "dopri5"
    rtol: float = 1e-3
    atol: float = 1e-3
    step_size: float | None = None
    max_num_steps: int | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        methods = available_methods()
        if self.method not in methods:
            raise ConfigError(f"unknown solver method {self.method!r}; choose one of: "
                              + ", ".join(methods))
        _check_positive("solver.rtol", self.rtol)
        _check_positive("solver.atol", self.atol)
        options = dict(self.options or {})
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
                    not isinstance(self.max_num_steps, int) or self.max_num_steps <= 0):
                raise ConfigError("solver.max_num_steps must be a positive integer, got "
                                  f"{self.max_num_steps!r}")
            allowed = ADAPTIVE_OPTIONS | EXTRA_OPTIONS.get(self.method, set())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for solver "
                              f"{self.method!r}; allowed: {', '.join(sorted(allowed)) or 'none'}")

    def torchdiffeq_options(self) -> dict:
        """The ``options=`` dict for ``torchdiffeq.odeint``."""
        opts = dict(self.options)
        if is_fixed_step(self.method):
            opts["step_size"] = float(self.step_size)
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
            O(NFE)) or ``adjoint`` (solve the adjoint ODE backwards: ODE-Net, memory O(1)).
        rtol, atol: tolerances of the backward (adjoint) solve; ``None`` means the forward ones.
        norm: ``default`` or ``seminorm`` (Kidger et al. 2021: the step-size controller of the
            backward solve ignores the parameter-gradient channels; fewer backward NFE).
    """

    mode: str = "adjoint"
    rtol: float | None = None
    atol: float | None = None
    norm: str = "default"

    MODES = ("direct", "adjoint")
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

    def describe(self) -> str:
        if self.mode == "direct":
            return "direct"
        return "adjoint" + ("+seminorm" if self.norm == "seminorm" else "")


def check_compatible(solver: Solver, gradient: Gradient) -> None:
    """Reject combinations torchdiffeq would silently ignore."""
    if gradient.norm == "seminorm" and (gradient.mode != "adjoint" or is_fixed_step(solver.method)):
        raise ConfigError("adjoint=seminorm needs model.gradient=adjoint and an adaptive solver "
                          f"(got {gradient.mode}, {solver.method!r})")


def odesolve(func: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor, solver: Solver,
             gradient: Gradient) -> torch.Tensor:
    """Integrate ``dy/dt = func(t, y)`` from ``y0`` over the times ``t``; returns ``y(t)``.

    Shapes: ``y0`` (*S), ``t`` (T,), result (T, *S). The only call site of torchdiffeq in
    nodebench, so every model gets the same validated options and gradient mode.
    """
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


# nodebench's own methods register themselves in EXTRA_SOLVERS (imported last: they use Solver).
from . import implicit  # noqa: F401
