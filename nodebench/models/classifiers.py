"""Table 1 classifiers (Chen et al. 2018), built by Hydra from ``conf/model/*.yaml``.

Every builder takes the dataset's shape (``in_channels``, ``image_size``, ``num_classes``) and
returns an ``nn.Module`` mapping images (B, C, H, W) in [0, 1] to logits (B, num_classes).
Parameter counts on MNIST (exact, asserted in tests/test_models.py): mlp 238,510;
resnet 576,778 (res stem 601,482); odenet/rknet 208,266 (res stem 232,970).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..regularisers import Penalties
from ..solvers import Gradient, Solver
from .blocks import ConvODEFunc, ODEBlock, ResBlock, group_norm

STEMS = ("conv", "res")


def make_penalties(node: dict[str, Any] | Penalties | None) -> Penalties | None:
    """``model.penalties`` as :class:`~nodebench.regularisers.Penalties` (None: none).

    Raises ConfigError for an unknown key or a bad value (negative weight, order, noise)."""
    if node is None or isinstance(node, Penalties):
        return node
    if not isinstance(node, dict):
        raise ConfigError(f"model.penalties must be a mapping, got {node!r}")
    known = {"kinetic", "frobenius", "taylor", "order", "noise"}
    unknown = sorted(set(node) - known)
    if unknown:
        raise ConfigError(f"unknown model.penalties key(s) {', '.join(unknown)}; "
                          f"choose from: {', '.join(sorted(known))}")
    return Penalties(**node)


def mlp(in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
        hidden: int = 300) -> nn.Module:
    """The 1-layer MLP of Table 1 (LeCun et al. 1998): 784-300-10, ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


def _stem(kind: str, in_channels: int, width: int) -> nn.Sequential:
    """Downsampling stem: 28x28 -> 6x6 (conv) or 7x7 (res) feature maps of ``width`` channels."""
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1), group_norm(width), nn.ReLU(),
            nn.Conv2d(width, width, 4, 2, 1), group_norm(width), nn.ReLU(),
            nn.Conv2d(width, width, 4, 2, 1))
    if kind == "res":
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1),
                             ResBlock(width, stride=2), ResBlock(width, stride=2))
    raise ConfigError(f"unknown stem {kind!r}; choose one of: {', '.join(STEMS)}")


def _head(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(group_norm(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def resnet(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, stem: str = "conv",
           width: int = 64, blocks: int = 6) -> nn.Module:
    """ResNet of Table 1: stem, ``blocks`` pre-activation ResBlocks, GroupNorm head."""
    if blocks < 0:
        raise ConfigError(f"model.blocks must be >= 0, got {blocks}")
    return nn.Sequential(_stem(stem, in_channels, width),
                         *[ResBlock(width) for _ in range(blocks)], _head(width, num_classes))


def odenet(solver: Solver, gradient: Gradient, in_channels: int = 1, image_size: int = 28,
           num_classes: int = 10, stem: str = "conv", width: int = 64, t1: float = 1.0,
           augment_dim: int = 0, penalties: dict[str, Any] | Penalties | None = None
           ) -> nn.Module:
    """ODE-Net / RK-Net / ANODE: stem, one ODE block over [0, t1], head.

    ODE-Net and RK-Net differ only in ``gradient.mode`` (adjoint vs direct); ANODE appends
    ``augment_dim`` zero channels to the state (Dupont et al. 2019). ``penalties``
    (``model.penalties``: kinetic, frobenius, taylor weights, order, noise; see
    :class:`nodebench.regularisers.Penalties`): RNODE / TayNODE penalties integrated along the
    training solves and added to the loss by the trainer; all weights zero (the default) is the
    plain model.
    """
    if augment_dim < 0:
        raise ConfigError(f"model.augment_dim must be >= 0, got {augment_dim}")
    state = width + augment_dim
    block = ODEBlock(ConvODEFunc(state), solver, gradient, t1=t1, augment_dim=augment_dim,
                     penalties=make_penalties(penalties))
    return nn.Sequential(_stem(stem, in_channels, width), block, _head(state, num_classes))
