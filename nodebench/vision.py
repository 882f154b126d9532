"""CIFAR-10, CIFAR-100 and SVHN through torchvision, as :class:`nodebench.data.TensorDataset`
(uint8 NCHW, 3 x 32 x 32).

Used by the ANODE image table (Dupont et al. 2019, Section 5: CIFAR-10 and SVHN, 10 classes);
CIFAR-100 (100 fine labels) for the image models at large. Each needs the dataset files in
``root`` or internet (``download: true``). With
``fake: true`` torchvision's ``FakeData`` of the same shapes stands in (random images and labels,
nothing is read or downloaded): for tests and for machines without the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import TensorDataset, _subset
from .errors import ConfigError

SHAPE = (3, 32, 32)


def _fake(name: str, train_size: int | None, test_size: int | None, seed: int,
          classes: int = 10) -> TensorDataset:
    """FakeData images (random, deterministic given ``seed``) of shape 3 x 32 x 32, labels in
    [0, classes)."""
    from torchvision.datasets import FakeData
    from torchvision.transforms import PILToTensor

    def make(n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        ds = FakeData(size=n, image_size=SHAPE, num_classes=classes, transform=PILToTensor(),
                      random_offset=seed + offset)
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)

    tx, ty = make(train_size or 256, 0)
    vx, vy = make(test_size or 128, 10_000_000)
    return TensorDataset(name, tx, ty, vx, vy, num_classes=classes)


def _load(factory, name: str, root: str, download: bool, splits: tuple[dict, dict]):
    try:
        return [factory(root, download=download, **split) for split in splits]
    except (RuntimeError, OSError) as exc:  # "Dataset not found or corrupted", or no network
        raise ConfigError(f"{name} not found in {root} ({str(exc).splitlines()[0]}); set "
                          f"dataset.download=true on a machine with internet, or use "
                          f"dataset={name}_fake") from None


def _to_tensors(images: np.ndarray, labels, channels_last: bool):
    x = torch.from_numpy(np.ascontiguousarray(images))
    if channels_last:
        x = x.permute(0, 3, 1, 2).contiguous()
    return x.to(torch.uint8), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def _cifar(name: str, classes: int, root: str, download: bool, fake: bool,
           train_size: int | None, test_size: int | None, subset_seed: int,
           augment: bool) -> TensorDataset:
    """CIFAR-10 or CIFAR-100 (torchvision's python version in ``root``; ``name`` is the dataset
    and torchvision class, ``classes`` its label count); ``fake`` uses FakeData instead."""
    if fake:
        return _fake(f"{name}_fake", train_size, test_size, subset_seed, classes=classes)
    import torchvision.datasets

    factory = getattr(torchvision.datasets, name.upper())
    if download:
        Path(root).mkdir(parents=True, exist_ok=True)
    train, test = _load(factory, name, root, download, ({"train": True}, {"train": False}))
    tx, ty = _to_tensors(train.data, train.targets, channels_last=True)
    vx, vy = _to_tensors(test.data, test.targets, channels_last=True)
    tx, ty = _subset(tx, ty, train_size, subset_seed)
    vx, vy = _subset(vx, vy, test_size, subset_seed + 1)
    return TensorDataset(name, tx, ty, vx, vy, num_classes=classes, augment=augment)


def cifar10(root: str = "data/cifar10", download: bool = False, fake: bool = False,
            train_size: int | None = None, test_size: int | None = None, subset_seed: int = 0,
            augment: bool = False, **_: object) -> TensorDataset:
    """CIFAR-10, 50k/10k (torchvision's python version in ``root``); ``fake`` uses FakeData."""
    return _cifar("cifar10", 10, root, download, fake, train_size, test_size, subset_seed,
                  augment)


def cifar100(root: str = "data/cifar100", download: bool = False, fake: bool = False,
             train_size: int | None = None, test_size: int | None = None, subset_seed: int = 0,
             augment: bool = False, **_: object) -> TensorDataset:
    """CIFAR-100, 50k/10k, the 100 fine labels (torchvision's python version in ``root``);
    ``fake`` uses FakeData with 100 classes. Raises ConfigError when the files are missing."""
    return _cifar("cifar100", 100, root, download, fake, train_size, test_size, subset_seed,
                  augment)


def svhn(root: str = "data/svhn", download: bool = False, fake: bool = False,
         train_size: int | None = None, test_size: int | None = None, subset_seed: int = 0,
         augment: bool = False, **_: object) -> TensorDataset:
    """SVHN, 73,257 train / 26,032 test (the 'extra' split unused); ``fake`` uses FakeData."""
    if fake:
        return _fake("svhn_fake", train_size, test_size, subset_seed)
    from torchvision.datasets import SVHN

    if download:
        Path(root).mkdir(parents=True, exist_ok=True)
    train, test = _load(SVHN, "svhn", root, download, ({"split": "train"}, {"split": "test"}))
    tx, ty = _to_tensors(train.data, train.labels, channels_last=False)
    vx, vy = _to_tensors(test.data, test.labels, channels_last=False)
    tx, ty = _subset(tx, ty, train_size, subset_seed)
    vx, vy = _subset(vx, vy, test_size, subset_seed + 1)
    return TensorDataset("svhn", tx, ty, vx, vy, num_classes=10, augment=augment)


__all__ = ["cifar10", "cifar100", "svhn"]
