"""Exceptions that nodebench turns into one-line messages or failed runs."""


class ConfigError(ValueError):
    """Bad user input: an unknown option, an invalid number, missing data.

    The CLI prints ``error: <message>`` on one line and exits with status 2;
    no run directory is left behind.
    """


class SolverFailure(RuntimeError):
    """A run that started but could not finish numerically.

    Raised for "max_num_steps exceeded", "underflow in dt", a non-finite loss, or an
    implicit step that did not converge. The trainer records it in ``summary.json`` as
    ``status: failed`` with the reason; a multirun goes on with the next job.
    """


def classify_solver_error(exc: BaseException) -> str | None:
    """Return a short reason if ``exc`` is a known numerical failure of an ODE solve.

    torchdiffeq signals step-limit and step-size failures with bare ``AssertionError``s
    (``max_num_steps exceeded (1000>=1000)``, ``underflow in dt 0.0``); everything else is a bug
    and must propagate.
    """
    if isinstance(exc, SolverFailure):
        return str(exc)
    msg = str(exc)
    if isinstance(exc, AssertionError):
        for key in ("max_num_steps exceeded", "underflow in dt"):
            if key in msg:
                return msg.strip()
    return None
