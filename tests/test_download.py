"""Tests for jaxnets.download, without the internet.

A local HTTP server (the standard library's, in a thread, on 127.0.0.1 and a free port)
serves the shared MNIST files under ``mnist/`` and a small CIFAR-10 tarball under
``cifar10/``; per request it can answer normally (with Range support), 404, cut the body
short, stall, or ignore Range. Every test replaces the built-in mirrors with a closed local
port and the default data directory with a temporary one, so nothing here reaches the
internet or a developer's cache.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import time

import numpy as np
import pytest

from jaxnets import data as D
from jaxnets import download as DL
from jaxnets.data import DataError
from test_data import assert_one_line_error, make_cifar

MNIST_NAMES = [f.name for f in DL.FILES["mnist"]]
TARBALL = "cifar-10-python.tar.gz"


# --------------------------------------------------------------------------- the server


class Server:
    """A threaded HTTP server over ``files`` ({url path: bytes}).

    ``plan[path]`` is a list of behaviours, one used up per request (then "ok"): "ok"
    (honours ``Range: bytes=N-`` with a 206), "norange" (ignores Range: 200 and the whole
    file), "404", "truncate" (announces the full length, sends half the body, closes) and
    "stall" (accepts, then sends nothing). ``requests`` logs (path, Range header).
    """

    def __init__(self, files):
        self.files = dict(files)
        self.plan = {}
        self.requests = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                steps = outer.plan.get(self.path)
                behaviour = steps.pop(0) if steps else "ok"
                body = outer.files.get(self.path)
                if behaviour == "stall":
                    outer.release.wait(10)
                    return
                if behaviour == "404" or body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                ranged = self.headers.get("Range")
                if ranged and behaviour != "norange":
                    start, status = int(ranged.removeprefix("bytes=").rstrip("-")), 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                rest = body[start:]
                self.wfile.write(rest[: len(rest) // 2] if behaviour == "truncate" else rest)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def paths(self):
        return [path for path, _ in self.requests]

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url():
    """``http://127.0.0.1:PORT`` with nothing listening there: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="session")
def served(mnist_dir, tmp_path_factory):
    """({url path: bytes} of what the server holds, the CIFAR-10 arrays in the tarball)."""
    files = {f"/mnist/{name}": (mnist_dir / name).read_bytes() for name in MNIST_NAMES}
    src = tmp_path_factory.mktemp("cifar-src")
    arrays = make_cifar(src, n=3)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    files[f"/cifar10/{TARBALL}"] = buf.getvalue()
    return files, arrays


@pytest.fixture
def server(served):
    srv = Server(served[0])
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Built-in mirrors on a closed local port, default data dir in tmp, no JAXNETS_* env."""
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    monkeypatch.delenv(DL.MIRROR_ENV, raising=False)
    monkeypatch.setattr(DL, "DEFAULT_DATA_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setattr(DL, "DIGESTS", str(tmp_path / "digests.json"))
    dead = closed_port_url()
    monkeypatch.setattr(DL, "MIRRORS", {"mnist": (f"{dead}/builtin/mnist/",),
                                        "cifar10": (f"{dead}/builtin/cifar10/",)})
    return dead


def gunzipped_md5(blob):
    return hashlib.md5(gzip.decompress(blob)).hexdigest()


# --------------------------------------------------------------------------- MNIST


def test_clean_download_into_default_cache_then_cache_reuse(server, served, monkeypatch, tmp_path):
    """No data_dir, no env: load_dataset downloads into the default cache; a second load
    reads the cache without a request."""
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    ds = D.load_dataset("mnist")
    folder = tmp_path / "default-cache" / "mnist"
    for name in MNIST_NAMES:
        assert (folder / name).read_bytes() == served[0][f"/mnist/{name}"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_NAMES + [".lock", DL.STAMP])  # no .part
    assert sorted(server.requests) == sorted((f"/mnist/{n}", None) for n in MNIST_NAMES)
    assert ds.source == f"files:{folder}"
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(  # the published class counts of MNIST's training set
        np.bincount(ds.train_labels, minlength=10),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])

    again = D.load_dataset("mnist")
    assert len(server.requests) == 4  # the cache, not the network
    # Checked as downloaded (its stamp), so not compared again, nor warned about.
    assert again.data_files == {str(folder / n): "verified download" for n in MNIST_NAMES}
    assert again.data_warning is None and not (tmp_path / "digests.json").exists()
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)
    # "files" reads the same cache (never downloading); so does the folder named directly
    assert D.load_dataset("mnist", source="files").source == f"files:{folder}"
    assert D.load_dataset("mnist", folder, source="files").source == f"files:{folder}"
    assert len(server.requests) == 4


def test_a_cached_file_changed_after_its_download_is_refused_on_read(server, served, monkeypatch, tmp_path):
    # Issue 26: a cached labels file replaced by another well-formed IDX file (labels shifted
    # by one) trained to 8% test accuracy, recorded as "mnist", with no word.
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    D.load_dataset("mnist")
    path = tmp_path / "default-cache" / "mnist" / "train-labels-idx1-ubyte.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched, same bytes: re-hashed
    assert len(D.load_dataset("mnist").train_labels) == 60000
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[8:] = bytes((b + 1) % 10 for b in raw[8:])
    path.write_bytes(gzip.compress(bytes(raw)))
    # However the folder is reached (the cache, or named directly): checked as a download, an error.
    for kwargs in ({"source": "auto"}, {"source": "files"}, {"data_dir": path.parent, "source": "files"}):
        with pytest.raises(DataError) as e:
            D.load_dataset("mnist", **kwargs)
        assert_one_line_error(e, f"{path}: changed since it was downloaded and verified (checksum mismatch",
                              "delete it and it is downloaded again")
    assert len(server.requests) == 4


def test_only_missing_files_are_fetched(server, served, monkeypatch, tmp_path):
    """A folder with two of the four files (an earlier, interrupted run) gets the other two."""
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    (tmp_path / "mnist").mkdir()
    for name in MNIST_NAMES[:2]:
        (tmp_path / "mnist" / name).write_bytes(served[0][f"/mnist/{name}"])
    D.load_dataset("mnist", tmp_path)
    assert sorted(server.paths()) == sorted(f"/mnist/{n}" for n in MNIST_NAMES[2:])


def test_user_layout_is_never_completed_by_a_download(server, served, monkeypatch, tmp_path):
    """MNIST files directly in data_dir are the user's: one missing is reported, not fetched."""
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    for name in MNIST_NAMES[1:]:
        (tmp_path / name).write_bytes(served[0][f"/mnist/{name}"])
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist", tmp_path)
    assert_one_line_error(e, MNIST_NAMES[0], tmp_path)
    assert server.requests == []


