"""Atomic file writes: a crash or Ctrl-C leaves either the old file or the new one, never half."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable

import torch


class NotARegularFile(OSError):
    """A path the program would write holds something else (a directory, a FIFO, a device).

    Example:
        >>> import os
        >>> os.makedirs("taken", exist_ok=True)
        >>> write_text("taken", "x")
        Traceback (most recent call last):
        ...
        backproplab._io.NotARegularFile: taken is a directory, where a file would be written; move it away
    """


def _atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    if path.exists() and not path.is_file() or path.is_symlink() and not path.exists():
        kind = "a directory" if path.is_dir() else "a dangling link" if path.is_symlink() else "not a regular file"
        raise NotARegularFile(f"{path} is {kind}, where a file would be written; move it away")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600: give the file the user's usual mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Written to a temporary file beside ``path`` and renamed over it: a crash leaves the old file or the new one.

    Example:
        >>> write_text("note.txt", "first"); write_text("note.txt", "second")
        >>> open("note.txt").read()
        'second'
    """
    _atomic(path, lambda f: f.write(text), "w")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomic as :func:`write_text`.

    Example:
        >>> write_bytes("blob.bin", bytes([0, 255]))
        >>> open("blob.bin", "rb").read()
        b'\\x00\\xff'
    """
    _atomic(path, lambda f: f.write(data), "wb")


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so the file stays valid JSON.

    Example:
        >>> finite({"loss": float("nan"), "curve": [1.0, float("inf")], "n": 3})
        {'loss': None, 'curve': [1.0, None], 'n': 3}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Valid JSON always: non-finite numbers are written as null (say why in a status field beside them).

    Example:
        >>> import json
        >>> write_json("final.json", {"test_acc": 0.9, "loss": float("nan")})
        >>> json.load(open("final.json"))
        {'loss': None, 'test_acc': 0.9}
    """
    write_text(path, json.dumps(finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Rows as JSON lines, written atomically (non-finite numbers as null).

    Example:
        >>> write_jsonl("rows.jsonl", [{"step": 1}, {"step": 2}])
        >>> read_jsonl("rows.jsonl")
        [{'step': 1}, {'step': 2}]
    """
    write_text(path, "".join(json.dumps(finite(r), sort_keys=True, allow_nan=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one row (a line written whole, then flushed to disk); the file is created with the umask's mode.

    Example:
        >>> write_jsonl("log.jsonl", [{"step": 1}])
        >>> append_jsonl("log.jsonl", {"step": 2, "loss": float("inf")})
        >>> read_jsonl("log.jsonl")
        [{'step': 1}, {'loss': None, 'step': 2}]
    """
    line = json.dumps(finite(row), sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut short (a crash while appending) is left out.

    Example:
        >>> write_text("cut.jsonl", '{"step": 1}\\n{"step": 2}\\n{"st')     # a crash in the middle of the last append
        >>> read_jsonl("cut.jsonl")
        [{'step': 1}, {'step': 2}]
    """
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise
    return rows


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    """Atomic as :func:`write_text`; read back with ``torch.load(path, weights_only=True)`` (no unpickling of code).

    Example:
        >>> import torch
        >>> torch_save("w.pt", {"w": torch.ones(2)})
        >>> torch.load("w.pt", weights_only=True)["w"].tolist()
        [1.0, 1.0]
    """
    _atomic(path, lambda f: torch.save(obj, f), "wb")


def require(module: str, extra: str, what: str) -> None:
    """Raise ImportError naming the pip extra when ``module`` (a dependency outside the core install) is
    missing, before anything uses it.

    Example:
        >>> require("json", "core", "reading results")          # present: nothing happens
        >>> require("no_such_module_xyz", "dp", "DP-SGD")
        Traceback (most recent call last):
        ...
        ImportError: DP-SGD needs the no_such_module_xyz package, ...: pip install 'backproplab[dp]'
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the {module} package, which the core install leaves out: "
                          f"pip install 'backproplab[{extra}]'")
