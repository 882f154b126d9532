"""Toy tasks and models of Dupont, Doucet, Teh (2019), *Augmented Neural ODEs*, Sections 3-4.

Datasets (float32 tensors in memory, no files):

* :func:`g_1d`: the map g(-1) = 1, g(1) = -1 (Section 3, Figure 1). A Neural ODE flow is a
  homeomorphism and, in 1-D, order-preserving: trajectories cannot cross, so it cannot represent g.
* :func:`annulus`: the concentric "spheres" in d dimensions (Section 3, Figure 3): target -1 for
  |x| <= r1, +1 for r2 <= |x| <= r3. With ``hold_out_wedge`` the points whose polar angle lies in
  the wedge [a, b] are removed from training and kept as the test set (generalisation test).

Models (:data:`TOY_MODELS`), all mapping (N, d) inputs to (N, 1) outputs:

* ``node``: h(1) of dh/dt = f(t, h), h(0) = x; f: (d + 1) -> 32 -> 32 -> d, ReLU, t concatenated.
* ``anode1``/``anode2``/``anode5``: the same on the state [x, 0] in R^{d + p} (Section 4).
* ``resnet``: residual blocks x + MLP(x) in data space (hidden 32), the discrete baseline whose
  "trajectories" can cross.

Every model ends with a readout from its features: ``linear`` (the paper's Linear(d + p, 1)) or
``first`` (the first coordinate of h(1), no parameters: used for g_1d, where a learned linear
readout with a negative weight would solve the task for any model and hide the claim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .models.blocks import Dynamics, ODEBlock
from .solvers import Gradient, Solver, odesolve

# ------------------------------------------------------------------------------------ datasets


@dataclass
class ToyData:
    """A regression task with a scalar target in {-1, +1}.

    ``x``: (N, d) float32 inputs; ``y``: (N, 1) float32 targets; ``test_x``/``test_y`` the same
    for evaluation (a fresh sample, or the held-out wedge).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def batches(self, batch_size: int, generator: torch.Generator):
        """Shuffled minibatches (x, y); the last one may be smaller."""
        order = torch.randperm(self.x.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield self.x[idx], self.y[idx]


def g_1d(num_points: int = 1000, noise: float = 0.0, seed: int = 0) -> ToyData:
    """g(-1) = 1 and g(1) = -1 (Dupont et al. 2019, Section 3): half the points at -1, half at 1.

    ``noise``: standard deviation of Gaussian noise added to the inputs (0 = the exact task).
    The test set is the two points -1 and 1.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(num_points, 1)
    x[: num_points // 2] = -1.0
    y = -x.clone()
    x = x + noise * torch.randn(x.shape, generator=g)
    test_x = torch.tensor([[-1.0], [1.0]])
    return ToyData("g_1d", x, y, test_x, -test_x)


def sample_shell(n: int, dim: int, r_min: float, r_max: float,
                 generator: torch.Generator) -> torch.Tensor:
    """n points (n, dim) with radius (r_max - r_min) U^(1/dim) + r_min and a uniform direction.

    This is the authors' sampler (uniform in the ball when r_min = 0; denser near r_min otherwise).
    """
    u = torch.rand(n, 1, generator=generator)
    radius = (r_max - r_min) * u.pow(1.0 / dim) + r_min
    direction = torch.randn(n, dim, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True)
    return radius * direction


def polar_angle(x: torch.Tensor) -> torch.Tensor:
    """Angle of the first two coordinates in [0, 2 pi), shape (N,)."""
    return torch.remainder(torch.atan2(x[:, 1], x[:, 0]), 2 * math.pi)


def annulus(dim: int = 2, num_inner: int = 1000, num_outer: int = 2000,
            inner_radius: float = 0.5, outer_radii: tuple[float, float] = (1.0, 1.5),
            hold_out_wedge: tuple[float, float] | None = None, seed: int = 0) -> ToyData:
    """Concentric spheres (Dupont et al. 2019, Section 3): -1 inside |x| <= inner_radius,
    +1 for outer_radii[0] <= |x| <= outer_radii[1]; 1000 inner and 2000 outer points.

    ``hold_out_wedge = (a, b)`` (radians): points whose polar angle is in [a, b] form the test set
    and are removed from training (the paper's generalisation test uses (0, pi/5)). Without it
    the test set is a fresh sample of the same size (seed + 1).
    """
    def sample(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(s)
        inner = sample_shell(num_inner, dim, 0.0, inner_radius, g)
        outer = sample_shell(num_outer, dim, outer_radii[0], outer_radii[1], g)
        x = torch.cat([inner, outer])
        y = torch.cat([-torch.ones(num_inner, 1), torch.ones(num_outer, 1)])
        return x, y

    x, y = sample(seed)
    if hold_out_wedge is None:
        tx, ty = sample(seed + 1)
        return ToyData("annulus", x, y, tx, ty)
    angle = polar_angle(x)
    held = (angle >= hold_out_wedge[0]) & (angle <= hold_out_wedge[1])
    return ToyData("annulus_wedge", x[~held], y[~held], x[held], y[held])


def annulus_wedge(wedge: tuple[float, float] = (0.0, math.pi / 5), **kwargs) -> ToyData:
    """The annulus with the wedge of angles [0, pi/5] held out of training (the test set)."""
    return annulus(hold_out_wedge=wedge, **kwargs)


def _rings(n: int, noise: float, inner_radius: float, outer_radius: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n // 2 points on the outer circle (target +1), the rest on the inner one (target -1),
    uniform angles, Gaussian noise of standard deviation ``noise`` on both coordinates."""
    n_outer = n // 2
    radius = torch.cat([torch.full((n_outer, 1), outer_radius),
                        torch.full((n - n_outer, 1), inner_radius)])
    angle = 2 * math.pi * torch.rand(n, 1, generator=generator)
    x = radius * torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    x = x + noise * torch.randn(x.shape, generator=generator)
    y = torch.cat([torch.ones(n_outer, 1), -torch.ones(n - n_outer, 1)])
    return x, y


def rings_wedge(dim: int = 2, num_points: int = 1000, num_test_points: int = 1000,
                noise: float = 0.05, inner_radius: float = 0.5, outer_radius: float = 1.0,
                hold_out_wedge: tuple[float, float] = (0.0, math.pi / 5),
                seed: int = 0) -> ToyData:
    """Two thin noisy circles (radius ``outer_radius``, target +1; ``inner_radius``, target -1;
    Gaussian noise ``noise``), the geometry of the independent ANODE replication's held-out-slice
    test (VanniLeonardo/re-augmented-neural-odes, scripts/train_anode_slice_circles.py: 1,000
    points, factor 0.5, noise 0.05, the slice [0, pi/5]) rather than Dupont et al.'s filled disk
    and annulus. The training set is a sample of ``num_points`` less the points whose polar angle
    lies in ``hold_out_wedge``; the test set is the wedge of an independent sample of
    ``num_test_points`` (seed + 10000, as there). Inputs (N, 2), targets (N, 1).

    Raises ValueError for ``dim`` other than 2 or an empty wedge.
    """
    if dim != 2:
        raise ValueError(f"rings_wedge is 2-D (dim=2), not dim={dim}")
    x, y = _rings(num_points, noise, inner_radius, outer_radius,
                  torch.Generator().manual_seed(seed))
    tx, ty = _rings(num_test_points, noise, inner_radius, outer_radius,
                    torch.Generator().manual_seed(seed + 10_000))
    a, b = hold_out_wedge
    held = (polar_angle(x) >= a) & (polar_angle(x) <= b)
    test = (polar_angle(tx) >= a) & (polar_angle(tx) <= b)
    if not test.any():
        raise ValueError(f"the wedge [{a}, {b}] holds no test point")
    return ToyData("rings_wedge", x[~held], y[~held], tx[test], ty[test])


TOY_DATASETS = {"g_1d": g_1d, "annulus": annulus, "annulus_wedge": annulus_wedge,
                "rings_wedge": rings_wedge}

# -------------------------------------------------------------------------------------- models


class ToyField(Dynamics):
    """f(t, h): Linear(D + 1, H) - ReLU - Linear(H, H) - ReLU - Linear(H, D), t concatenated.

    D = d + p (data plus augmented dimensions), H = ``hidden`` (32 in the paper). State (N, D).
    """

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        tt = t.to(h.dtype).reshape(1, 1).expand(h.shape[0], 1)
        return self.net(torch.cat([tt, h], dim=1))


class FirstCoordinate(nn.Module):
    """Readout without parameters: the first feature, (N, D) -> (N, 1)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, :1]


READOUTS = {"linear": lambda dim: nn.Linear(dim, 1), "first": lambda dim: FirstCoordinate()}


class ToyODE(nn.Module):
    """NODE (``augment_dim`` = 0) or ANODE (p = ``augment_dim`` > 0) with a scalar readout.

    ``features(x)``: h(1) in R^{d + p}, (N, d + p); ``forward(x)``: readout, (N, 1).
    """

    def __init__(self, data_dim: int, solver: Solver, gradient: Gradient, augment_dim: int = 0,
                 hidden: int = 32, readout: str = "linear") -> None:
        super().__init__()
        self.augment_dim = augment_dim
        self.block = ODEBlock(ToyField(data_dim + augment_dim, hidden), solver, gradient,
                              augment_dim=augment_dim)
        self.readout = READOUTS[readout](data_dim + augment_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))

    def trajectory(self, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """h(t) at ``times`` (T,), shape (T, N, d + p); for pictures (no gradients needed)."""
        h0 = torch.cat([x, x.new_zeros(x.shape[0], self.augment_dim)], dim=1)
        return odesolve(self.block.func, h0, times, self.block.solver, Gradient("direct"))


class ToyResNet(nn.Module):
    """ResNet in data space: ``blocks`` x [h + Linear(d, H) - ReLU - Linear(H, d)], then readout.

    The discrete baseline of Section 4 (hidden H = 32, 5 blocks); it takes no solver.
    """

    def __init__(self, data_dim: int, hidden: int = 32, blocks: int = 5,
                 readout: str = "linear", **_: object) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(data_dim, hidden), nn.ReLU(), nn.Linear(hidden, data_dim))
            for _ in range(blocks))
        self.readout = READOUTS[readout](data_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))

    def trajectory(self, x: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden state after each block, (blocks + 1, N, d)."""
        states = [x]
        for block in self.blocks:
            states.append(states[-1] + block(states[-1]))
        return torch.stack(states)


# name -> builder(data_dim, solver=, gradient=, hidden=, readout=)
TOY_MODELS = {
    "node": partial(ToyODE, augment_dim=0),
    "anode1": partial(ToyODE, augment_dim=1),
    "anode2": partial(ToyODE, augment_dim=2),
    "anode5": partial(ToyODE, augment_dim=5),
    "resnet": ToyResNet,
}

__all__ = [
    "READOUTS",
    "TOY_DATASETS",
    "TOY_MODELS",
    "ToyData",
    "ToyField",
    "ToyODE",
    "ToyResNet",
    "annulus",
    "annulus_wedge",
    "g_1d",
    "polar_angle",
    "sample_shell",
]
