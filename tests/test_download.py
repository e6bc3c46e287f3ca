"""`backproplab data get` against an HTTP server this test starts on 127.0.0.1: tiny files in the official
formats, served plainly, after a 404, through a redirect, cut halfway (then resumed with a Range request),
altered (a wrong digest), and a hostile archive. The loaders must read what was fetched."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest
import torch
from test_reliability import _cifar, _idx

from backproplab import download
from backproplab.cli import main
from backproplab.data import DataNotFoundError, load_dataset

# runs experiments, the CLI or a local server: not in the fast tier (make test-fast)
pytestmark = pytest.mark.medium


class _Server:
    """Serves ``files`` (name -> bytes) under several behaviours, chosen by the first path segment:
    /good/, /missing/ (404), /moved/ (302 to /good/), /cut/ (the first response of each file stops
    halfway; Range requests are honoured, as by the official mirrors), /altered/ (one byte changed)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.cut_done = files, [], set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                _, mode, name = self.path.split("/", 2)
                if mode == "moved":
                    self.send_response(302)
                    self.send_header("Location", f"/good/{name}")
                    self.end_headers()
                    return
                if mode == "missing" or name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                if mode == "altered":
                    body = body[:-1] + bytes([body[-1] ^ 1])
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "cut" and name not in server.cut_done:
                    server.cut_done.add(name)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tiny_mnist(tmp_path):
    """The four official .gz IDX files of a 12 + 5 image MNIST, as bytes."""
    folder = tmp_path / "make"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 12),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5)}
    files = {}
    for stem, arr in arrays.items():
        _idx(folder / f"{stem}.gz", arr, gz=True)
        files[f"{stem}.gz"] = (folder / f"{stem}.gz").read_bytes()
    return files, arrays


@pytest.fixture
def mnist_server(tmp_path, monkeypatch):
    files, arrays = _tiny_mnist(tmp_path)
    source = download.SOURCES["mnist"]
    monkeypatch.setitem(download.SOURCES, "mnist", dataclasses.replace(source, files=tuple(
        download.RemoteFile(f.name, _sha256(files[f.name])) for f in source.files)))
    server = _Server(files)
    yield server, files, arrays
    server.close()


def _get(root, *mirrors, dataset="mnist"):
    return main(["data", "get", dataset, "--root", str(root), "--no-progress",
                 *[a for m in mirrors for a in ("--mirror", m)]])


def test_get_skips_a_404_mirror_and_the_loader_reads_the_files(tmp_path, mnist_server, capsys):
    server, files, arrays = mnist_server
    root = tmp_path / "data"
    assert _get(root, f"{server.url}/missing/", f"{server.url}/good/") == 0
    assert capsys.readouterr().out.strip() == f"mnist: {root.resolve() / 'mnist'}"
    for name, body in files.items():
        assert (root / "mnist" / name).read_bytes() == body
    d = load_dataset("mnist", root=root, unit_range=True)
    assert torch.equal(d.x_train[:, 0] * 255, torch.as_tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32))
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert [p for p, _ in server.requests].count("/missing/train-images-idx3-ubyte.gz") == 1  # no retry of a 404
    server.requests.clear()
    assert _get(root, f"{server.url}/good/") == 0 and server.requests == []  # files with the digest are kept


def test_get_follows_a_redirect(tmp_path, mnist_server):
    server, files, _ = mnist_server
    assert _get(tmp_path, f"{server.url}/moved/") == 0
    assert all((tmp_path / "mnist" / n).read_bytes() == b for n, b in files.items())
    assert ("/good/t10k-labels-idx1-ubyte.gz", None) in server.requests


def test_a_cut_download_resumes_where_it_stopped(tmp_path, mnist_server):
    server, files, _ = mnist_server
    assert _get(tmp_path, f"{server.url}/cut/") == 0
    name = "train-images-idx3-ubyte.gz"
    assert (tmp_path / "mnist" / name).read_bytes() == files[name]
    ranges = [r for p, r in server.requests if p == f"/cut/{name}"]
    assert ranges == [None, f"bytes={len(files[name]) // 2}-"]  # the second request asks only for the rest
    assert not list(tmp_path.rglob("*.part"))


