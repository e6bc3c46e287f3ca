"""Fetch the official files of the real datasets into the folder the loaders read (``backproplab data get``).

Each dataset lists its files with a published digest and the mirrors that serve them. A download goes
to ``<file>.part`` beside its destination, resumes from there with an HTTP ``Range`` request when a
connection drops (a truncated transfer is retried, not kept), and becomes the file only once its digest
matches; a mirror that answers 404, a wrong digest or a dead connection is left for the next one. Redirects
are followed (http and https only). CIFAR-10's archive is unpacked member by member, refusing any member
outside ``cifar-10-batches-py/``; the MNIST-style ``.gz`` files are read as they are.

Digests: SHA-256 as published for MNIST (and reproduced by TensorFlow, Bazel rules and many others),
Fashion-MNIST (its TensorFlow/Keras loader) and CIFAR-10 (Keras's ``get_file``). SVHN publishes no
SHA-256 we could check against an independent source; its files are checked against the MD5 and size that
torchvision and others publish.

Example:
    >>> from backproplab import download
    >>> sorted(download.SOURCES)
    ['cifar10', 'fashion_mnist', 'mnist', 'svhn']
    >>> download.SOURCES["mnist"].folder
    'mnist'
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .data import default_root

CHUNK = 1 << 20
TIMEOUT = 30.0  # seconds without a byte before a connection counts as dead
ATTEMPTS = 3  # tries per mirror (each resumes the .part file)


class DownloadError(RuntimeError):
    """No mirror delivered a file with the published digest; the message lists each mirror's failure.

    Example:
        A mirror where nothing listens is named with its failure:

        >>> import hashlib, socket
        >>> with socket.socket() as s:                            # a free port on this machine, closed again
        ...     _ = s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        >>> SOURCES["demo"] = Source("demo", (f"http://127.0.0.1:{port}/",),
        ...                          (RemoteFile("a.bin", "sha256:" + hashlib.sha256(b"hello").hexdigest()),))
        >>> try:
        ...     get("demo", root="data", progress=False)
        ... except DownloadError as e:
        ...     print(f"127.0.0.1:{port}" in str(e))
        True
        >>> del SOURCES["demo"]
    """


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name on every mirror, its published digest and, where published, its size.

    Example:
        >>> SOURCES["mnist"].files[0].name, SOURCES["mnist"].files[0].digest.split(":")[0]
        ('train-images-idx3-ubyte.gz', 'sha256')
    """
    name: str  # the file's name on every mirror
    digest: str  # "sha256:<hex>" or "md5:<hex>"
    size: int | None = None  # bytes, where published


@dataclass(frozen=True)
class Source:
    """Where a dataset's official files come from and where they go under the data root.

    Example:
        >>> sorted(SOURCES), SOURCES["cifar10"].archive
        (['cifar10', 'fashion_mnist', 'mnist', 'svhn'], 'tar.gz')
    """
    folder: str  # where under the data root the loader looks
    mirrors: tuple[str, ...]  # base URLs, tried in order
    files: tuple[RemoteFile, ...]
    archive: str | None = None  # "tar.gz": unpack into the data root, then remove the archive
    unpacked: tuple[str, ...] = ()  # the files an archive must yield (relative to the data root)


_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz")


def _idx_files(*sha256: str) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(name, "sha256:" + h) for name, h in zip(_IDX, sha256))


SOURCES: dict[str, Source] = {
    "mnist": Source(
        "mnist", ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/",
                  "http://yann.lecun.com/exdb/mnist/"),
        _idx_files("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")),
    "fashion_mnist": Source(
        "fashion_mnist", ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        _idx_files("08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
                   "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
                   "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
                   "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf")),
    "cifar10": Source(
        ".", ("https://www.cs.toronto.edu/~kriz/",),
        (RemoteFile("cifar-10-python.tar.gz",
                    "sha256:6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", 170_498_071),),
        archive="tar.gz",
        unpacked=tuple(f"cifar-10-batches-py/{n}" for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])),
    "svhn": Source(
        "svhn", ("http://ufldl.stanford.edu/housenumbers/",),
        (RemoteFile("train_32x32.mat", "md5:e26dedcc434d2e4c54c9b2d4a06d8373", 182_040_794),
         RemoteFile("test_32x32.mat", "md5:eb5a983be6a315427106f1b164d9cef3", 64_275_384))),
}


