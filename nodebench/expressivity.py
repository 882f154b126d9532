"""Trajectory-length expressivity of random networks: FFN, Neural ODE, CT-RNN and LTC.

Seed 000 ("The Overlooked Side of Neural ODEs", summarised in docs/reference.md section 3)
applies the trajectory-length measure of Raghu et al. (ICML 2017, "On the Expressive Power of
Deep Neural Networks") to randomly initialised (untrained) models: a circle
``x(t) = (sin t, cos t)``, ``t in [0, 2 pi]``, goes in; the arc length of the latent curve it
produces comes out. Longer, more convoluted latent curves mean a more expressive model.

Every model here carries a leading *draws* dimension ``R``: ``R`` independent random weight
draws are evaluated in one batched computation, so mean and spread over draws cost one pass.

Models (all parameters Gaussian, see :func:`gaussian_weights`):

* :class:`DeepNet`: ``L`` fully connected layers ``a_l = phi(W_l a_{l-1} + b_l)`` (the FFN).
* :class:`DeepNetDynamics`: a Neural ODE whose right-hand side is a :class:`DeepNet`
  (``dh/dt = DeepNet(h)``, state width = layer width), started from the circle itself
  (zero-padded to the width) and read out at ``t = l / L``, ``l = 1..L``: the continuous
  counterpart of "after layer l".
* Single-layer continuous-time cells driven by the input time series ``x(t)`` from ``h(0) = 0``
  (Hasani et al. 2021, "Liquid Time-Constant Networks", eqs. 1-3), with
  ``f = phi(W h + U x(t) + b)``:

  - :class:`NeuralODECell`: ``dh/dt = f``
  - :class:`CTRNNCell`:     ``dh/dt = -h / tau + f``
  - :class:`LTCCell`:       ``dh/dt = -(1 / tau + f) * h + f * A``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .models.blocks import Dynamics
from .solvers import Gradient, Solver, odesolve

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

# Variance divisor of a weight matrix given its fan-in: Raghu et al. 2017 and Hasani et al. 2021
# (Theorems 4-5) draw W ~ N(0, sigma_w^2 / k); the seed writes only "N(0, sigma^2 = 2)".
WEIGHT_SCALINGS: dict[str, Callable[[int], float]] = {
    "fan_in": lambda fan_in: 1.0 / fan_in,
    "none": lambda fan_in: 1.0,
}

# Forward-only evaluation: no gradients flow, so "direct" just means no adjoint bookkeeping.
NO_GRAD = Gradient(mode="direct")


def _check_choice(name: str, value: str, choices: dict) -> None:
    if value not in choices:
        from .errors import ConfigError

        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------
# The measure
# ---------------------------------------------------------------------------------------------

def circle(num_points: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The input trajectory of the seed: ``t`` (N,) uniform on [0, 2 pi] (both ends included)
    and ``x`` (N, 2) = ``(sin t, cos t)``; its length is 2 pi."""
    t = torch.linspace(0.0, 2.0 * math.pi, num_points, dtype=dtype)
    return t, torch.stack([torch.sin(t), torch.cos(t)], dim=-1)


def trajectory_length(traj: torch.Tensor) -> torch.Tensor:
    """Arc length of a sampled curve: the sum of Euclidean distances between consecutive points.

    Shapes: ``traj`` (..., N, D) -> (...). Raghu et al. 2017's l(z(t)), approximated by the
    inscribed polyline (a lower bound that converges as the sampling gets denser).
    """
    return (traj[..., 1:, :] - traj[..., :-1, :]).norm(dim=-1).sum(dim=-1)