def test_a_wrong_digest_is_never_kept_and_the_next_mirror_is_tried(tmp_path, mnist_server, capsys):
    server, files, _ = mnist_server
    assert _get(tmp_path / "a", f"{server.url}/altered/") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("backproplab: error: train-images-idx3-ubyte.gz: no mirror")
    assert "sha256 is not the published" in err[0] and "Traceback" not in err[0]
    assert not [p for p in (tmp_path / "a").rglob("*") if p.is_file()]  # nothing half-written, no .part
    assert _get(tmp_path / "b", f"{server.url}/altered/", f"{server.url}/good/") == 0
    assert all((tmp_path / "b" / "mnist" / n).read_bytes() == b for n, b in files.items())


def test_every_mirror_failing_is_one_line_naming_each(tmp_path, mnist_server, capsys):
    server, _, _ = mnist_server
    assert _get(tmp_path, f"{server.url}/missing/", "http://127.0.0.1:1/") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 404" in err[0] and "127.0.0.1:1/train-images-idx3-ubyte.gz" in err[0]


def _serve_dataset(tmp_path, monkeypatch, name, files):
    source = download.SOURCES[name]
    monkeypatch.setitem(download.SOURCES, name, dataclasses.replace(source, files=tuple(
        dataclasses.replace(f, digest=_sha256(files[f.name]), size=len(files[f.name])) for f in source.files)))
    return _Server(files)


def _cifar_archive(tmp_path, extra: tuple[str, bytes] | None = None) -> bytes:
    _cifar(tmp_path / "make" / "cifar-10-batches-py")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "make" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra is not None:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            tar.addfile(info, io.BytesIO(extra[1]))
    return buf.getvalue()


def test_cifar10_is_unpacked_where_the_loader_reads_it(tmp_path, monkeypatch):
    server = _serve_dataset(tmp_path, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": _cifar_archive(tmp_path)})
    try:
        assert _get(tmp_path / "data", f"{server.url}/good/", dataset="cifar10") == 0
    finally:
        server.close()
    d = load_dataset("cifar10", root=tmp_path / "data")
    assert d.x_train.shape == (15, 3, 32, 32) and not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()


def test_an_archive_member_outside_the_dataset_folder_is_refused(tmp_path, monkeypatch, capsys):
    archive = _cifar_archive(tmp_path, extra=("../escaped", b"not yours"))
    server = _serve_dataset(tmp_path, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": archive})
    try:
        assert _get(tmp_path / "data", f"{server.url}/good/", dataset="cifar10") == 1
    finally:
        server.close()
    err = capsys.readouterr().err
    assert "'../escaped' is not a file under cifar-10-batches-py/" in err and "Traceback" not in err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_svhn_and_fashion_mnist_land_where_their_loaders_read(tmp_path, monkeypatch):
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    svhn = {}
    for split, n in (("train", 4), ("test", 2)):
        buf = io.BytesIO()
        savemat(buf, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                      "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
        svhn[f"{split}_32x32.mat"] = buf.getvalue()
    source = download.SOURCES["svhn"]  # SVHN's digests are MD5: check that path too
    monkeypatch.setitem(download.SOURCES, "svhn", dataclasses.replace(source, files=tuple(
        dataclasses.replace(f, digest="md5:" + hashlib.md5(svhn[f.name]).hexdigest(), size=len(svhn[f.name]))
        for f in source.files)))
    fashion, _ = _tiny_mnist(tmp_path)
    source = download.SOURCES["fashion_mnist"]
    monkeypatch.setitem(download.SOURCES, "fashion_mnist", dataclasses.replace(source, files=tuple(
        dataclasses.replace(f, digest=_sha256(fashion[f.name])) for f in source.files)))
    server = _Server({**svhn, **fashion})
    try:
        assert _get(tmp_path, f"{server.url}/good/", dataset="svhn") == 0
        assert _get(tmp_path, f"{server.url}/good/", dataset="fashion_mnist") == 0
    finally:
        server.close()
    assert load_dataset("svhn", root=tmp_path).x_train.shape == (4, 3, 32, 32)
    assert load_dataset("fashion_mnist", root=tmp_path).x_test.shape == (5, 1, 28, 28)


def test_the_published_digests_are_well_formed_and_a_missing_dataset_names_the_command(tmp_path):
    for name, source in download.SOURCES.items():
        for f in source.files:
            algorithm, hexdigest = f.digest.split(":")
            assert len(hexdigest) == hashlib.new(algorithm).digest_size * 2 and int(hexdigest, 16) >= 0, name
    with pytest.raises(DataNotFoundError, match=f"backproplab data get mnist --root {tmp_path}"):
        load_dataset("mnist", root=tmp_path)

