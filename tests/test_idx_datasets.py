"""Issue 15 item 5: one IDX reader for MNIST, Fashion-MNIST and KMNIST, with per-dataset
checksums. Small generated IDX files (20 train / 10 test images) stand in for the real ones, their
md5s registered in the table the way the real entry has them; nothing is downloaded."""

import gzip
import hashlib
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from nodebench import config as C
from nodebench import data as D
from nodebench.cli import main
from nodebench.errors import ConfigError

N_TRAIN, N_TEST = 20, 10
DATASETS = ("mnist", "fashion_mnist", "kmnist")
LOADERS = {"mnist": D.mnist, "fashion_mnist": D.fashion_mnist, "kmnist": D.kmnist}
AVAILABLE = {"mnist": D.mnist_available, "fashion_mnist": D.fashion_mnist_available,
             "kmnist": D.kmnist_available}
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "kmnist": "KMNIST"}
FIXES = {"mnist": "nodebench data mnist", "fashion_mnist": "apt-get install dataset-fashion-mnist",
         "kmnist": "codh.rois.ac.jp/kmnist"}
TABLE_1 = ("mlp", "resnet", "odenet", "rknet", "control", "anode")


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(N_TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(N_TEST, dtype=np.uint8)[::-1] % 10,
    }


def write(folder, name: str, raw: bytes, gz: bool) -> None:
    path = folder / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)


