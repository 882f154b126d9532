"""Ground-truth dynamical systems and the ODE-Nets that learn them (seed 001, "Learning dynamical
systems"; docs/reference.md section 3).

Systems (:data:`SYSTEMS`; :func:`make_system` builds one as a dataset). The state is a row vector
y in R^2; a batch of states is (M, 2).

* ``spiral``: dy/dt = y A, A = [[-0.1, 2.0], [-2.0, -0.1]] (torchdiffeq's ode_demo, the seed's
  first example): a damped rotation.
* ``random_matrix``: dy/dt = y A, A ~ N(0, 1) / 2 per entry, drawn from a generator seeded with
  the system seed (default 0), so every run sees the same system.
* ``lotka_volterra``: what the seed calls the Volterra-Lotka system: a, b, c, d = 1.5, 1.0, 3.0,
  1.0 written as the *linear* system dy/dt = y A, A = [[0, -b c / d], [d a / b, 0]]. This is the
  linearisation the seed uses (a centre: closed ellipses, eigenvalues +-i sqrt(4.5)), NOT the
  nonlinear Lotka-Volterra predator-prey equations.
* ``nonlinear``: the seed's sigmoid-gated system with A2 = [[-0.1, -0.5], [0.5, -0.1]],
  B2 = [[0.2, 1], [-1, 0.2]] and c = y0 = (1, 1):
  dy/dt = sigmoid(y.c) (y - c) A2^T + sigmoid(-y.c) (y + c) B2^T, which is what the seed's
  ``nn.Linear(2, 2, bias=False)`` layers with weights A2 and B2 compute.
* ``nn_field``: a random bias-free 4-layer MLP 2-25-50-10-2 with ELU after every layer (the last
  too, as in the seed) applied to y * t: dy/dt = ELU(W4 ELU(W3 ELU(W2 ELU(W1 (y t))))), t in
  [-15, 15], y(-15) = (1, 1). Weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default
  ``nn.Linear`` initialisation, which the seed relies on), drawn from a generator seeded with the
  system seed. The field depends on t; the ODE-Nets below do not (as in the seed).

Time grids (state y0 is the state at the first time point):

========================  =========  ==============  ======  ======================================
system                    y0         t               points  ground truth
========================  =========  ==============  ======  ======================================
spiral, lotka_volterra    (2, 0)     [0, 25]         1000    y0 @ matrix_exp(A (t - t0))
random_matrix             (1, 1)     [0, 5]          1000    y0 @ matrix_exp(A (t - t0))
nonlinear                 (1, 1)     [0, 25]         1000    dopri5, rtol = atol = 1e-10, float64
nn_field                  (1, 1)     [-15, 15]       1000    dopri5, rtol = atol = 1e-10, float64
========================  =========  ==============  ======  ======================================

spiral and lotka_volterra use ode_demo's y0 and grid. random_matrix is on [0, 5]: the default
draw (system seed 0) has eigenvalues 0.995 and 0.059, so over [0, 25] the trajectory would grow by
e^25; on [0, 5] it grows by about e^5 = 150. nonlinear starts at the gate's centre c = (1, 1), as
in the seed. nn_field uses the seed's grid. (The seed's notebook uses y0 = (1, 1), t in [-1, 1],
200 points for the first four systems; those short windows show under a turn of the spiral, so the
longer ode_demo-like windows are used here.)

Sampling (:meth:`System.observed`): ``regular`` keeps every grid point; ``irregular`` keeps a
seeded random subset of ``keep`` x N points (index 0, the initial state, always kept), so points
are missing and the gaps are uneven. Split in time (:meth:`System.train_end`): training uses the
first ``fraction`` of the time range, the rest measures extrapolation.

Models (:data:`NETWORKS`, :class:`ODEFunc`): autonomous vector fields f(y) as in the seed and
ode_demo, tanh MLPs with weights ~ N(0, 0.1^2) and zero biases: ``small`` 2-50-2 (252 parameters)
and ``deep`` 2-150-50-50-2 (10,652 parameters).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .models.blocks import Dynamics
from .solvers import Gradient, Solver, odesolve

F64 = torch.float64
TRUTH_TOL = 1e-10  # rtol = atol of the dopri5 ground-truth solve of the nonlinear systems

# ------------------------------------------------------------------------------- true fields


class LinearField(nn.Module):
    """dy/dt = y A (y a row vector, batch (M, 2))."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A


