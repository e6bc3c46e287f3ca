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
    """A path the program would write holds something else (a directory, a FIFO, a device)."""


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
    _atomic(path, lambda f: f.write(text), "w")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data), "wb")


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so the file stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Valid JSON always: non-finite numbers are written as null (say why in a status field beside them)."""
    write_text(path, json.dumps(finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(finite(r), sort_keys=True, allow_nan=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one row (a line written whole, then flushed to disk); the file is created with the umask's mode."""
    line = json.dumps(finite(row), sort_keys=True, allow_nan=False) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut short (a crash while appending) is left out."""
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
    _atomic(path, lambda f: torch.save(obj, f), "wb")


def require(module: str, extra: str, what: str) -> None:
    """Raise ImportError naming the pip extra when ``module`` (a dependency outside the core install) is
    missing, before anything uses it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the {module} package, which the core install leaves out: "
                          f"pip install 'backproplab[{extra}]'")
