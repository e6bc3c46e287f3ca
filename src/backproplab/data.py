"""Datasets as in-memory tensors: offline ones made here, real ones read from local files.

Every loader returns a :class:`Data` (image loaders take ``unit_range=True`` to keep pixels in [0, 1]):
``x_train`` of shape ``(N, *input_shape)`` float32,
``y_train`` of shape ``(N,)`` int64 class labels (or ``(N, out_dim)`` float32 targets for
regression, where ``num_classes == 0``), and the same for the test split. Inputs are
standardised with training-set statistics. Splits and subsets are a pure function of ``seed``.

Offline (always available):
  ``digits``           scikit-learn's bundled 8x8 handwriting, (1, 8, 8), 10 classes, 1797 examples
                       split 80/20 stratified by ``seed``.
  ``mnist1d``          MNIST-1D generated locally (``mnist1d.data.make_dataset``, its default seed 42),
                       (1, 40), 10 classes, 4000 train / 1000 test; cached on disk after the first call.
  ``gaussian_teacher`` Gaussian inputs labelled by a fixed ReLU teacher (regression), made by
                       ``backproplab.methods.teacher_student`` (Luck Matters; registered by
                       ``backproplab.plugins``).

Local files in their official formats, under ``root`` (default ``$BACKPROPLAB_DATA`` or ``./data``):
  ``cifar10``          ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles), (3, 32, 32).
  ``mnist``            ``mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, (1, 28, 28).
  ``fashion_mnist``    the same four IDX files under ``fashion_mnist/``.
  ``svhn``             ``svhn/{train,test}_32x32.mat`` (cropped digits; label 10 means 0), (3, 32, 32).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from . import _io
from .streams import derive, derive_seed


class DataNotFoundError(FileNotFoundError):
    """A dataset's local files are missing; the message names the expected path and layout.

    Example:
        >>> try:
        ...     load_dataset("mnist", root="no_such_folder")
        ... except DataNotFoundError as e:
        ...     print("no_such_folder" in str(e))
        True
    """


class DataFormatError(ValueError):
    """A dataset file is corrupt, inconsistent or hostile; the message names the file and what was expected.

    Example:
        A CIFAR-10 batch whose pickle would run a command is refused before anything runs, naming the file:

        >>> import os, pathlib, pickle, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "cifar-10-batches-py"
        >>> folder.mkdir()
        >>> class Hostile:
        ...     def __reduce__(self):
        ...         return os.system, ("echo this must not run",)
        >>> for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        ...     _ = (folder / name).write_bytes(pickle.dumps(Hostile()))
        >>> cifar10(root=folder.parent)
        Traceback (most recent call last):
        ...
        backproplab.data.DataFormatError: .../data_batch_1: not a CIFAR-10 python batch (refused to load posix.system...
    """


class _ArraysOnly(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 python batches hold: dicts, lists, bytes, str, numbers and NumPy arrays.

    Any other global (``os.system`` behind a ``__reduce__``, say) is refused before it can run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays, "
                                         "lists and bytes")
        return super().find_class(module, name)


@dataclass(frozen=True)
class Data:
    """A dataset in memory: training and test tensors (examples along dimension 0) and the number of classes (0 for
    regression targets, whose ``output_dim`` is the targets' width).

    Example:
        >>> import torch
        >>> data = Data("toy", torch.randn(10, 3), torch.randint(0, 2, (10,)), torch.randn(4, 3), torch.zeros(4), 2)
        >>> data.input_shape, data.output_dim
        ((3,), 2)
        >>> small = data.subset(6, seed=1, rest_to_test=True)     # 6 drawn by the seed; the other 4 join the test set
        >>> len(small.x_train), len(small.x_test)
        (6, 8)
    """
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int  # 0 for regression targets

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def output_dim(self) -> int:
        return self.num_classes if self.num_classes else int(self.y_train.shape[1])

    def subset(self, n_train: int, seed: int = 0, rest_to_test: bool = False) -> Data:
        """The same data with ``n_train`` training examples drawn without replacement by ``seed``.

        ``rest_to_test``: the training examples left out join the test set (a larger held-out pool; the
        inputs stay standardised with the full training set's statistics, which use no test label)."""
        n = len(self.x_train)
        if not 0 < n_train <= n:
            raise ValueError(f"n_train={n_train} must be in [1, {n}] for dataset {self.name!r}")
        perm = torch.randperm(n, generator=derive(seed, "subset"))
        idx, rest = perm[:n_train].sort().values, perm[n_train:].sort().values
        out = replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx])
        if rest_to_test and len(rest):
            out = replace(out, x_test=torch.cat([self.x_test, self.x_train[rest]]),
                          y_test=torch.cat([self.y_test, self.y_train[rest]]))
        return out

    def to(self, device: torch.device | str) -> Data:
        return replace(self, **{k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")})


DATASETS: dict[str, Callable[..., Data]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Data]], Callable[..., Data]]:
    """Register a loader ``fn(seed=..., root=..., **kwargs) -> Data`` under ``name`` (later ones replace).

    Example:
        >>> import torch
        >>> @register_dataset("tiny_xor")
        ... def tiny_xor(seed=0, root=None):
        ...     x = torch.tensor([[0., 0.], [0., 1.], [1., 0.], [1., 1.]])
        ...     y = torch.tensor([0, 1, 1, 0])
        ...     return Data("tiny_xor", x, y, x, y, 2)
        >>> load_dataset("tiny_xor").num_classes
        2
        >>> del DATASETS["tiny_xor"]
    """

    def deco(fn: Callable[..., Data]) -> Callable[..., Data]:
        DATASETS[name] = fn
        return fn

    return deco


def load_dataset(name: str, *, n_train: int | None = None, seed: int = 0,
                 root: str | os.PathLike | None = None, rest_to_test: bool = False, **kwargs) -> Data:
    """Load dataset ``name``; ``n_train`` keeps a seeded random subset of the training set (and
    ``rest_to_test`` adds the examples left out to the test set).

    Example:
        >>> data = load_dataset("digits", n_train=100, seed=0)
        >>> tuple(data.x_train.shape), data.num_classes, len(data.x_test) > 0
        ((100, 1, 8, 8), 10, True)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    data = DATASETS[name](seed=seed, root=Path(root) if root else default_root(), **kwargs)
    return data.subset(n_train, seed, rest_to_test) if n_train else data


def default_root() -> Path:
    """Where dataset files are looked for: ``$BACKPROPLAB_DATA``, else ``data`` (relative to the working folder).

    Example:
        >>> import os
        >>> os.environ.get("BACKPROPLAB_DATA") is not None or default_root().name == "data"
        True
    """
    return Path(os.environ.get("BACKPROPLAB_DATA", "data"))


def cache_dir() -> Path:
    """Where generated data are cached (MNIST-1D): ``$BACKPROPLAB_CACHE``, else ``~/.cache/backproplab``.

    Example:
        >>> os.environ.get("BACKPROPLAB_CACHE") is not None or cache_dir().parts[-2:] == (".cache", "backproplab")
        True
    """
    return Path(os.environ.get("BACKPROPLAB_CACHE", Path.home() / ".cache" / "backproplab"))


def _standardise(name: str, x_train: np.ndarray, y_train, x_test: np.ndarray, y_test, num_classes: int,
                 per_channel: bool = True, unit_range: bool = False) -> Data:
    """Standardise with training statistics, or (``unit_range``) keep the [0, 1] pixel values."""
    x_train = torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32)
    x_test = torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32)
    if unit_range:
        return Data(name, x_train, torch.as_tensor(np.asarray(y_train), dtype=torch.int64), x_test,
                    torch.as_tensor(np.asarray(y_test), dtype=torch.int64), num_classes)
    dims = [0] + list(range(2, x_train.dim())) if per_channel else list(range(x_train.dim()))
    mean = x_train.mean(dim=dims, keepdim=True)
    std = x_train.std(dim=dims, keepdim=True).clamp_min(1e-8)
    label = torch.int64 if num_classes else torch.float32
    return Data(name, (x_train - mean) / std, torch.as_tensor(np.asarray(y_train), dtype=label),
                (x_test - mean) / std, torch.as_tensor(np.asarray(y_test), dtype=label), num_classes)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(derive_seed(seed, "stratified-split"))
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------- offline datasets


@register_dataset("digits")
def digits(seed: int = 0, root: Path | None = None, test_fraction: float = 0.2, unit_range: bool = False) -> Data:
    """``unit_range=True`` keeps pixels in [0, 1] (for methods whose sensitivity bounds assume it).

    Example:
        >>> data = digits(seed=0)
        >>> data.input_shape, data.num_classes, len(data.x_train) + len(data.x_test)      # scikit-learn's 1,797
        ((1, 8, 8), 10, 1797)
        >>> abs(float(data.x_train.mean())) < 1e-5                                       # standardised on train
        True
    """
    _io.require("sklearn", "lab", "the digits dataset (scikit-learn's)")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    return _standardise("digits", x[tr], y[tr], x[te], y[te], 10, per_channel=False, unit_range=unit_range)


@register_dataset("mnist1d")
def mnist1d(seed: int = 0, root: Path | None = None, num_samples: int = 5000, generator_seed: int = 42) -> Data:
    """MNIST-1D made locally; ``seed`` only affects subsets (the split is the generator's 80/20).

    Example:
        >>> data = mnist1d(num_samples=500)
        >>> data.input_shape, data.num_classes, len(data.x_train), len(data.x_test)
        ((1, 40), 10, 400, 100)

    References:
        Greydanus, "Scaling down deep learning" (MNIST-1D), arXiv:2011.14439, 2020.
    """
    path = cache_dir() / f"mnist1d_{num_samples}_{generator_seed}.npz"
    if path.exists():
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        _io.require("mnist1d", "lab", "the MNIST-1D dataset")
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, generator_seed
        saved = np.random.get_state()  # make_dataset reseeds numpy's global generator
        try:
            d = make_dataset(args)
        finally:
            np.random.set_state(saved)
        arrays = {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _io.write_bytes(path, buf.getvalue())
    x, xt = arrays["x"][:, None].astype(np.float32), arrays["x_test"][:, None].astype(np.float32)
    return _standardise("mnist1d", x, arrays["y"].astype(np.int64), xt, arrays["y_test"].astype(np.int64), 10)


# ---------------------------------------------------------------- local files, official formats


def _missing(name: str, expected: Path, layout: str, root: Path) -> DataNotFoundError:
    return DataNotFoundError(
        f"{name}: expected {expected} (layout: {layout}). Fetch the official files with `backproplab data get "
        f"{name} --root {root}` (online), put them there yourself, or point --set data_root=DIR / "
        f"$BACKPROPLAB_DATA at the folder that holds them; a run downloads nothing itself.")


@register_dataset("cifar10")
def cifar10(seed: int = 0, root: Path | None = None, unit_range: bool = False) -> Data:
    """CIFAR-10 from the official python batches (``root/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``),
    read by a restricted unpickler that loads only arrays, lists and bytes; each row of ``b'data'`` is the red, green
    and blue 32 x 32 planes in turn.

    Example:
        >>> import pathlib, pickle, tempfile, numpy as np
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "cifar-10-batches-py"
        >>> folder.mkdir()
        >>> rng = np.random.default_rng(0)
        >>> for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        ...     batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        ...     _ = (folder / name).write_bytes(pickle.dumps(batch))
        >>> data = cifar10(root=folder.parent, unit_range=True)
        >>> data.x_train.shape, data.x_test.shape
        (torch.Size([10, 3, 32, 32]), torch.Size([3, 3, 32, 32]))
        >>> row = batch[b"data"][2]                                   # the last test image: planes R, G, B
        >>> bool((data.x_test[2] * 255).round().to(torch.uint8).flatten().numpy().tolist() == row.tolist())
        True
    """
    root = root or default_root()
    folder = root / "cifar-10-batches-py"
    layout = "cifar-10-batches-py/data_batch_1 .. data_batch_5 and test_batch, the python pickle version"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    for f in files:
        if not f.exists():
            raise _missing("cifar10", f, layout, root)

    def read(f: Path) -> tuple[np.ndarray, np.ndarray]:
        try:
            with open(f, "rb") as fh:
                d = _ArraysOnly(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise DataFormatError(f"{f}: not a CIFAR-10 python batch ({e}); expected a pickled dict with b'data' "
                                  "(N x 3072 uint8) and b'labels' (N ints in 0..9)") from None
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise DataFormatError(f"{f}: expected a dict with keys b'data' and b'labels', got "
                                  f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        data, labels = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or not len(data):
            raise DataFormatError(f"{f}: b'data' must be an N x 3072 uint8 array with N > 0, got {data.shape} "
                                  f"{data.dtype}")
        return data.reshape(-1, 3, 32, 32), _labels(f, labels, len(data), 10)

    train = [read(f) for f in files[:5]]
    xt, yt = read(files[5])
    x = np.concatenate([a for a, _ in train]).astype(np.float32) / 255
    y = np.concatenate([b for _, b in train])
    return _standardise("cifar10", x, y, xt.astype(np.float32) / 255, yt, 10, unit_range=unit_range)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not; a corrupt file raises DataFormatError naming it.

    Example:
        >>> import gzip, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels.idx1-ubyte.gz"
        >>> _ = path.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])))   # unsigned bytes, 1-D, n=3
        >>> read_idx(path).tolist()
        [7, 2, 1]
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataFormatError(f"{path}: truncated IDX header ({len(head)} of 4 bytes)")
            zero, dtype_code, ndim = struct.unpack(">HBB", head)
            if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
                raise DataFormatError(f"{path} is not an unsigned-byte IDX file (magic {zero:#x} {dtype_code:#x}, "
                                      f"{ndim} dimensions)")
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataFormatError(f"{path}: truncated IDX header (dimensions)")
            shape = struct.unpack(f">{ndim}I", dims)
            arr = np.frombuffer(f.read(), dtype=np.uint8)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataFormatError(f"{path}: cannot read ({e}); expected an IDX file, gzipped or not") from None
    if arr.size != int(np.prod(shape)):
        raise DataFormatError(f"{path}: header says shape {shape} but holds {arr.size} bytes")
    return arr.reshape(shape)


def _labels(path: Path, labels: np.ndarray, count: int, classes: int) -> np.ndarray:
    """Labels checked against the examples they label: one per example, integers in [0, classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise DataFormatError(f"{path}: {labels.size} labels for {count} examples; expected one label per example")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes):
        raise DataFormatError(f"{path}: labels must be integers in 0..{classes - 1}, found "
                              f"{labels.min()}..{labels.max()} ({labels.dtype})")
    return labels.astype(np.int64)


def _idx_dataset(name: str, root: Path | None, unit_range: bool = False) -> Data:
    root = root or default_root()
    candidates = [root / name, root / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name] / "raw"]
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    layout = f"{name}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte, gzipped (.gz) or not"
    best: tuple[int, Path, list] | None = None
    for folder in candidates:
        paths = []
        for stem in stems:
            found = [p for p in (folder / stem, folder / f"{stem}.gz") if p.exists()]
            paths.append(found[0] if found else None)
        if all(paths):
            x, y, xt, yt = (read_idx(p) for p in paths)
            for images, path in ((x, paths[0]), (xt, paths[2])):
                if images.ndim != 3:
                    raise DataFormatError(f"{path}: expected N x rows x cols images, got shape {images.shape}")
                if not len(images):
                    raise DataFormatError(f"{path}: holds no images (its header says shape {images.shape}); "
                                          "expected the official file with N > 0 images")
            if x.shape[1:] != xt.shape[1:]:
                raise DataFormatError(f"{paths[2]}: images of {xt.shape[1]} x {xt.shape[2]} pixels, but {paths[0]} "
                                      f"holds {x.shape[1]} x {x.shape[2]}; both splits must come from the same "
                                      "dataset")
            y, yt = _labels(paths[1], y, len(x), 10), _labels(paths[3], yt, len(xt), 10)
            return _standardise(name, x[:, None].astype(np.float32) / 255, y, xt[:, None].astype(np.float32) / 255,
                                yt, 10, unit_range=unit_range)
        present = sum(p is not None for p in paths)
        if present and (best is None or present > best[0]):
            best = (present, folder, paths)
    if best is not None:  # some files are there: name the first one that is missing
        _, folder, paths = best
        missing = next(stem for stem, p in zip(stems, paths) if p is None)
        raise _missing(name, folder / missing, layout, root)
    raise _missing(name, candidates[0] / stems[0], layout, root)


@register_dataset("mnist")
def mnist(seed: int = 0, root: Path | None = None, unit_range: bool = False) -> Data:
    """MNIST from its four official IDX files under ``root/mnist/`` (or torchvision's ``root/MNIST/raw/``),
    gzipped or not: images scaled to [0, 1] (``unit_range``) or standardised with the training statistics.
    ``backproplab data get mnist`` downloads them.

    Example:
        >>> import pathlib, tempfile, numpy as np
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "mnist").mkdir()
        >>> def write_idx(path, array):          # IDX: 0, 0, 0x08 (unsigned bytes), ndim, then each size big-endian
        ...     sizes = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        ...     _ = path.write_bytes(bytes([0, 0, 8, array.ndim]) + sizes + array.astype(np.uint8).tobytes())
        >>> images = np.random.default_rng(0).integers(0, 256, (10, 28, 28))
        >>> for split, rows in (("train", slice(0, 6)), ("t10k", slice(6, 10))):
        ...     write_idx(root / "mnist" / f"{split}-images-idx3-ubyte", images[rows])
        ...     write_idx(root / "mnist" / f"{split}-labels-idx1-ubyte", np.arange(10)[rows])
        >>> data = mnist(root=root, unit_range=True)
        >>> data.x_train.shape, data.y_test.tolist()
        (torch.Size([6, 1, 28, 28]), [6, 7, 8, 9])
        >>> bool((data.x_test[:, 0] == torch.tensor(images[6:] / 255, dtype=torch.float32)).all())
        True
    """
    return _idx_dataset("mnist", root, unit_range)


@register_dataset("fashion_mnist")
def fashion_mnist(seed: int = 0, root: Path | None = None, unit_range: bool = False) -> Data:
    """Fashion-MNIST: MNIST's IDX layout under ``root/fashion_mnist/`` (or torchvision's ``root/FashionMNIST/raw/``),
    gzipped or not; see :func:`mnist`.

    Example:
        >>> import gzip, pathlib, tempfile, numpy as np
        >>> raw = pathlib.Path(tempfile.mkdtemp()) / "FashionMNIST" / "raw"      # torchvision's layout, gzipped
        >>> raw.mkdir(parents=True)
        >>> def write_idx(path, array):
        ...     sizes = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
        ...     content = bytes([0, 0, 8, array.ndim]) + sizes + array.astype(np.uint8).tobytes()
        ...     _ = path.write_bytes(gzip.compress(content))
        >>> images = np.random.default_rng(1).integers(0, 256, (8, 28, 28))
        >>> for split, rows in (("train", slice(0, 5)), ("t10k", slice(5, 8))):
        ...     write_idx(raw / f"{split}-images-idx3-ubyte.gz", images[rows])
        ...     write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(8)[rows])
        >>> data = fashion_mnist(root=raw.parent.parent)                # standardised with the training statistics
        >>> train = torch.tensor(images[:5] / 255, dtype=torch.float32)
        >>> torch.allclose(data.x_test[:, 0], (torch.tensor(images[5:] / 255, dtype=torch.float32) - train.mean())
        ...                / train.std(), atol=1e-5)
        True
    """
    return _idx_dataset("fashion_mnist", root, unit_range)


@register_dataset("svhn")
def svhn(seed: int = 0, root: Path | None = None, unit_range: bool = False) -> Data:
    """SVHN's cropped digits (format 2): ``root/svhn/train_32x32.mat`` and ``test_32x32.mat``, X of 32 x 32 x 3 x N
    pixels and y of N labels in 1..10, where 10 stands for the digit 0.

    Example:
        >>> import pathlib, tempfile, numpy as np
        >>> from scipy.io import savemat
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "svhn"
        >>> folder.mkdir()
        >>> rng = np.random.default_rng(0)
        >>> for split, labels in (("train", [10, 1, 2]), ("test", [10, 9])):
        ...     pixels = rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
        ...     savemat(folder / f"{split}_32x32.mat", {"X": pixels, "y": np.array(labels)[:, None]})
        >>> data = svhn(root=folder.parent, unit_range=True)
        >>> data.x_test.shape, data.y_train.tolist(), data.y_test.tolist()          # label 10 is the digit 0
        (torch.Size([2, 3, 32, 32]), [0, 1, 2], [0, 9])
        >>> bool((data.x_test[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().tolist()
        ...      == pixels[..., 1].tolist())                          # X[row, col, channel, n] is image n
        True
    """
    from scipy.io import loadmat

    root = root or default_root()
    folder = root / "svhn"
    arrays = []
    for split in ("train", "test"):
        f = folder / f"{split}_32x32.mat"
        if not f.exists():
            raise _missing("svhn", f, "svhn/train_32x32.mat and svhn/test_32x32.mat (cropped digits, format 2)",
                           root)
        try:
            m = loadmat(f)
        except Exception as e:  # scipy raises several types for a corrupt file; none runs code
            raise DataFormatError(f"{f}: not a readable .mat file ({e})") from None
        if "X" not in m or "y" not in m:
            raise DataFormatError(f"{f}: expected variables X (32 x 32 x 3 x N) and y (N labels), found "
                                  f"{sorted(k for k in m if not k.startswith('__'))}")
        if m["X"].ndim != 4 or m["X"].shape[:3] != (32, 32, 3) or not m["X"].shape[3]:
            raise DataFormatError(f"{f}: X must be 32 x 32 x 3 x N with N > 0, got {m['X'].shape}")
        pixels = m["X"]
        if pixels.dtype != np.uint8 and (not np.issubdtype(pixels.dtype, np.number) or pixels.size and (
                not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255)):
            raise DataFormatError(f"{f}: X must hold pixel values 0..255 (uint8 in the official files), found "
                                  f"{pixels.dtype} from {pixels.min()} to {pixels.max()}")
        x = np.transpose(pixels, (3, 2, 0, 1)).astype(np.float32) / 255  # (32,32,3,N) -> (N,3,32,32)
        raw = np.asarray(m["y"]).reshape(-1)
        if raw.size and (not np.issubdtype(raw.dtype, np.number) or not np.isfinite(raw).all()
                         or (raw != np.round(raw)).any() or raw.min() < 1 or raw.max() > 10):
            raise DataFormatError(f"{f}: y must hold the official labels, integers 1..10 (10 is digit 0), found "
                                  f"{raw.min()}..{raw.max()} ({raw.dtype})")
        y = _labels(f, raw.astype(np.int64) % 10, len(x), 10)  # digit 0 is stored as label 10
        arrays += [x, y]
    return _standardise("svhn", *arrays, 10, unit_range=unit_range)


def fingerprint(data: Data) -> str:
    """A short hash of the training tensors, recorded with runs so results name their data.

    Example:
        >>> a, b = load_dataset("digits", n_train=100, seed=0), load_dataset("digits", n_train=100, seed=1)
        >>> fingerprint(a) == fingerprint(load_dataset("digits", n_train=100, seed=0)), fingerprint(a) == fingerprint(b)
        (True, False)
    """
    h = hashlib.sha1()
    for t in (data.x_train, data.y_train):
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