class GatedField(nn.Module):
    """The seed's ``nonlinear`` system: a sigmoid gate on y.c blends two linear fields,
    sigmoid(y.c) (y - c) A^T + sigmoid(-y.c) (y + c) B^T."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.register_buffer("c", c)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = (y * self.c).sum(-1, keepdim=True)
        return torch.sigmoid(s) * ((y - self.c) @ self.A.T) \
            + torch.sigmoid(-s) * ((y + self.c) @ self.B.T)


class MLPField(nn.Module):
    """The seed's ``nn_field``: bias-free ELU layers (after every layer, the last included)
    applied to y * t."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        for i, w in enumerate(weights):
            self.register_buffer(f"W{i + 1}", w)
        self.depth = len(weights)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = y * t
        for i in range(self.depth):
            x = nn.functional.elu(x @ getattr(self, f"W{i + 1}").T)
        return x


NN_FIELD_WIDTHS = (2, 25, 50, 10, 2)


def random_matrix(seed: int = 0) -> torch.Tensor:
    """A ~ N(0, 1) / 2 per entry, from a generator seeded with ``seed`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, generator=gen, dtype=F64) / 2.0


def nn_field_weights(seed: int = 0) -> list[torch.Tensor]:
    """Weights (out, in) of the 2-25-50-10-2 field, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for fan_in, fan_out in itertools.pairwise(NN_FIELD_WIDTHS):
        bound = 1.0 / math.sqrt(fan_in)
        out.append((torch.rand(fan_out, fan_in, generator=gen, dtype=F64) * 2 - 1) * bound)
    return out


SPIRAL_A = ((-0.1, 2.0), (-2.0, -0.1))
LV_ABCD = (1.5, 1.0, 3.0, 1.0)
GATED_A2 = ((-0.1, -0.5), (0.5, -0.1))
GATED_B2 = ((0.2, 1.0), (-1.0, 0.2))


def lotka_volterra_matrix(a: float = 1.5, b: float = 1.0, c: float = 3.0,
                          d: float = 1.0) -> torch.Tensor:
    """The seed's linear "Lotka-Volterra" matrix [[0, -b c / d], [d a / b, 0]]."""
    return torch.tensor([[0.0, -b * c / d], [d * a / b, 0.0]], dtype=F64)


def _field(name: str, seed: int) -> tuple[nn.Module, torch.Tensor | None]:
    """The true vector field of ``name`` and its matrix A when linear (None otherwise)."""
    if name == "spiral":
        A = torch.tensor(SPIRAL_A, dtype=F64)
    elif name == "random_matrix":
        A = random_matrix(seed)
    elif name == "lotka_volterra":
        A = lotka_volterra_matrix(*LV_ABCD)
    elif name == "nonlinear":
        c = torch.tensor(SYSTEMS[name]["y0"], dtype=F64)
        return GatedField(torch.tensor(GATED_A2, dtype=F64), torch.tensor(GATED_B2, dtype=F64),
                          c), None
    elif name == "nn_field":
        return MLPField(nn_field_weights(seed)), None
    else:  # pragma: no cover - guarded by make_system
        raise KeyError(name)
    return LinearField(A), A


SYSTEMS: dict[str, dict] = {
    "spiral": {"y0": (2.0, 0.0), "t": (0.0, 25.0), "points": 1000, "linear": True,
               "text": "dy/dt = y A, A = [[-0.1, 2], [-2, -0.1]] (damped spiral)"},
    "random_matrix": {"y0": (1.0, 1.0), "t": (0.0, 5.0), "points": 1000, "linear": True,
                      "text": "dy/dt = y A, A ~ N(0, 1)/2 (system seed {seed})"},
    "lotka_volterra": {"y0": (2.0, 0.0), "t": (0.0, 25.0), "points": 1000, "linear": True,
                       "text": "the seed's linear 'Lotka-Volterra': dy/dt = y A, "
                               "A = [[0, -bc/d], [da/b, 0]] = [[0, -3], [1.5, 0]] (a centre)"},
    "nonlinear": {"y0": (1.0, 1.0), "t": (0.0, 25.0), "points": 1000, "linear": False,
                  "text": "dy/dt = sig(y.c)(y - c)A2^T + sig(-y.c)(y + c)B2^T, c = (1, 1)"},
    "nn_field": {"y0": (1.0, 1.0), "t": (-15.0, 15.0), "points": 1000, "linear": False,
                 "text": "dy/dt = random bias-free ELU MLP 2-25-50-10-2 of y t "
                         "(system seed {seed})"},
}


