"""What made a result: the code, its version, the libraries and the device, recorded with every run.

``code`` is a SHA-256 over the package's own source files (their paths and bytes): it changes exactly when
the code that trains and judges changes, whether or not that code is a git commit, and is what decides if
a finished run is *stale* (made by other code than the one running now). ``commit`` is the git commit of
the checkout the package was imported from, when there is one (``+dirty`` when its sources differ from it).

Example:
    >>> from backproplab.provenance import provenance
    >>> record = provenance("cpu")
    >>> sorted(record)
    ['backproplab', 'code', 'commit', 'device', 'numpy', 'python', 'torch']
    >>> len(record["code"])
    16
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """16 hex digits of SHA-256 over every ``.py`` file of the package (relative path and content)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout holding the package (``+dirty`` if its sources changed), or None."""
    try:
        # the package's own files must be tracked there: an installed copy inside some other repository (a
        # virtualenv in a user's project, say) would otherwise be credited to that project's commit
        tracked = subprocess.run(["git", "-C", str(PACKAGE), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "-C", str(PACKAGE), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if tracked.returncode != 0 or head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(PACKAGE), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or a hung one
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(device: Any = None) -> dict:
    """The record written into each run's ``config.json`` and ``final.json`` and each ``summary.json``.

    Example:
        >>> import torch
        >>> record = provenance("cpu")
        >>> record["torch"] == torch.__version__, record["code"] == code_hash(), record["device"]
        (True, True, 'cpu')
    """
    import numpy
    import torch

    from . import __version__

    return {"backproplab": __version__, "code": code_hash(), "commit": git_commit(), "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "device": str(device) if device is not None else None}


def is_stale(record: Any) -> bool:
    """Whether a run's recorded provenance names other code than this one (a run made before provenance
    was recorded counts as stale: nothing says which code made it).

    Example:
        >>> is_stale(provenance()), is_stale({"code": "0" * 16}), is_stale(None)
        (False, True, True)
    """
    return not (isinstance(record, dict) and record.get("code") == code_hash())