def test_wrong_file_is_rejected_and_removed(server, served, offline, monkeypatch, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    wrong = served[0]["/mnist/train-labels-idx1-ubyte.gz"]  # a valid IDX .gz, but another file
    server.files[f"/mnist/{name}"] = wrong
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    with pytest.raises(DataError) as e:
        DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert_one_line_error(
        e, f"{server.url}/mnist/{name} (checksum mismatch (MD5 of the gunzipped content "
           f"{gunzipped_md5(wrong)}, expected 27ae3e4e09519cfbb04c329615203637); file removed)",
        f"{offline}/builtin/mnist/{name} (connection refused)", "--data-dir", DL.MIRROR_ENV)
    assert [p.name for p in (tmp_path / "mnist").iterdir()] == [".lock"]


def test_recompressed_copy_verifies(server, served, monkeypatch, tmp_path):
    """MNIST is checked on the gunzipped content: a mirror that recompressed still verifies."""
    name = "t10k-labels-idx1-ubyte.gz"
    original = served[0][f"/mnist/{name}"]
    recompressed = gzip.compress(gzip.decompress(original), compresslevel=1, mtime=12345)
    assert recompressed != original
    server.files[f"/mnist/{name}"] = recompressed
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert (tmp_path / "mnist" / name).read_bytes() == recompressed


def test_truncated_transfer_is_resumed_with_range(server, served, monkeypatch, tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    blob = served[0][f"/mnist/{name}"]
    server.plan[f"/mnist/{name}"] = ["truncate"]
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert server.requests == [(f"/mnist/{name}", None),
                               (f"/mnist/{name}", f"bytes={len(blob) // 2}-")]
    assert (tmp_path / "mnist" / name).read_bytes() == blob
    assert not (tmp_path / "mnist" / (name + ".part")).exists()


def test_interrupted_run_leaves_only_a_part_file_then_resumes(server, served, monkeypatch,
                                                              tmp_path):
    """Every answer cut short: the run fails, leaving NAME.part (never NAME); the next run
    resumes from it; a server that ignores Range makes it start over, still verified."""
    name = "t10k-images-idx3-ubyte.gz"
    blob = served[0][f"/mnist/{name}"]
    path = f"/mnist/{name}"
    server.plan[path] = ["truncate"] * (1 + DL.RETRIES)
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    folder = tmp_path / "mnist"
    with pytest.raises(DataError) as e:
        DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert_one_line_error(e, f"{server.url}{path} (connection closed after", "--data-dir")
    kept = (folder / (name + ".part")).stat().st_size
    assert not (folder / name).exists() and 0 < kept < len(blob)
    assert blob.startswith((folder / (name + ".part")).read_bytes())

    del server.requests[:]
    DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert server.requests == [(path, f"bytes={kept}-")]
    assert (folder / name).read_bytes() == blob

    (folder / name).unlink()
    (folder / (name + ".part")).write_bytes(blob[:1000])
    del server.requests[:]
    server.plan[path] = ["norange"]
    DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert server.requests == [(path, "bytes=1000-")]
    assert (folder / name).read_bytes() == blob


def test_404_on_the_mirror_then_the_fallback(server, served, monkeypatch, tmp_path):
    """$JAXNETS_MIRROR is tried first (here: 404), then the built-in list in order."""
    name = "train-labels-idx1-ubyte.gz"
    monkeypatch.setenv(DL.MIRROR_ENV, f"{server.url}/nothing-here/")
    monkeypatch.setitem(DL.MIRRORS, "mnist", (f"{server.url}/also-nothing/", f"{server.url}/mnist/"))
    DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert server.paths() == [f"/nothing-here/mnist/{name}", f"/also-nothing/{name}", f"/mnist/{name}"]
    assert (tmp_path / "mnist" / name).read_bytes() == served[0][f"/mnist/{name}"]


def test_stalled_server_times_out(server, offline, monkeypatch, tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    server.plan[f"/mnist/{name}"] = ["stall"]
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        DL.fetch("mnist", tmp_path, names=[name], timeout=0.3, progress=False)
    assert time.monotonic() - start < 3
    assert_one_line_error(e, f"{server.url}/mnist/{name} (timed out after 0.3 s)",
                          f"{offline}/builtin/mnist/{name} (connection refused)")
    assert not (tmp_path / "mnist" / name).exists()


def test_failed_attempts_stop_at_the_budget(server, monkeypatch, tmp_path):
    """Once `budget` seconds went on failed attempts no new attempt starts."""
    name = "t10k-labels-idx1-ubyte.gz"
    port = server.url.rsplit(":", 1)[1]
    server.plan[f"/mnist/{name}"] = ["stall"]
    server.plan[f"/b/{name}"] = ["stall"]
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    third = closed_port_url()
    # localhost: another host name for the same server (a host that failed is not retried)
    monkeypatch.setitem(DL.MIRRORS, "mnist", (f"http://localhost:{port}/b/", f"{third}/c/"))
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        DL.fetch("mnist", tmp_path, names=[name], timeout=0.4, budget=0.6, progress=False)
    assert time.monotonic() - start < 3
    assert_one_line_error(e, f"{server.url}/mnist/{name} (timed out after 0.4 s)",
                          f"http://localhost:{port}/b/{name} (timed out after 0.",
                          f"{third}/c/{name} (not tried: 0.6 s of failed attempts already)")
    assert server.paths() == [f"/mnist/{name}", f"/b/{name}"]


def test_unreachable_host_is_skipped_for_later_files(server, served, monkeypatch, tmp_path):
    """A mirror that stalled for the first file is not asked for the second."""
    names = ["t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    server.plan[f"/mirror/mnist/{names[0]}"] = ["stall"]
    monkeypatch.setenv(DL.MIRROR_ENV, f"{server.url}/mirror")
    port = server.url.rsplit(":", 1)[1]
    monkeypatch.setitem(DL.MIRRORS, "mnist", (f"http://localhost:{port}/mnist/",))
    DL.fetch("mnist", tmp_path, names=names, timeout=0.3, progress=False)
    assert server.paths() == [f"/mirror/mnist/{names[0]}", f"/mnist/{names[0]}",
                              f"/mnist/{names[1]}"]
    for name in names:
        assert (tmp_path / "mnist" / name).read_bytes() == served[0][f"/mnist/{name}"]


def test_offline_is_one_line_naming_urls_and_files_quickly(offline, monkeypatch):
    """Every URL refused: one line within the bound, naming each URL, its reason, and the
    files to put in --data-dir; the default data dir is used when none is given."""
    mirror = closed_port_url()
    monkeypatch.setenv(DL.MIRROR_ENV, mirror)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist")
    assert time.monotonic() - start < 5
    first = MNIST_NAMES[0]
    assert_one_line_error(e, f"{mirror}/mnist/{first} (connection refused)",
                          f"{offline}/builtin/mnist/{first} (connection refused)",
                          DL.data_root() / "mnist", "--data-dir", DL.MIRROR_ENV, *MNIST_NAMES)
    assert "yann.lecun.com" not in str(e.value)  # it refuses downloads (docs/data.md): no place to send anyone


def test_data_dir_is_created_only_under_a_parent_that_exists(server, monkeypatch, tmp_path):
    """A typo'd --data-dir grows no tree of directories (issue 27); one new level is fine."""
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist", tmp_path / "no" / "such" / "dir")
    assert_one_line_error(e, f"data directory {tmp_path / 'no' / 'such' / 'dir'} does not exist, nor does its "
                             f"parent", "mkdir -p", "--data-dir")
    assert not (tmp_path / "no").exists() and server.requests == []
    DL.fetch("mnist", tmp_path / "new", names=[MNIST_NAMES[1]], progress=False)
    assert (tmp_path / "new" / "mnist" / MNIST_NAMES[1]).is_file()


def test_sizes_are_in_one_unit_style():
    assert [DL._size(n) for n in (None, 999, 28_881, 1_648_877, 170_498_071)] == [
        "?", "999 bytes", "28.9 kB", "1.6 MB", "170.5 MB"]


def test_unwritable_data_dir_is_a_clear_error(server, monkeypatch, tmp_path):
    """Tests run as root, so 'unwritable' is a file standing where a directory must be."""
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError) as e:
        DL.fetch("mnist", blocker / "cache", progress=False)
    assert_one_line_error(e, "cannot create the data directory", blocker / "cache" / "mnist",
                          "--data-dir", D.DATA_DIR_ENV)
    with pytest.raises(DataError) as e:
        D.load_dataset("mnist", blocker)
    assert_one_line_error(e, blocker, "not a directory")
    assert server.requests == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_is_a_clear_error(server, monkeypatch, tmp_path):
    """NAME.part made a link to /dev/full, where every write fails with ENOSPC."""
    name = "t10k-labels-idx1-ubyte.gz"
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    (tmp_path / "mnist").mkdir()
    part = tmp_path / "mnist" / (name + ".part")
    part.symlink_to("/dev/full")
    with pytest.raises(DataError) as e:
        DL.fetch("mnist", tmp_path, names=[name], progress=False)
    assert_one_line_error(e, f"{server.url}/mnist/{name} (disk full writing {part}",
                          "No space left on device", "--data-dir")
    assert not part.is_symlink() and not (tmp_path / "mnist" / name).exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        DL.fetch("imagenet")
    with pytest.raises(ValueError, match="no file"):
        DL.fetch("mnist", names=["train-images.gz"])
    with pytest.raises(ValueError, match="MD5"):
        DL.fetch("cifar10", checksums={TARBALL: "abc"})


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_download_with_injected_checksum(server, served, monkeypatch, tmp_path):
    """The test tarball is not the official one: its own MD5 is injected; the official MD5
    rejects it."""
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    blob = served[0][f"/cifar10/{TARBALL}"]
    with pytest.raises(DataError) as e:
        D.load_dataset("cifar10", tmp_path)
    assert_one_line_error(e, "c58f30108f718f92721af3b95e74349a", hashlib.md5(blob).hexdigest(),
                          "cifar-10-batches-py")
    assert not (tmp_path / "cifar10" / TARBALL).exists()

    monkeypatch.setitem(DL.FILES, "cifar10", (
        DL.RemoteFile(TARBALL, md5=hashlib.md5(blob).hexdigest(), sha256=None, gunzipped=False),))
    ds = D.load_dataset("cifar10", tmp_path)
    assert (tmp_path / "cifar10" / TARBALL).read_bytes() == blob
    assert ds.source == f"files:{tmp_path / 'cifar10' / TARBALL}"
    tx, ty, sx, sy = served[1]
    np.testing.assert_array_equal(ds.train_images, tx)
    np.testing.assert_array_equal(ds.train_labels, ty)
    np.testing.assert_array_equal(ds.test_images, sx)
    np.testing.assert_array_equal(ds.test_labels, sy)

    # the fetch argument does the same; a SHA-256 works as well as an MD5
    DL.fetch("cifar10", tmp_path / "other", progress=False,
             checksums={TARBALL: hashlib.sha256(blob).hexdigest()})
    assert (tmp_path / "other" / "cifar10" / TARBALL).read_bytes() == blob


def test_a_hanging_lookup_is_bounded_too(monkeypatch, tmp_path):
    """urlopen stuck before any socket exists (a DNS lookup that hangs, which socket
    timeouts do not cover) still ends after `timeout`."""

    def hang(request, timeout):
        time.sleep(2)
        raise OSError("late")

    monkeypatch.setattr(DL.urllib.request, "urlopen", hang)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        DL.fetch("mnist", tmp_path, names=["t10k-labels-idx1-ubyte.gz"], timeout=0.3,
                 progress=False)
    assert time.monotonic() - start < 1.5
    assert_one_line_error(e, "(timed out after 0.3 s)")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_only_on_a_terminal(server, monkeypatch, tmp_path, terminal):
    name = "t10k-images-idx3-ubyte.gz"
    monkeypatch.setenv(DL.MIRROR_ENV, server.url)
    err = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    DL.fetch("mnist", tmp_path, names=[name])
    text = err.getvalue()
    if terminal:  # tqdm redraws its bar with carriage returns
        assert "\r" in text and name in text and "downloading" not in text
    else:  # a log gets one line per file
        assert text == (f"jaxnets: downloading {server.url}/mnist/{name} (1.6 MB) -> "
                        f"{tmp_path / 'mnist' / name}\n")