@dataclass
class System:
    """One ground-truth trajectory: ``t`` (N,), ``y`` (N, 2), float64; ``y[0] == y0``."""

    name: str
    description: str
    t: torch.Tensor
    y: torch.Tensor
    field: nn.Module
    A: torch.Tensor | None
    method: str
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def y0(self) -> torch.Tensor:
        return self.y[0]

    @property
    def dt(self) -> float:
        return float(self.t[1] - self.t[0])

    def train_end(self, fraction: float) -> int:
        """Number of leading grid points in the training window: those with
        t <= t0 + fraction (t1 - t0); the rest is the extrapolation window."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"train fraction must be in (0, 1], got {fraction!r}")
        t0, t1 = float(self.t[0]), float(self.t[-1])
        cut = t0 + fraction * (t1 - t0)
        return int((self.t <= cut + 1e-9 * (t1 - t0)).sum())

    def observed(self, sampling: str, keep: float = 0.5, seed: int = 0) -> torch.Tensor:
        """Sorted indices of the observed grid points.

        ``regular``: all N. ``irregular``: index 0 plus a random subset of the others, round(keep
        N) points in all, drawn from a generator seeded with ``seed`` (the same seed gives the
        same points).
        """
        n = len(self.t)
        if sampling == "regular":
            return torch.arange(n)
        if sampling != "irregular":
            raise ValueError(f"unknown sampling {sampling!r}; choose regular or irregular")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep!r}")
        count = max(2, round(keep * n))
        gen = torch.Generator().manual_seed(seed)
        rest = torch.randperm(n - 1, generator=gen)[:count - 1] + 1
        return torch.cat([torch.zeros(1, dtype=torch.long), rest.sort().values])


def linear_solution(A: torch.Tensor, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """y(t) = y0 @ matrix_exp(A (t - t0)) for dy/dt = y A: (N, 2)."""
    expm = torch.linalg.matrix_exp(A * (t - t[0])[:, None, None])
    return (y0[None, None, :] @ expm)[:, 0, :]


def make_system(name: str, points: int | None = None, seed: int = 0) -> System:
    """Build system ``name`` on its default grid (``points`` overrides the number of points);
    ``seed`` is the system seed of ``random_matrix`` and ``nn_field``."""
    if name not in SYSTEMS:
        raise KeyError(f"unknown system {name!r}; choose one of: {', '.join(SYSTEMS)}")
    spec = SYSTEMS[name]
    n = int(points or spec["points"])
    t = torch.linspace(spec["t"][0], spec["t"][1], n, dtype=F64)
    y0 = torch.tensor(spec["y0"], dtype=F64)
    func, A = _field(name, seed)
    if A is not None:
        y = linear_solution(A, y0, t)
        method = "closed form y0 @ matrix_exp(A (t - t0))"
    else:
        solver = Solver("dopri5", rtol=TRUTH_TOL, atol=TRUTH_TOL)
        with torch.no_grad():
            y = odesolve(func, y0[None], t, solver, Gradient("direct"))[:, 0, :]
        method = f"dopri5 rtol = atol = {TRUTH_TOL:g} (float64)"
    return System(name=name, description=spec["text"].format(seed=seed), t=t, y=y, field=func,
                  A=A, method=method, seed=seed)


# ------------------------------------------------------------------------------------- models

NETWORKS: dict[str, tuple[int, ...]] = {"small": (50,), "deep": (150, 50, 50)}
NETWORK_TEXT = {"small": "2-50-2 tanh", "deep": "2-150-50-50-2 tanh"}


class ODEFunc(Dynamics):
    """Learned autonomous field f(y): a tanh MLP 2-h1-...-2 (weights N(0, 0.1^2), zero biases,
    the initialisation of ode_demo and the seed)."""

    def __init__(self, hidden: tuple[int, ...] = (50,), dim: int = 2) -> None:
        super().__init__()
        widths = (dim, *hidden, dim)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def make_network(name: str) -> ODEFunc:
    if name not in NETWORKS:
        raise KeyError(f"unknown network {name!r}; choose one of: {', '.join(NETWORKS)}")
    return ODEFunc(NETWORKS[name])


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TrajectoryODE(nn.Module):
    """The ODE-Net of the trajectory fits: ``forward(y0, t)`` solves dy/dt = f(y) from the states
    y0 (B, dim) over the times t (T,) and returns (T, B, dim); f is an :class:`ODEFunc` with
    hidden widths ``hidden`` (``[50]``: the seed's 2-50-2, ``[150, 50, 50]``: its deep net).
    ``solver`` and ``gradient`` are read at every solve: the gradient-error reference rewires
    them (:func:`nodebench.validity.solve_modules`)."""

    def __init__(self, dim: int, solver: Solver, gradient: Gradient,
                 hidden: tuple[int, ...] | list[int] = (50,)) -> None:
        super().__init__()
        self.func = ODEFunc(tuple(int(h) for h in hidden), dim)
        self.solver, self.gradient = solver, gradient

    def forward(self, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return odesolve(self.func, y0, t, self.solver, self.gradient)


@dataclass
class TrajectoryData:
    """One system's trajectory as training data: grid ``t`` (N,) float32, truth ``y`` (N, 2)
    float64, ``y_train`` (N, 2) float32 (the points the loss sees), the observed grid indices
    ``observed`` (sorted), those in the training window ``obs_train``, and ``train_end`` (the
    number of leading grid points in the training window)."""

    system: System
    t: torch.Tensor
    y: torch.Tensor
    y_train: torch.Tensor
    observed: torch.Tensor
    obs_train: torch.Tensor
    train_end: int

    @property
    def dt(self) -> float:
        return self.system.dt

    def to(self, device: torch.device) -> TrajectoryData:
        return TrajectoryData(self.system, self.t.to(device), self.y.to(device),
                              self.y_train.to(device), self.observed.to(device),
                              self.obs_train.to(device), self.train_end)


def trajectory_dataset(system: str = "spiral", points: int | None = None, system_seed: int = 0,
                       sampling: str = "regular", keep: float = 0.5,
                       train_fraction: float = 0.75, seed: int = 0, **_: object) -> TrajectoryData:
    """``conf/dataset/<system>.yaml``: system ``system`` (:data:`SYSTEMS`) on ``points`` grid points
    (None: its default), observed ``regular``-ly or ``irregular``-ly (``keep`` of the points,
    drawn with ``seed``), training on the first ``train_fraction`` of the time range.
    Raises ConfigError for an unknown system or sampling or a fraction outside (0, 1]."""
    from .errors import ConfigError

    try:
        s = make_system(system, points=points, seed=system_seed)
        observed = s.observed(sampling, keep, seed)
        end = s.train_end(train_fraction)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"invalid dynamics dataset: {str(exc).strip(chr(39))}") from None
    obs_train = observed[observed < end]
    if len(obs_train) < 2:
        raise ConfigError(f"dataset {system}: fewer than 2 observed points in the training window")
    return TrajectoryData(s, s.t.float(), s.y, s.y.float(), observed, obs_train, end)


def sub_trajectories(obs: torch.Tensor, y: torch.Tensor, batch_time: int, batch_size: int,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
    """Random sub-trajectories of ``batch_time`` consecutive observed points (ode_demo's
    ``get_batch``, for irregular grids too).

    Returns the start states (B, 2), the union of the grid offsets from each start (U,) (sorted,
    0 first), the position of every point in that union (B, T) and the targets (B, T, 2).
    """
    starts = len(obs) - batch_time + 1
    pick = torch.randperm(starts, generator=gen)[:batch_size].to(obs.device)
    idx = obs[pick[:, None] + torch.arange(batch_time, device=obs.device)]  # (B, T) grid indices
    offsets = idx - idx[:, :1]
    union = torch.unique(offsets)  # sorted; 0 first
    pos = torch.searchsorted(union, offsets)
    return y[idx[:, 0]], union, pos, y[idx]


def trajectory_errors(true: torch.Tensor, pred: torch.Tensor, train_end: int) -> dict:
    """MSE and MSE / variance of the truth (per component, averaged), in the training window
    (``fit_*``) and after it (``extrap_*``); None where a window is empty or has no variance."""
    out = {}
    for name, sl in (("fit", slice(0, train_end)), ("extrap", slice(train_end, None))):
        a, b = true[sl], pred[sl]
        if len(a) == 0:
            out.update({f"{name}_mse": None, f"{name}_var": None, f"{name}_rel": None})
            continue
        mse = float(((a - b) ** 2).mean())
        var = float(a.var(0, unbiased=False).mean()) if len(a) > 1 else 0.0
        out.update({f"{name}_mse": mse, f"{name}_var": var,
                    f"{name}_rel": mse / var if var > 0 else None})
    return out
