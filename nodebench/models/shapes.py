"""The Neural ODE image classifier of seed 004 (Ul Ala 2021, section 3), built by Hydra from
``conf/model/shapes_odenet.yaml``.

The seed repurposes Honchar's (2019) PyTorch Neural ODE MNIST classifier: the downsampling stem of
Chen et al.'s ODE-Net (conv3x3 -> GN-ReLU -> conv4x4/2 -> GN-ReLU -> conv4x4/2, 64 channels),
one ODE block on [0, 1] whose dynamics are conv3x3(t-channel) -> ReLU -> GN -> conv3x3(t-channel)
-> ReLU -> GN (no biases), then GN -> global average pooling -> linear. Honchar's fixed-step solver
uses steps of at most 0.05 (``h_max``), the seed's "step size of 0.05"; its gradients come from
the adjoint method (seed section 2.3), hence ``gradient: adjoint``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..solvers import Gradient, Solver
from .blocks import Dynamics, ODEBlock
from .classifiers import _stem


def pair_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 2 channels per group: Honchar's GroupNorm(32, 64) at width 64, and the same
    group size at other widths. With 1 channel per group (nodebench's ``group_norm`` below 64
    channels) the head's GroupNorm makes every channel's map zero-mean, the global average pool
    then returns the affine bias alone, and the classifier cannot see its input (measured: loss
    stuck at ln(classes) at width 16)."""
    return nn.GroupNorm(max(1, channels // 2), channels)


class TimeConv(nn.Module):
    """conv3x3 without bias on the state with the time ``t`` appended as one constant channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, 1, 1, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, torch.ones_like(x[:, :1]) * t], dim=1))


class ShapesODEFunc(Dynamics):
    """f(t, y) = GN(ReLU(conv_t(GN(ReLU(conv_t(y)))))) on a (B, C, H, W) state (Honchar's
    ConvODEF; note ReLU before GroupNorm, unlike Chen et al.'s GN-ReLU-conv order)."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv1 = TimeConv(channels)
        self.norm1 = pair_norm(channels)
        self.conv2 = TimeConv(channels)
        self.norm2 = pair_norm(channels)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm1(torch.relu(self.conv1(t, y)))
        return self.norm2(torch.relu(self.conv2(t, h)))


def shapes_odenet(solver: Solver, gradient: Gradient, in_channels: int = 1, image_size: int = 28,
                  num_classes: int = 3, width: int = 64, t1: float = 1.0) -> nn.Module:
    """Seed 004's classifier: images (B, C, S, S) in [0, 1] -> logits (B, num_classes).

    With 28x28 inputs the ODE state is (B, width, 6, 6). Parameters for width 64, 1 channel,
    3 classes: stem 132,096 + dynamics 75,136 + head 323 (GN 128, linear 195) = 207,555 (asserted in tests).
    """
    block = ODEBlock(ShapesODEFunc(width), solver, gradient, t1=t1)
    head = nn.Sequential(pair_norm(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
    return nn.Sequential(_stem("conv", in_channels, width), block, head)
