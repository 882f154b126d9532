"""Exceptions that nodebench turns into one-line messages or failed runs."""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """Bad user input: an unknown option, an invalid number, missing data.

    The CLI prints ``error: <message>`` on one line and exits with status 2;
    no run directory is left behind.
    """


class SolverFailure(RuntimeError):
    """A run that started but could not finish numerically.

    Raised for "max_num_steps exceeded", "underflow in dt", a non-finite state, loss or gradient,
    or an implicit step that did not converge. The trainer records it in ``summary.json`` as
    ``status: failed`` with the reason; a multirun goes on with the next job.
    """


# torchdiffeq signals numerical failures of a solve with bare AssertionErrors about the state or
# the step; these phrases (torchdiffeq 0.2.x, rk_common.py / solvers.py / interp.py) name them.
_SOLVE_FAILURE_PHRASES = ("max_num_steps exceeded", "underflow in dt", "non-finite",
                          "invalid interpolation", "nan", "inf")
_MAX_REASON = 300


def _raised_in_torchdiffeq(exc: BaseException) -> bool:
    """True if the innermost frame of ``exc``'s traceback is torchdiffeq's code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}torchdiffeq{os.sep}" in tb.tb_frame.f_code.co_filename


def _short(msg: str) -> str:
    """One line, without torchdiffeq's dump of the whole state tensor."""
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    for cut in (": tensor(", ": [", " tensor("):
        if cut in line:
            line = line.split(cut)[0]
    return line[:_MAX_REASON]


def classify_solver_error(exc: BaseException) -> str | None:
    """Return a short reason if ``exc`` is a numerical failure of an ODE solve or of training.

    Numerical failures are: :class:`SolverFailure` (non-finite loss or gradient, an implicit step
    that did not converge; raised by nodebench), any ``AssertionError`` that torchdiffeq raises
    about the state or the step (``max_num_steps exceeded (1000>=1000)``, ``underflow in dt 0.0``,
    ``non-finite values in state `y```, ...), and ``torch.linalg.LinAlgError`` (a singular linear
    system inside a solve). Everything else is a bug: the caller re-raises it (None is returned).
    """
    if isinstance(exc, SolverFailure):
        return _short(str(exc)) or type(exc).__name__
    msg = str(exc)
    if isinstance(exc, AssertionError):
        lowered = msg.lower()
        known = any(p in lowered for p in _SOLVE_FAILURE_PHRASES[:4])
        if known or (_raised_in_torchdiffeq(exc)
                     and any(p in lowered for p in _SOLVE_FAILURE_PHRASES[4:])):
            return f"solver failure: {_short(msg)}"
        return None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if isinstance(exc, torch.linalg.LinAlgError):
        return f"solver failure: {_short(msg)}"
    return None