def pca_2d(traj: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Projection of a curve (N, D) on its first two principal components -> ((N, 2), fraction of
    the variance those two components explain). A curve that stays a deformed circle keeps that
    fraction near 1; a convoluted one spreads its variance over many directions."""
    centred = traj - traj.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, vh.shape[0])
    proj = centred @ vh[:k].T
    if k < 2:  # a 1-D state: plot it against a zero second axis
        proj = torch.cat([proj, torch.zeros_like(proj)], dim=-1)
    var = s.square()
    frac = float(var[:2].sum() / var.sum()) if float(var.sum()) > 0 else 1.0
    return proj, frac


# ---------------------------------------------------------------------------------------------
# Random parameters
# ---------------------------------------------------------------------------------------------

def gaussian_weights(draws: int, fan_out: int, fan_in: int, sigma_w2: float, scaling: str,
                     generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``draws`` matrices (R, fan_out, fan_in) with entries N(0, sigma_w2 * WEIGHT_SCALINGS[scaling](fan_in))."""
    _check_choice("weight scaling", scaling, WEIGHT_SCALINGS)
    std = math.sqrt(sigma_w2 * WEIGHT_SCALINGS[scaling](fan_in))
    return torch.randn(draws, fan_out, fan_in, generator=generator, dtype=dtype) * std


def gaussian_biases(draws: int, size: int, sigma_b2: float, generator: torch.Generator,
                    dtype: torch.dtype) -> torch.Tensor:
    """``draws`` vectors (R, size) with entries N(0, sigma_b2)."""
    return torch.randn(draws, size, generator=generator, dtype=dtype) * math.sqrt(sigma_b2)


def _affine(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector products: w (R, O, I), a (R, ..., I) -> (R, ..., O)."""
    if a.dim() == 2:
        return (w @ a.unsqueeze(-1)).squeeze(-1)
    return a @ w.transpose(-1, -2)


# ---------------------------------------------------------------------------------------------
# FFN and the Neural ODE built on it
# ---------------------------------------------------------------------------------------------

class DeepNet(nn.Module):
    """``depth`` dense layers of ``width`` units, ``a_l = phi(W_l a_{l-1} + b_l)``, R draws at once.

    Args:
        weights: ``depth`` tensors, the first (R, width, in_dim), the others (R, width, width).
        biases: ``depth`` tensors (R, width).
        activation: a key of :data:`ACTIVATIONS`.
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], activation: str) -> None:
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        self.weights = nn.ParameterList([nn.Parameter(w, requires_grad=False) for w in weights])
        self.biases = nn.ParameterList([nn.Parameter(b, requires_grad=False) for b in biases])
        self.activation = activation
        self.phi = ACTIVATIONS[activation]

    @classmethod
    def random(cls, draws: int, in_dim: int, width: int, depth: int, activation: str,
               sigma_w2: float, sigma_b2: float, scaling: str, generator: torch.Generator,
               dtype: torch.dtype = torch.float64) -> DeepNet:
        dims = [in_dim] + [width] * depth
        weights = [gaussian_weights(draws, dims[i + 1], dims[i], sigma_w2, scaling, generator, dtype)
                   for i in range(depth)]
        biases = [gaussian_biases(draws, width, sigma_b2, generator, dtype) for _ in range(depth)]
        return cls(weights, biases, activation)

    @property
    def depth(self) -> int:
        return len(self.weights)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output: x (R, N, in_dim) -> ``depth`` tensors (R, N, width)."""
        out, a = [], x
        for w, b in zip(self.weights, self.biases):
            a = self.phi(_affine(w, a) + b.unsqueeze(-2))
            out.append(a)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)[-1]


class DeepNetDynamics(Dynamics):
    """``dh/dt = net(h)``: a Neural ODE whose right-hand side is a square :class:`DeepNet`
    (input width = layer width). State shape (R, N, width)."""

    def __init__(self, net: DeepNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def node_layer_trajectories(func: DeepNetDynamics, x: torch.Tensor, solver: Solver,
                            t1: float = 1.0) -> list[torch.Tensor]:
    """The Neural ODE counterpart of "the output of each layer".

    The circle ``x`` (R, N, d) is zero-padded to the state width D (the ODE starts from the
    input itself, as in Dupont et al.'s augmented ODEs) and integrated over [0, t1]; the state
    at ``t = l * t1 / L`` stands for layer ``l`` of the L-layer FFN. Returns L tensors (R, N, D).
    """
    width = func.net.weights[0].shape[-1]
    h0 = torch.cat([x, x.new_zeros(x.shape[:-1] + (width - x.shape[-1],))], dim=-1)
    depth = func.net.depth
    t = torch.linspace(0.0, t1, depth + 1, dtype=x.dtype)
    with torch.no_grad():
        hs = odesolve(func, h0, t, solver, NO_GRAD)
    return list(hs[1:])


# ---------------------------------------------------------------------------------------------
# Single-layer continuous-time cells driven by the input time series
# ---------------------------------------------------------------------------------------------

class InputSignal(nn.Module):
    """A sampled input time series, linearly interpolated: ``x(t)`` for any t in [t0, tN].

    ``times`` (N,) uniform, ``values`` (N, d). Between two samples the signal is linear, so a
    fixed-step solver whose grid is the sample grid sees a smooth input within every step.
    """

    def __init__(self, times: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("times", times)
        self.register_buffer("values", values)
        self.dt = float(times[1] - times[0])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        pos = ((t - self.times[0]) / self.dt).clamp(0.0, len(self.times) - 1.0)
        i = pos.floor().long().clamp(max=len(self.times) - 2)
        frac = pos - i
        return (1.0 - frac) * self.values[i] + frac * self.values[i + 1]


class ContinuousCell(Dynamics):
    """Base of the single-layer cells: holds ``W`` (R, k, k), ``U`` (R, k, d), ``b`` (R, k), the
    activation and the input signal; subclasses give ``dh/dt`` in terms of
    :meth:`synapse` = ``phi(W h + U x(t) + b)``. State shape (R, k)."""

    def __init__(self, w: torch.Tensor, u: torch.Tensor, b: torch.Tensor, activation: str,
                 signal: InputSignal) -> None:
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        self.w = nn.Parameter(w, requires_grad=False)
        self.u = nn.Parameter(u, requires_grad=False)
        self.b = nn.Parameter(b, requires_grad=False)
        self.activation = activation
        self.phi = ACTIVATIONS[activation]
        self.signal = signal

    @classmethod
    def random(cls, draws: int, width: int, signal: InputSignal, activation: str, sigma_w2: float,
               sigma_b2: float, scaling: str, generator: torch.Generator, tau: float = 1.0,
               dtype: torch.dtype = torch.float64) -> ContinuousCell:
        """R random cells of ``width`` units: W, U ~ N(0, sigma_w2 [/ fan-in]), b ~ N(0, sigma_b2);
        the LTC's A ~ N(0, sigma_b2) too (a bias-like vector)."""
        in_dim = signal.values.shape[-1]
        w = gaussian_weights(draws, width, width, sigma_w2, scaling, generator, dtype)
        u = gaussian_weights(draws, width, in_dim, sigma_w2, scaling, generator, dtype)
        b = gaussian_biases(draws, width, sigma_b2, generator, dtype)
        extra = cls._random_extra(draws, width, sigma_b2, generator, dtype)
        return cls(w, u, b, activation, signal, tau=tau, **extra)

    @staticmethod
    def _random_extra(draws, width, sigma_b2, generator, dtype) -> dict:
        return {}

    def synapse(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``f = phi(W h + U x(t) + b)``, shape (R, k)."""
        x = self.signal(t)
        return self.phi(_affine(self.w, h) + self.u @ x + self.b)


class NeuralODECell(ContinuousCell):
    """Neural ODE cell, ``dh/dt = phi(W h + U x(t) + b)`` (Hasani et al. 2021, eq. 1)."""

    def __init__(self, w, u, b, activation, signal, tau: float = 1.0) -> None:
        super().__init__(w, u, b, activation, signal)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.synapse(t, h)


class CTRNNCell(ContinuousCell):
    """Continuous-time RNN, ``dh/dt = -h / tau + phi(W h + U x(t) + b)`` (Funahashi and
    Nakamura 1993; Hasani et al. 2021, eq. 2)."""

    def __init__(self, w, u, b, activation, signal, tau: float = 1.0) -> None:
        super().__init__(w, u, b, activation, signal)
        self.tau = float(tau)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return -h / self.tau + self.synapse(t, h)


class LTCCell(ContinuousCell):
    """Liquid time-constant cell, ``dh/dt = -(1/tau + f) * h + f * A`` with
    ``f = phi(W h + U x(t) + b)`` (Hasani et al. 2021, eq. 3); ``A`` (R, k)."""

    def __init__(self, w, u, b, activation, signal, tau: float = 1.0,
                 a: torch.Tensor | None = None) -> None:
        super().__init__(w, u, b, activation, signal)
        self.tau = float(tau)
        self.a = nn.Parameter(a if a is not None else torch.zeros_like(b), requires_grad=False)

    @staticmethod
    def _random_extra(draws, width, sigma_b2, generator, dtype) -> dict:
        return {"a": gaussian_biases(draws, width, sigma_b2, generator, dtype)}

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        f = self.synapse(t, h)
        return -(1.0 / self.tau + f) * h + f * self.a


CELLS: dict[str, type[ContinuousCell]] = {
    "node": NeuralODECell,
    "ctrnn": CTRNNCell,
    "ltc": LTCCell,
}

# Display names, as in the seed's figures.
MODEL_NAMES = {"ffn": "FFN", "node6": "Neural ODE (6-layer f)", "node": "Neural ODE",
               "ctrnn": "CT-RNN", "ltc": "LTC"}


def cell_trajectory(cell: ContinuousCell, times: torch.Tensor, solver: Solver) -> torch.Tensor:
    """Integrate ``cell`` from ``h(0) = 0`` over ``times`` (T,) -> latent trajectory (R, T, k)."""
    draws, width = cell.b.shape
    h0 = cell.b.new_zeros(draws, width)
    with torch.no_grad():
        hs = odesolve(cell, h0, times, solver, NO_GRAD)
    return hs.transpose(0, 1)


__all__ = [
    "ACTIVATIONS",
    "CELLS",
    "MODEL_NAMES",
    "WEIGHT_SCALINGS",
    "CTRNNCell",
    "ContinuousCell",
    "DeepNet",
    "DeepNetDynamics",
    "InputSignal",
    "LTCCell",
    "NeuralODECell",
    "cell_trajectory",
    "circle",
    "gaussian_biases",
    "gaussian_weights",
    "node_layer_trajectories",
    "pca_2d",
    "trajectory_length",
]
