# nodebench's own solvers (implicit Euler, Crank-Nicolson, trapezoid) register themselves in
# nodebench.solvers.EXTRA_SOLVERS when nodebench.implicit is imported; imported here, with the
# package, so that solvers.py need not import implicit.py (which imports solvers.py).
from . import implicit as _implicit  # noqa: F401
