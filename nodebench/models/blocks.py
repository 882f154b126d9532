"""Building blocks: GroupNorm, pre-activation ResBlocks, and the ODE block with its dynamics."""

from __future__ import annotations

import torch
from torch import nn

from ..regularisers import Penalties, Regularised, solve_with_penalties
from ..solvers import Gradient, Solver, check_compatible, odesolve


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, C) groups, as in torchdiffeq's MNIST example.

    When C is not divisible by that (an augmented state, e.g. 64 + 5 channels), the largest
    divisor of C not above 32 is used instead.
    """
    groups = min(32, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block: GN-ReLU-conv3x3-GN-ReLU-conv3x3 (no biases) + shortcut.

    With ``stride`` 2 the shortcut is a 1x1 stride-2 convolution of the pre-activated input.
    """

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.norm2 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.downsample = (nn.Conv2d(channels, channels, 1, stride, bias=False)
                           if stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(x))
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.norm2(out)))
        return out + shortcut


class Dynamics(nn.Module):
    """Base class of every ODE right-hand side ``f(t, y)``.

    Instruments find dynamics with ``isinstance(m, Dynamics)`` and count each call as one
    function evaluation (NFE), including the calls of the adjoint's backward solve.
    """

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ConcatConv2d(nn.Module):
    """A convolution whose input gets the time ``t`` appended as one constant channel."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, kernel, 1, padding)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([tt, x], dim=1))


class ConvODEFunc(Dynamics):
    """ODE-Net dynamics of Chen et al. 2018 (torchdiffeq's MNIST example):
    GN-ReLU-ConcatConv3x3-GN-ReLU-ConcatConv3x3-GN on a (B, C, H, W) state."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = group_norm(channels)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.conv1(t, torch.relu(self.norm1(y)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ODEBlock(nn.Module):
    """Maps ``x`` to ``y(t1)`` where ``dy/dt = f(t, y)``, ``y(0) = x``.

    Args:
        func: the dynamics.
        solver: numerics of the solve (:class:`nodebench.solvers.Solver`).
        gradient: how gradients are taken (:class:`nodebench.solvers.Gradient`).
        t1: end of the integration interval [0, t1].
        augment_dim: zero channels appended to the state before solving (ANODE, Dupont et al.
            2019); ``func`` must then act on ``C + augment_dim`` channels.
        penalties: RNODE / TayNODE penalties (:class:`nodebench.regularisers.Penalties`). When
            one weight is positive, a forward pass in training mode integrates them along the
            solve (:func:`nodebench.regularisers.solve_with_penalties`, same solver and gradient
            mode) and leaves ``self.pending_penalties = (term, values)``: ``term`` the weighted
            scalar to add to the loss, ``values`` the batch means by name (collected and reset by
            :func:`nodebench.regularisers.take_penalties`). In eval mode the block solves
            plainly. None or all weights zero: the plain block, nothing stored.

    NFE: the penalised solve calls ``func`` once per evaluation (through
    :class:`~nodebench.regularisers.Regularised`, which is not a Dynamics), so the counters
    count the solver's evaluations as without penalties. The wrapper is not a registered
    submodule: parameters, ``state_dict`` keys and module lists are those of the plain block.
    """

    def __init__(self, func: Dynamics, solver: Solver, gradient: Gradient, t1: float = 1.0,
                 augment_dim: int = 0, penalties: Penalties | None = None) -> None:
        super().__init__()
        check_compatible(solver, gradient)
        self.func = func
        self.solver = solver
        self.gradient = gradient
        self.augment_dim = augment_dim
        self.register_buffer("t", torch.tensor([0.0, float(t1)]), persistent=False)
        self.penalties = penalties if penalties is not None and penalties.active else None
        self.pending_penalties: tuple[torch.Tensor, dict[str, float]] | None = None
        # kept out of the module tree (a plain attribute), so that func is registered once
        self.__dict__["_regularised"] = (Regularised(func, self.penalties)
                                         if self.penalties is not None else None)

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        """``y(0)`` for the input ``x`` (B, C, ...): ``x`` with ``augment_dim`` zero channels
        appended, (B, C + augment_dim, ...)."""
        if self.augment_dim:
            pad = x.new_zeros((x.shape[0], self.augment_dim) + tuple(x.shape[2:]))
            x = torch.cat([x, pad], dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.initial_state(x)
        t = self.t.to(x.dtype)
        reg = self.__dict__.get("_regularised")
        if reg is not None and self.training:
            if reg.inner is not self.func:  # func replaced after construction
                reg = Regularised(self.func, self.penalties)
                self.__dict__["_regularised"] = reg
            y, r = solve_with_penalties(reg, x, t, self.solver, self.gradient)
            values = r[-1]
            self.pending_penalties = (self.penalties.weighted(values),
                                      self.penalties.as_dict(values))
            return y[-1]
        return odesolve(self.func, x, t, self.solver, self.gradient)[-1]

    def drop_penalties(self) -> None:
        """Make this block the plain one (no penalties integrated, nothing pending): the
        gradient-error reference (:func:`nodebench.validity.reference_model`) solves plainly."""
        self.penalties = None
        self.pending_penalties = None
        self.__dict__["_regularised"] = None

    def extra_repr(self) -> str:
        text = f"solver={self.solver.describe()}, gradient={self.gradient.describe()}, " \
               f"t1={float(self.t[-1]):g}, augment_dim={self.augment_dim}"
        if self.penalties is not None:
            text += f", penalties=({self.__dict__['_regularised'].extra_repr()})"
        return text


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ConcatConv2d", "ConvODEFunc", "Dynamics", "ODEBlock", "ResBlock", "count_parameters",
           "group_norm"]