def get(name: str, root: str | os.PathLike | None = None, *, mirrors: list[str] | tuple[str, ...] | None = None,
        progress: bool | None = None) -> Path:
    """Fetch dataset ``name``'s official files into ``root`` (default ``$BACKPROPLAB_DATA`` or ``./data``),
    where :func:`backproplab.data.load_dataset` reads them; returns the dataset's folder.

    Files already there with the published digest are kept. ``mirrors``: base URLs to use instead of the
    built-in list (an institutional mirror, or a test server). ``progress``: a bar per file on stderr
    (default: when stderr is a terminal). Raises :class:`DownloadError` naming each mirror's failure.

    Example (a mirror on this machine):
        >>> import functools, hashlib, http.server, pathlib, threading
        >>> _ = pathlib.Path("mirror").mkdir(exist_ok=True); _ = pathlib.Path("mirror/a.bin").write_bytes(b"hello")
        >>> class Quiet(http.server.SimpleHTTPRequestHandler):
        ...     def log_message(self, *args):
        ...         pass
        >>> server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory="mirror"))
        >>> threading.Thread(target=server.serve_forever, daemon=True).start()
        >>> SOURCES["demo"] = Source("demo", (f"http://127.0.0.1:{server.server_port}/",),
        ...                          (RemoteFile("a.bin", "sha256:" + hashlib.sha256(b"hello").hexdigest()),))
        >>> (get("demo", root="data", progress=False) / "a.bin").read_bytes()
        b'hello'
        >>> _ = pathlib.Path("mirror/a.bin").write_bytes(b"tampered")              # a mirror serving another file
        >>> get("demo", root="elsewhere", progress=False)
        Traceback (most recent call last):
        ...
        backproplab.download.DownloadError: a.bin: no mirror delivered the official file; ...(a corrupt or ...
        >>> server.shutdown(); del SOURCES["demo"]
    """
    if name not in SOURCES:
        raise ValueError(f"no download for dataset {name!r}; available: {', '.join(sorted(SOURCES))} (digits, "
                         "mnist1d and gaussian_teacher are made locally)")
    source = SOURCES[name]
    root = Path(root) if root is not None else default_root()
    target = (root / source.folder).resolve()
    unpacked = (root / PurePosixPath(source.unpacked[0]).parts[0]).resolve() if source.archive else target
    if source.archive and all((root / f).is_file() for f in source.unpacked):
        return unpacked
    target.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    for remote in source.files:
        dest = target / remote.name
        if dest.is_file() and _matches(dest, remote.digest):
            continue
        _fetch(remote, dest, list(mirrors) if mirrors else list(source.mirrors), show)
        if source.archive:
            _unpack_tar(dest, root, source.unpacked)
            dest.unlink()
    return unpacked


def _matches(path: Path, digest: str) -> bool:
    algorithm, expected = digest.split(":", 1)
    h = hashlib.new(algorithm, usedforsecurity=False)  # an integrity check, not a signature
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest() == expected


def _fetch(remote: RemoteFile, dest: Path, mirrors: list[str], progress: bool) -> None:
    part = dest.with_name(dest.name + ".part")
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + remote.name
        if not url.startswith(("http://", "https://")):
            failures.append(f"{url}: only http and https mirrors are used")
            continue
        for attempt in range(ATTEMPTS):
            try:
                _transfer(url, part, remote, progress)
            except urllib.error.HTTPError as e:
                if e.code == 416:  # the .part already holds every byte (or more): verify it below
                    pass
                else:
                    failures.append(f"{url}: HTTP {e.code} {e.reason}")
                    break  # a 404 (or any refusal) will not change on a retry: next mirror
            except (urllib.error.URLError, OSError, TimeoutError) as e:  # a dead connection or a cut transfer
                reason = getattr(e, "reason", e)
                if attempt == ATTEMPTS - 1:
                    failures.append(f"{url}: {reason} ({ATTEMPTS} tries, resuming each time)")
                    break
                time.sleep(0.2 * (attempt + 1))
                continue
            if _matches(part, remote.digest):
                os.replace(part, dest)
                return
            failures.append(f"{url}: the file's {remote.digest.split(':')[0]} is not the published "
                            f"{remote.digest.split(':')[1]} (a corrupt or different file; discarded)")
            part.unlink()
            break
    raise DownloadError(f"{remote.name}: no mirror delivered the official file; " + "; ".join(failures)
                        + f". Nothing was written to {dest}; put the file there yourself, or try again later")


def _transfer(url: str, part: Path, remote: RemoteFile, progress: bool) -> None:
    """Download ``url`` into ``part``, resuming after the bytes already there; raises OSError if the
    connection ends before the announced length."""
    have = part.stat().st_size if part.exists() else 0
    if remote.size is not None and have > remote.size:  # cannot be a prefix of the file: start over
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": "backproplab",
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        mode = "ab" if resumed else "wb"
        got = 0
        total = (have if resumed else 0) + expected if expected is not None else None
        with open(part, mode) as f, tqdm(total=total, initial=have if resumed else 0, unit="B", unit_scale=True,
                                         desc=remote.name, disable=not progress, file=sys.stderr) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                got += len(block)
                bar.update(len(block))
        if expected is not None and got < expected:
            raise OSError(f"connection closed after {got} of {expected} bytes")


def _unpack_tar(archive: Path, root: Path, expected: tuple[str, ...]) -> None:
    """Unpack the regular files of ``archive`` that lie under the expected folder; any other member (a
    link, a device, an absolute path, ``..``) is refused before anything is written."""
    folders = {PurePosixPath(e).parts[0] for e in expected}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = PurePosixPath(m.name).parts
                if (m.name.startswith("/") or ".." in parts or not parts or parts[0] not in folders
                        or not (m.isfile() or m.isdir())):
                    raise tarfile.TarError(f"member {m.name!r} is not a file under {', '.join(sorted(folders))}/")
            for m in members:
                if m.isfile():
                    out = root / m.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    assert src is not None
                    tmp = out.with_name(out.name + ".part")
                    with src, open(tmp, "wb") as f:
                        shutil.copyfileobj(src, f)
                    os.replace(tmp, out)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DownloadError(f"{archive}: cannot unpack ({e}); delete it and run the command again") from None
    except OSError as e:
        if e.errno is not None:  # the file system's own refusal (no space, no permission): as it is
            raise
        raise DownloadError(f"{archive}: cannot unpack ({e}); delete it and run the command again") from None
    missing = [e for e in expected if not (root / e).is_file()]
    if missing:
        raise DownloadError(f"{archive}: the archive lacks {', '.join(missing)}")
