"""Loaders against tiny files written here in each dataset's official format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from backproplab.data import DataNotFoundError, load_dataset, read_idx


def _write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader(tmp_path, name, gz):
    rng = np.random.default_rng(0)
    folder = tmp_path / name
    folder.mkdir()
    x, y = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)
    xt, yt = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    for stem, arr in [("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y),
                      ("t10k-images-idx3-ubyte", xt), ("t10k-labels-idx1-ubyte", yt)]:
        _write_idx(folder / stem, arr, gz)
    d = load_dataset(name, root=tmp_path)
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.num_classes == 10 and d.x_train.dtype == torch.float32
    assert torch.equal(d.y_train, torch.as_tensor(y)) and torch.equal(d.y_test, torch.as_tensor(yt))
    raw = x / 255.0
    expect = (raw - raw.mean()) / raw.std(ddof=1)
    np.testing.assert_allclose(d.x_train[:, 0].numpy(), expect, rtol=1e-4, atol=1e-5)


def test_read_idx_rejects_wrong_magic(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 1) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(p)


def test_cifar10_loader(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), list(rng.integers(0, 10, n))
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    d = load_dataset("cifar10", root=tmp_path)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.y_train.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # channel order: the first 1024 bytes of a row are the red plane
    raw = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255
    red = raw[:, 0]
    np.testing.assert_allclose(d.x_train[:, 0].numpy(), (red - red.mean()) / red.std(ddof=1), rtol=1e-4, atol=1e-5)
    raw_pixels = load_dataset("cifar10", root=tmp_path, unit_range=True)
    np.testing.assert_allclose(raw_pixels.x_train.numpy(), raw, rtol=1e-6)


def test_svhn_loader(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    folder = tmp_path / "svhn"
    folder.mkdir()
    ys = {}
    for split, n in [("train", 6), ("test", 3)]:
        ys[split] = rng.integers(1, 11, (n, 1))  # 1..10, 10 meaning digit 0
        ys[split][0, 0] = 10
        savemat(folder / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                "y": ys[split].astype(np.uint8)})
    d = load_dataset("svhn", root=tmp_path)
    assert d.x_train.shape == (6, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.y_train.tolist() == [int(v) % 10 for v in ys["train"][:, 0]]
    assert d.y_train[0] == 0 and d.y_test[0] == 0


@pytest.mark.parametrize("name,expected", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                           ("mnist", "mnist/train-images-idx3-ubyte"),
                                           ("fashion_mnist", "fashion_mnist/train-images-idx3-ubyte"),
                                           ("svhn", "svhn/train_32x32.mat")])
def test_missing_files_name_the_expected_path(tmp_path, name, expected):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path / expected) in str(err.value) and "layout" in str(err.value)


def test_digits_split_is_stratified_and_seeded():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_test) == 1797
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # ~20% of every class (174..183 examples each)


def test_subset_is_seeded_and_without_replacement():
    d = load_dataset("digits", seed=3)
    s1, s2 = load_dataset("digits", n_train=100, seed=3), load_dataset("digits", n_train=100, seed=3)
    assert len(s1.x_train) == 100 and torch.equal(s1.x_train, s2.x_train)
    # every subset row is a distinct row of the full training set
    rows = {tuple(r.tolist()) for r in d.x_train.flatten(1)}
    sub = [tuple(r.tolist()) for r in s1.x_train.flatten(1)]
    assert all(r in rows for r in sub) and len(set(sub)) == 100
    with pytest.raises(ValueError, match="n_train"):
        d.subset(10**6)


def test_mnist1d_generated_locally_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKPROPLAB_CACHE", str(tmp_path))
    import mnist1d.data

    def no_download(*a, **k):
        raise AssertionError("get_dataset downloads; it must never be called")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    d = load_dataset("mnist1d", num_samples=500)
    assert d.x_train.shape == (400, 1, 40) and d.x_test.shape == (100, 1, 40) and d.num_classes == 10
    assert list(tmp_path.glob("mnist1d_500_42.npz"))
    monkeypatch.setattr(mnist1d.data, "make_dataset", no_download)  # now it must come from the cache
    again = load_dataset("mnist1d", num_samples=500)
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)


def test_gaussian_teacher_is_a_deterministic_regression_set():
    a = load_dataset("gaussian_teacher", seed=0, train_size=2000, test_size=500)
    b = load_dataset("gaussian_teacher", seed=0, train_size=2000, test_size=500)
    assert a.num_classes == 0 and a.y_train.shape == (2000, 100) and a.input_shape == (20,)
    assert torch.equal(a.y_train, b.y_train)
    assert abs(float(a.x_train.std()) - 10.0) < 0.2


def test_unknown_dataset_lists_available():
    with pytest.raises(ValueError, match="available: .*digits"):
        load_dataset("imagenet")
