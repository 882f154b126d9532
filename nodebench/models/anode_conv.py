"""The image classifier of Dupont, Doucet, Teh (2019), *Augmented Neural ODEs*, Section 5.

No stem: the image (B, C, H, W) is zero-padded with p extra channels (p = 0: NODE), one ODE block
integrates dh/dt = f(t, h) over [0, 1] on the (B, C + p, H, W) state, and a linear layer reads the
flattened h(1) out: (C + p) H W -> classes. The dynamics are

    Conv1x1(C + p -> F) - ReLU - Conv3x3 pad 1 (F -> F) - ReLU - Conv1x1(F -> C + p)

with, when ``time_dependent``, t appended to every convolution's input as a constant channel.

Parameter counts (reference.md section 2; asserted in tests/test_anode.py):

=============================  ============  ============
setup                          no time       with time
=============================  ============  ============
MNIST NODE, F = 92             84,395        85,316
MNIST ANODE, F = 64, p = 5     84,816        85,462
CIFAR-10 NODE, F = 125         172,358       173,611
CIFAR-10 ANODE, F = 64, p = 10 171,799       172,452
=============================  ============  ============
"""

from __future__ import annotations

import torch
from torch import nn

from ..solvers import Gradient, Solver
from .blocks import ConcatConv2d, Dynamics, ODEBlock


def _conv(c_in: int, c_out: int, kernel: int, time_dependent: bool) -> nn.Module:
    """A stride-1 'same' convolution; with ``time_dependent`` t is one more input channel."""
    if time_dependent:
        return ConcatConv2d(c_in, c_out, kernel, padding=kernel // 2)
    return _TimeFreeConv(c_in, c_out, kernel)


class _TimeFreeConv(nn.Module):
    """``nn.Conv2d`` with the (t, x) call signature of :class:`ConcatConv2d`; t is ignored."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, 1, kernel // 2)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AnodeConvFunc(Dynamics):
    """f(t, h) = Conv1x1(ReLU(Conv3x3(ReLU(Conv1x1(h))))) on a (B, channels, H, W) state."""

    def __init__(self, channels: int, filters: int, time_dependent: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv(channels, filters, 1, time_dependent)
        self.conv2 = _conv(filters, filters, 3, time_dependent)
        self.conv3 = _conv(filters, channels, 1, time_dependent)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(t, h))
        out = torch.relu(self.conv2(t, out))
        return self.conv3(t, out)


class AnodeConvNet(nn.Module):
    """Zero-pad p channels, ODE block over [0, t1], flatten, Linear to classes: (B, C, H, W) -> (B, K)."""

    def __init__(self, solver: Solver, gradient: Gradient, in_channels: int, image_size: int,
                 num_classes: int, filters: int, augment_dim: int = 0,
                 time_dependent: bool = False, t1: float = 1.0) -> None:
        super().__init__()
        channels = in_channels + augment_dim
        func = AnodeConvFunc(channels, filters, time_dependent)
        self.odeblock = ODEBlock(func, solver, gradient, t1=t1, augment_dim=augment_dim)
        self.readout = nn.Linear(channels * image_size * image_size, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """h(1), shape (B, C + p, H, W)."""
        return self.odeblock(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x).flatten(1))


def anode_conv(solver: Solver, gradient: Gradient, in_channels: int = 1, image_size: int = 28,
               num_classes: int = 10, filters: int = 64, augment_dim: int = 5,
               time_dependent: bool = False, t1: float = 1.0) -> AnodeConvNet:
    """Builder for ``conf/model/{node_conv,anode_conv}.yaml`` (NODE is ``augment_dim=0``).

    Args:
        filters: F, the width of the dynamics (92 / 125 for NODE on MNIST / CIFAR-10; 64 for ANODE).
        augment_dim: p, zero channels appended to the image (5 on MNIST, 10 on CIFAR-10 / SVHN).
        time_dependent: append t as an input channel of every convolution (the paper's parameter
            counts match ``False``; which variant it trained is unconfirmed).
    """
    return AnodeConvNet(solver, gradient, in_channels, image_size, num_classes, filters,
                        augment_dim, time_dependent, t1)


__all__ = ["AnodeConvFunc", "AnodeConvNet", "anode_conv"]