def install(folder, dataset: str, monkeypatch, gz: bool) -> dict[str, np.ndarray]:
    """Write the four fixture files into ``folder`` (all plain or all .gz) and register them in
    the table as the real entry has them: the decompressed md5 where the real one is known (not
    KMNIST's), the .gz md5 always; sizes 20/10."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = make_arrays()
    spec = D.IDX_DATASETS[dataset]
    md5, gz_md5 = {}, {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        write(folder, name, raw, gz)
        md5[name] = hashlib.md5(raw).hexdigest() if spec.md5.get(name) else None
        gz_md5[name] = hashlib.md5(gzip.compress(raw, mtime=0)).hexdigest()
    monkeypatch.setitem(D.IDX_DATASETS, dataset,
                        replace(spec, md5=md5, gz_md5=gz_md5, sizes=(N_TRAIN, N_TEST)))
    if dataset == "mnist":  # MNIST's decompressed md5s are read from MNIST_FILES
        monkeypatch.setattr(D, "MNIST_FILES", md5)
    return arrays


def assert_names_all(message: str, dataset: str, file: str, folder) -> None:
    assert re.match(rf"(cannot read )?{re.escape(TITLES[dataset])} ", message), message
    assert file in message and str(folder) in message, message
    assert FIXES[dataset] in message, message


def test_the_table_holds_the_published_checksums():
    hexmd5 = re.compile(r"[0-9a-f]{32}")
    for dataset in DATASETS:
        spec = D.idx_spec(dataset)
        assert set(spec.gz_md5) == set(D.IDX_FILES) == set(spec.md5)
        assert all(hexmd5.fullmatch(v) for v in spec.gz_md5.values())
        assert len(spec.classes) == 10 and spec.sizes == (60000, 10000)
    assert D.idx_spec("mnist").md5 == D.MNIST_FILES
    assert D.idx_spec("fashion_mnist").gz_md5["t10k-images-idx3-ubyte"] == \
        "bef4ecab320f06d8554ea6380940ec79"
    assert D.idx_spec("kmnist").gz_md5["train-images-idx3-ubyte"] == \
        "bdb82020997e1d708af4cf47b453dcf7"
    assert all(v is None for v in D.idx_spec("kmnist").md5.values())
    with pytest.raises(ConfigError, match="unknown IDX dataset 'emnist'"):
        D.idx_spec("emnist")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_each_dataset_loads_from_plain_and_gz(tmp_path, monkeypatch, dataset, gz):
    folder = tmp_path / dataset
    arrays = install(folder, dataset, monkeypatch, gz)
    AVAILABLE[dataset](folder)
    ds = LOADERS[dataset](root=str(folder))
    assert ds.name == dataset and ds.num_classes == 10
    assert ds.train_x.shape == (N_TRAIN, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (N_TEST, 1, 28, 28) and ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == torch.int64 and ds.test_y.dtype == torch.int64
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    small = LOADERS[dataset](root=str(folder), train_size=5, test_size=3, augment=False)
    assert small.train_x.shape[0] == 5 and small.test_x.shape[0] == 3 and not small.augment


@pytest.mark.parametrize("dataset,passes", [("mnist", True), ("fashion_mnist", True),
                                            ("kmnist", False)])
def test_a_recompressed_gz_passes_where_the_decompressed_md5_is_known(tmp_path, monkeypatch,
                                                                       dataset, passes):
    """Debian's Fashion-MNIST .gz files are recompressed: their bytes differ from the published
    .gz, their contents do not. KMNIST has no published decompressed md5: such a file fails."""
    folder = tmp_path / dataset
    arrays = install(folder, dataset, monkeypatch, gz=True)
    name = "train-images-idx3-ubyte"
    (folder / (name + ".gz")).write_bytes(
        gzip.compress(idx_bytes(arrays[name]), compresslevel=1, mtime=12345))
    if passes:
        assert LOADERS[dataset](root=str(folder)).train_x.shape == (N_TRAIN, 1, 28, 28)
    else:
        with pytest.raises(ConfigError, match="fails its md5 check") as info:
            LOADERS[dataset](root=str(folder))
        assert_names_all(str(info.value), dataset, name, folder)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_a_corrupted_file_names_the_dataset_the_file_and_the_fix(tmp_path, monkeypatch,
                                                                  dataset, gz):
    folder = tmp_path / dataset
    arrays = install(folder, dataset, monkeypatch, gz)
    name = "t10k-labels-idx1-ubyte"
    labels = arrays[name].copy()
    labels[0] = 12   # not a class: caught by the md5s, or by the header check (plain KMNIST)
    write(folder, name, idx_bytes(labels), gz)
    with pytest.raises(ConfigError) as info:
        LOADERS[dataset](root=str(folder))
    message = str(info.value)
    assert_names_all(message, dataset, name, folder)
    assert "label 12" in message if (dataset, gz) == ("kmnist", False) else "md5" in message


@pytest.mark.parametrize("content,problem", [
    (lambda a: b"\x00\x00\x08\x01" + idx_bytes(a)[4:], "magic number 00000803"),
    (lambda a: idx_bytes(a[:, :27, :]), "shape (20, 27, 28), expected (20, 28, 28)"),
    (lambda a: idx_bytes(a)[:-1], "15679 data bytes, expected 15680"),
], ids=["magic", "shape", "short"])
def test_a_plain_kmnist_file_is_checked_by_its_header(tmp_path, monkeypatch, content, problem):
    folder = tmp_path / "kmnist"
    arrays = install(folder, "kmnist", monkeypatch, gz=False)
    name = "train-images-idx3-ubyte"
    (folder / name).write_bytes(content(arrays[name]))
    with pytest.raises(ConfigError, match="is not the expected IDX file") as info:
        D.kmnist(root=str(folder))
    assert problem in str(info.value)
    assert_names_all(str(info.value), "kmnist", name, folder)


def test_a_truncated_gz_names_the_dataset_the_file_and_the_fix(tmp_path, monkeypatch):
    folder = tmp_path / "fashion_mnist"
    install(folder, "fashion_mnist", monkeypatch, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="truncated or corrupt") as info:
        D.fashion_mnist(root=str(folder))
    assert_names_all(str(info.value), "fashion_mnist", "train-images-idx3-ubyte.gz", folder)


@pytest.mark.parametrize("dataset", DATASETS)
def test_a_missing_file_names_the_dataset_the_file_and_the_fix(tmp_path, monkeypatch, dataset):
    folder = tmp_path / dataset
    install(folder, dataset, monkeypatch, gz=True)
    name = "train-labels-idx1-ubyte"
    (folder / (name + ".gz")).unlink()
    with pytest.raises(ConfigError, match="incomplete") as info:
        LOADERS[dataset](root=str(folder))
    assert_names_all(str(info.value), dataset, name, folder)
    with pytest.raises(ConfigError, match="not found in") as info:
        AVAILABLE[dataset](folder)
    assert_names_all(str(info.value), dataset, name, folder)
    with pytest.raises(ConfigError, match="no folder") as info:
        LOADERS[dataset](root=str(tmp_path / "nowhere"))
    assert TITLES[dataset] in str(info.value) and FIXES[dataset] in str(info.value)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "kmnist"])
def test_configs_compose_with_every_table_1_model(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("NODEBENCH_DATA", str(tmp_path / "no-data"))
    cfg = C.compose([f"dataset={dataset}"])
    node = cfg.dataset
    assert node.name == dataset and node._target_ == f"nodebench.data.{dataset}"
    assert node.check == f"nodebench.data.{dataset}_available"
    assert node.root.endswith(f"/{dataset}")
    assert dict(node.shape) == {"channels": 1, "size": 28, "classes": 10}
    for model in TABLE_1:
        C.validate(C.compose([f"dataset={dataset}", f"model={model}"]), check_files=False)
    with pytest.raises(ConfigError, match=f"{TITLES[dataset]} not found in"):
        C.validate(cfg)  # the files are not there


TRAIN = ["model=mlp", "trainer.epochs=1", "trainer.batch_size=10", "trainer.eval_batch_size=10",
         "trainer.progress=false"]


def test_missing_fashion_mnist_is_one_error_line(runs_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NODEBENCH_DATA", str(tmp_path / "data"))
    code = main(["train", "dataset=fashion_mnist", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nodebench: error:"), err
    assert "Fashion-MNIST not found in" in err[0] and FIXES["fashion_mnist"] in err[0]
    assert not any(runs_dir.rglob("summary.json"))


def test_train_runs_on_fashion_mnist_files(runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NODEBENCH_DATA", str(tmp_path / "data"))
    install(tmp_path / "data" / "fashion_mnist", "fashion_mnist", monkeypatch, gz=True)
    assert main(["train", "dataset=fashion_mnist", *TRAIN]) == 0
    assert any(runs_dir.rglob("summary.json"))
