"""Download MNIST's and CIFAR-10's standard files, with the standard library's urllib.

The files are the ones :mod:`jaxnets.data` reads: MNIST's four IDX ``.gz`` files and
CIFAR-10's ``cifar-10-python.tar.gz``. They go to ``<data dir>/mnist/`` and
``<data dir>/cifar10/``, where the data dir is the ``data_dir`` argument, else
``$JAXNETS_DATA_DIR``, else ``~/.cache/jaxnets/data`` (:func:`data_root`).

Where each file is looked for, in order (the first copy that verifies wins):

1. ``$JAXNETS_MIRROR`` when set: ``$JAXNETS_MIRROR/mnist/train-images-idx3-ubyte.gz``, ...,
   ``$JAXNETS_MIRROR/cifar10/cifar-10-python.tar.gz`` (a company mirror, a local server).
2. The built-in copies, :data:`MIRRORS`. MNIST: PyTorch's (torchvision's first mirror) and
   Google's CVDF copy (the one tensorflow-datasets downloads); the original page,
   http://yann.lecun.com/exdb/mnist/, is not tried, as it often refuses downloads.
   CIFAR-10: its home at the University of Toronto (torchvision's and Keras's source) and
   PaddlePaddle's copy (``paddle.vision.datasets.Cifar10``, published with the same MD5).

How a file is fetched:

* It is written to ``NAME.part`` and renamed to ``NAME`` only once complete and verified, so
  an interrupted download never leaves a file that looks complete. A ``.part`` left behind
  is resumed with an HTTP ``Range`` request where the server allows it (``206``), else
  downloaded again; a connection dropped mid-file is resumed the same way (twice at most,
  and only while bytes keep coming).
* Verification: MNIST's MD5 and SHA-256 are of the *gunzipped* content (the MD5s are the
  widely published ones of the uncompressed originals), so a mirror that recompressed the
  ``.gz`` still verifies; CIFAR-10's are of the tarball itself. A file that fails is deleted.
* A failing network costs little time: each attempt gets :data:`TIMEOUT` seconds (DNS
  lookup, connection and each wait for data alike), a host that could not be reached is not
  tried again for the other files, and once :data:`BUDGET` seconds have gone on failed
  attempts no new one starts. Then one :class:`~jaxnets.data.DataError` line names every URL
  tried with its reason (DNS, no route, refused, timeout, HTTP status, checksum mismatch,
  disk full, unwritable directory) and what to do instead.
* Checked on every read: each verified file's size and mtime are stamped in
  ``.verified.json``; :func:`check_cache` (called by ``load_dataset``) re-hashes a file only
  when either changed, and refuses one that no longer matches (naming it and what to
  delete). Files jaxnets did not download (a ``--data-dir`` of the user's) are compared
  with the published MD5s by :class:`CopyChecks` (of what was read: MNIST's decompressed
  IDX content, CIFAR-10's batch files, extracted or inside the tarball): a difference is
  a warning, not an error (people train on modified copies on purpose). Their MD5s are
  remembered in :data:`DIGESTS` by path, size and mtime, so an unchanged file costs a
  stat on the next read instead of a hash.
* A progress bar (tqdm) is shown when stderr is a terminal; otherwise one line per file.
* Concurrent processes fetching into the same folder take turns (a lock file, ``.lock``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import http.client
import json
import os
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from .errors import DATA_DIR_ENV, DataError, one_line as _one_line

__all__ = [
    "BUDGET",
    "CIFAR10_BATCH_MD5",
    "CopyChecks",
    "DEFAULT_DATA_DIR",
    "DIGESTS",
    "FILES",
    "MIRRORS",
    "MIRROR_ENV",
    "RemoteFile",
    "TIMEOUT",
    "data_root",
    "fetch",
    "file_urls",
    "published_md5",
]

#: Environment variable naming a mirror tried before the built-in URLs.
MIRROR_ENV = "JAXNETS_MIRROR"
#: Where files are kept when neither ``data_dir`` nor ``$JAXNETS_DATA_DIR`` is given.
DEFAULT_DATA_DIR = "~/.cache/jaxnets/data"
#: Seconds an attempt may wait: for an answer (DNS, connection, headers) and for each read.
TIMEOUT = 10.0
#: Seconds of failed attempts after which no new attempt starts (bounds the offline case).
BUDGET = 15.0
#: Resumed retries of one URL whose connection dropped mid-file (each must bring bytes).
RETRIES = 2
_CHUNK = 1 << 18


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One standard file and its checksums.

    Attributes:
        name: the file's name, the same on every mirror.
        md5: hex MD5 of the content that is checked.
        sha256: hex SHA-256 of the same content (None where none is published).
        gunzipped: the checksums are of the gunzipped content (MNIST), not of the file.
    """

    name: str
    md5: str | None
    sha256: str | None
    gunzipped: bool


#: The files of each dataset, checksums included.
FILES = {
    "mnist": (
        RemoteFile("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb",
                   "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db", True),
        RemoteFile("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624",
                   "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5", True),
        RemoteFile("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea",
                   "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7", True),
        RemoteFile("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637",
                   "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2", True),
    ),
    # The SHA-256 is the one Keras's cifar10.load_data checks.
    "cifar10": (
        RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                   "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", False),
    ),
}

#: The published MD5 of each CIFAR-10 python batch, as extracted from
#: ``cifar-10-python.tar.gz`` (the list torchvision's ``CIFAR10`` checks). MNIST's are in
#: :data:`FILES` (of the decompressed IDX content, so they hold for a ``.gz`` or not).
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

#: Built-in folder URLs of each dataset's files, tried in order after ``$JAXNETS_MIRROR``.
MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/",
        "https://dataset.bj.bcebos.com/cifar/",
    ),
}

_LABEL = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
#: Where a person fetches the files by hand (MNIST's original page refuses downloads).
_HOME = {"mnist": MIRRORS["mnist"][0], "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html"}


# --------------------------------------------------------------------------- public API


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$JAXNETS_DATA_DIR``, else
    :data:`DEFAULT_DATA_DIR` (``~`` expanded)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen if chosen is not None else DEFAULT_DATA_DIR).expanduser()


def file_urls(dataset: str, name: str) -> list[str]:
    """Where ``name`` of ``dataset`` is looked for, in order: ``$JAXNETS_MIRROR/<dataset>/name``
    (when the variable is set), then each of :data:`MIRRORS` ``[dataset]`` + ``name``."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    urls = [f"{mirror.rstrip('/')}/{dataset}/{name}"] if mirror else []
    return urls + [base + name for base in MIRRORS[dataset]]


def fetch(dataset: str, data_dir: str | os.PathLike | None = None, *, names=None,
          checksums=None, timeout: float = TIMEOUT, budget: float = BUDGET,
          progress: bool | None = None) -> Path:
    """Make sure the standard files of ``dataset`` are in ``data_root(data_dir)/dataset/``.

    Files already there are left alone (they were verified before they got their name);
    the others are downloaded and verified as the module docstring describes.

    Args:
        dataset: ``"mnist"`` or ``"cifar10"``.
        data_dir: the data directory (see :func:`data_root`); created when missing, but
            only under a parent that exists (the default one with its parents).
        names: the file names to fetch (default: all of the dataset's, :data:`FILES`).
        checksums: optional ``{file name: hex digest}`` replacing a file's built-in
            checksums: 32 hex digits is an MD5, 64 a SHA-256 (of the gunzipped content for
            MNIST, of the file for CIFAR-10).
        timeout: seconds an attempt may wait for an answer, and for each read.
        budget: seconds of failed attempts after which no new attempt starts.
        progress: show a progress bar; None (default) shows one when stderr is a terminal
            and prints one line per file otherwise; False prints nothing.

    Returns:
        The folder holding the files, ``data_root(data_dir) / dataset``.

    Raises:
        ValueError: unknown dataset, file name or checksum format.
        DataError: a file could not be fetched (one line: every URL tried and why, and
            what to do), or the directory cannot be written.
    """
    if dataset not in FILES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(FILES)}")
    known = {f.name: f for f in FILES[dataset]}
    wanted = list(known) if names is None else list(names)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"{dataset} has no file {unknown[0]!r}; its files: {', '.join(known)}")
    checksums = dict(checksums or {})
    if set(checksums) - set(known):
        raise ValueError(f"checksums for unknown {dataset} files: "
                         f"{', '.join(sorted(set(checksums) - set(known)))}")
    expected = {n: _expected(known[n], checksums.get(n)) for n in wanted}

    root = data_root(data_dir)
    folder = root / dataset
    if not root.exists() and not root.parent.exists() and root != Path(DEFAULT_DATA_DIR).expanduser():
        # A typo'd --data-dir would otherwise grow a tree of new directories and a download.
        raise DataError(f"data directory {root} does not exist, nor does its parent {root.parent}: "
                        f"create it (mkdir -p {root}) or pass an existing --data-dir DIR")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {folder} ({_os_reason(e)}); "
                        f"{_writable_fix()}") from None
    attempts = _Attempts(timeout, budget)
    with _lock(folder):
        for name in wanted:
            dest = folder / name
            if not dest.is_file():  # (again: another process may have fetched it meanwhile)
                _fetch_file(dataset, known[name], dest, expected[name], attempts, progress)
    return folder


# --------------------------------------------------------------------------- one file


class _Failed(Exception):
    """One attempt at one URL failed; ``reason`` is a short phrase for the error line.

    ``unreachable``: the host gave no HTTP answer (not tried again in this fetch);
    ``progressed``: bytes arrived before the failure (worth resuming);
    ``maybe_complete``: the server says the kept ``.part`` already has every byte (416).
    """

    def __init__(self, reason, *, unreachable=False, progressed=False, maybe_complete=False):
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable
        self.progressed = progressed
        self.maybe_complete = maybe_complete


class _Attempts:
    """The bounds shared by every attempt of one fetch: unreachable hosts, time spent."""

    def __init__(self, timeout, budget):
        self.timeout = float(timeout)
        self.budget = float(budget)
        self.spent = 0.0  # seconds spent in failed attempts
        self.dead_hosts = set()

    def skip_reason(self, url):
        if _host(url) in self.dead_hosts:
            return "not tried: host unreachable above"
        if self.spent >= self.budget:
            return f"not tried: {self.budget:g} s of failed attempts already"
        return None

    def attempt_timeout(self):
        """The timeout of the next attempt: never past the budget, at least 0.1 s."""
        return max(0.1, min(self.timeout, self.budget - self.spent))

    def failed(self, url, started, failure):
        self.spent += time.monotonic() - started
        if failure.unreachable:
            self.dead_hosts.add(_host(url))


def _fetch_file(dataset, remote, dest, expected, attempts, progress):
    part = dest.with_name(dest.name + ".part")
    tried = []
    for url in file_urls(dataset, remote.name):
        reason = attempts.skip_reason(url)
        if reason is None:
            reason = _try_url(dataset, url, part, dest, remote, expected, attempts, progress)
            if reason is None:
                return
        tried.append((url, reason))
    raise DataError(_failure_line(dataset, dest, tried))


def _try_url(dataset, url, part, dest, remote, expected, attempts, progress):
    """Download ``url`` into ``part``, verify it and rename it to ``dest``.

    Returns None on success, else the reason this URL failed.
    """
    retries = 0
    restarted = False  # a resumed file that failed verification gets one fresh download
    while True:
        started = time.monotonic()
        resumed = part.is_file() and part.stat().st_size > 0
        try:
            _transfer(dataset, url, part, dest, attempts, progress)
        except _Failed as failure:
            attempts.failed(url, started, failure)
            if failure.maybe_complete:
                pass  # verify what we have below
            elif failure.progressed and retries < RETRIES:
                retries += 1
                continue
            else:
                return failure.reason
        problem = _verify(part, remote, expected)
        if problem is None:
            os.replace(part, dest)
            _stamp(dest, expected)
            return None
        _unlink(part)
        if resumed and not restarted:
            # The kept bytes may have come from another copy (MNIST mirrors compress
            # differently), so the mix fails; a download from the start settles it.
            restarted = True
            continue
        return f"{problem}; file removed"


def _transfer(dataset, url, part, dest, attempts, progress):
    """One HTTP request for ``url``, appended to ``part`` (resumed with Range when it
    exists). Raises :class:`_Failed` for network trouble and DataError for disk trouble."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": f"jaxnets (Python-urllib/{sys.version_info[0]}.{sys.version_info[1]})"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    timeout = attempts.attempt_timeout()
    try:
        response = _open(urllib.request.Request(url, headers=headers), timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise _Failed(f"HTTP 416 for bytes {offset}-", maybe_complete=True) from None
        raise _Failed(f"HTTP {e.code} {e.reason}".strip()) from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
        raise _Failed(_net_reason(e, timeout), unreachable=True) from None

    with response:
        if offset and response.status == 206:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                _unlink(part)
                raise _Failed(f"server sent another range ({response.headers.get('Content-Range')})",
                              progressed=True)
        else:
            offset = 0  # a full answer (200): start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        _set_read_timeout(response, attempts.timeout)
        got = offset
        bar = _progress(progress, url, dest, total, offset)
        try:
            with _open_part(part, "ab" if offset else "wb", url, dataset, dest) as out:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Failed(f"{_net_reason(e, attempts.timeout)} after "
                                      f"{_size(got)} of {_size(total)}",
                                      progressed=got > offset) from None
                    if not chunk:
                        break
                    _write(out, chunk, part, url, dataset, dest)
                    got += len(chunk)
                    bar.update(len(chunk))
                _write(out, None, part, url, dataset, dest)
        finally:
            bar.close()
    if total is not None and got < total:
        raise _Failed(f"connection closed after {_size(got)} of {_size(total)}",
                      progressed=got > offset)


def _open(request, timeout):
    """``urlopen`` in a helper thread, so that the whole wait for an answer, DNS lookup
    included (which socket timeouts do not cover), ends after ``timeout`` seconds."""
    lock = threading.Lock()
    box = {}

    def run():
        try:
            result = urllib.request.urlopen(request, timeout=timeout)
        except BaseException as e:  # handed to the caller
            result = e
        with lock:
            if box.get("abandoned"):
                if not isinstance(result, BaseException):
                    result.close()
                return
            box["result"] = result

    thread = threading.Thread(target=run, name="jaxnets-download", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if "result" not in box:
            box["abandoned"] = True
            raise TimeoutError(f"no answer within {timeout:g} s")
        result = box["result"]
    if isinstance(result, BaseException):
        raise result
    return result


def _set_read_timeout(response, timeout):
    """Give the body's reads the full timeout (the answer may have had a shorter one)."""
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(timeout)


def _verify(path, remote, expected):
    """None if ``path`` matches ``expected`` ({"md5"/"sha256": hex}), else what is wrong."""
    digests = {"md5": hashlib.md5(usedforsecurity=False), "sha256": hashlib.sha256()}
    try:
        with (gzip.open(path, "rb") if remote.gunzipped else open(path, "rb")) as f:
            while chunk := f.read(1 << 20):
                for d in digests.values():
                    d.update(chunk)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        return f"not a complete gzip file ({_one_line(e)})"
    what = " of the gunzipped content" if remote.gunzipped else ""
    for algo, want in expected.items():
        got = digests[algo].hexdigest()
        if got != want:
            return f"checksum mismatch ({algo.upper()}{what} {got}, expected {want})"
    return None


#: In a dataset's download folder: ``{name: {size, mtime_ns, expected}}`` of each file
#: downloaded and verified there, so a read re-verifies only a file that changed since.
STAMP = ".verified.json"


def _stamp(path: Path, expected):
    """Record that ``path`` (just verified against ``expected``) is as downloaded."""
    stamps = _stamps(path.parent)
    st = path.stat()
    stamps[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "expected": expected}
    tmp = path.parent / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamps, indent=1))
    os.replace(tmp, path.parent / STAMP)


def _stamps(folder: Path) -> dict:
    try:
        stamps = json.loads((Path(folder) / STAMP).read_text())
        return stamps if isinstance(stamps, dict) else {}
    except (OSError, ValueError):
        return {}


def check_cache(dataset: str, root: Path):
    """Verify, on read, the files jaxnets downloaded into ``root/dataset/``: a file whose size
    and mtime are as stamped when it was verified passes at the cost of a stat; one that
    changed is hashed again (and re-stamped when it still matches), else a one-line
    DataError naming it and what to delete. Files jaxnets did not download are not checked."""
    folder = Path(root) / dataset
    for name, stamp in _stamps(folder).items():
        _check_stamped(dataset, folder / name, stamp)


def _check_stamped(dataset, path: Path, stamp) -> bool:
    """Whether ``path`` is a download of ``dataset`` stamped in its folder's :data:`STAMP`
    (``stamp``, its entry there), checked: unchanged since (a stat), or hashed again and still
    matching; a DataError naming it when it no longer matches."""
    known = {f.name: f for f in FILES.get(dataset, ())}
    if path.name not in known or not isinstance(stamp, dict) or not path.is_file():
        return False
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) == (stamp.get("size"), stamp.get("mtime_ns")):
        return True
    expected = stamp.get("expected") or _expected(known[path.name], None)
    problem = _verify(path, known[path.name], expected)
    if problem is not None:
        raise DataError(f"{path}: changed since it was downloaded and verified ({problem}); delete it "
                        f"and it is downloaded again")
    _stamp(path, expected)
    return True


def published_md5(dataset: str, name: str) -> str | None:
    """The published MD5 of the content of ``dataset``'s file ``name`` as it is read: an MNIST
    IDX file's decompressed bytes (``name`` with ``.gz`` or without), a CIFAR-10 batch's bytes;
    None for a file that has none."""
    if dataset == "mnist":
        base = name[:-3] if name.endswith(".gz") else name
        return next((f.md5 for f in FILES["mnist"] if f.name == base + ".gz"), None)
    return CIFAR10_BATCH_MD5.get(name) if dataset == "cifar10" else None


#: Where the MD5s of data files jaxnets did not download are remembered (by path, size and
#: mtime), so that an unchanged file of a ``--data-dir`` is hashed once, not on every read.
DIGESTS = "~/.cache/jaxnets/digests.json"
_DIGESTS_KIND = "jaxnets data-file MD5s"


class CopyChecks:
    """The files of one load that jaxnets did not download, compared with the published MD5s.

    :meth:`check` is given each file's content as it was read; :attr:`results` maps each file
    (``path``, or ``tarball:member``) to ``"verified download"`` (checked by :func:`check_cache`),
    ``"published MD5"`` or ``"MD5 X, published Y"``; :meth:`warning` is the one line to show
    when any differs; :meth:`save` (called once the load is done) remembers the new digests in
    :data:`DIGESTS` (a file there that is not jaxnets' own record is left alone, and an
    unwritable one is no error: the next read hashes again). A file not remembered is hashed
    in a helper thread while the load goes on parsing (hashlib releases the GIL), so on a
    machine with a free core its first read costs little more than a later one.
    """

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.results = {}
        self._digests = None  # {key: {"size", "mtime_ns", "md5"}}, read on first use
        self._new = {}
        self._where = {}  # label -> (the folder or tarball it is in, its name)
        self._pending = []  # (label, key, stat, published MD5, future MD5) hashed in the helper thread
        self._pool = None

    def check(self, path, content: bytes, member: str | None = None):
        path = Path(path)
        name = member or path.name
        label = f"{path}:{member}" if member else str(path)
        want = published_md5(self.dataset, name)
        if want is None:
            return
        self._where[label] = (str(path) if member else str(path.parent), name)
        try:
            st = path.stat()
        except OSError:
            return  # read just now; gone since: the next read says so
        if _check_stamped(self.dataset, path, _stamps(path.parent).get(path.name)):
            self.results[label] = "verified download"  # however its folder was reached: checked as one
            return
        key = f"{path.resolve()}:{member}" if member else str(path.resolve())
        seen = self._known().get(key)
        if isinstance(seen, dict) and (seen.get("size"), seen.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) \
                and isinstance(seen.get("md5"), str):
            got = seen["md5"]
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(1, thread_name_prefix="jaxnets-md5")
            md5 = lambda data=content: hashlib.md5(data, usedforsecurity=False).hexdigest()
            self._pending.append((label, key, st, want, self._pool.submit(md5)))
            return
        self._result(label, got, want)

    def _result(self, label, got, want):
        self.results[label] = "published MD5" if got == want else f"MD5 {got}, published {want}"

    def _collect(self):
        """The helper thread's MD5s, in the order the files were read."""
        for label, key, st, want, future in self._pending:
            got = future.result()
            self._new[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": got}
            self._result(label, got, want)
        self.results = {label: self.results[label] for label in self._where if label in self.results}
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def differing(self) -> list:
        return [label for label, r in self.results.items() if r.startswith("MD5 ")]

    def warning(self) -> str | None:
        """One line naming the files that differ from the published MD5s, or None."""
        differ = self.differing()
        if not differ:
            return None
        folders = sorted({self._where[label][0] for label in differ})
        names = [self._where[label][1] for label in differ]
        return (f"{len(differ)} of {len(self.results)} {_LABEL[self.dataset]} files in {', '.join(folders)} differ "
                f"from the published MD5s ({', '.join(names)}): read as they are, as a modified copy (a run records "
                f"their MD5s in config.json's data_files)")

    def _known(self) -> dict:
        if self._digests is None:
            record = _digest_record()
            self._digests = record.get("files", {}) if isinstance(record, dict) else {}
        return self._digests

    def save(self):
        self._collect()
        if not self._new:
            return
        record = _digest_record()
        if record is None:
            return  # a file there that is not ours: left alone
        files = record.get("files", {})
        files.update(self._new)
        path = Path(DIGESTS).expanduser()
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"kind": _DIGESTS_KIND, "files": files}))
            os.replace(tmp, path)
        except OSError:
            _unlink(tmp)  # (a read-only home: the next read hashes again)
        self._new = {}


def _digest_record():
    """The record in :data:`DIGESTS`: ``{"kind", "files"}``; an empty one when there is none
    (or it is damaged jaxnets JSON); None when the file there is not jaxnets' record."""
    path = Path(DIGESTS).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {"kind": _DIGESTS_KIND, "files": {}}
    except (OSError, UnicodeDecodeError):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"kind": _DIGESTS_KIND, "files": {}} if text.startswith('{"kind": "' + _DIGESTS_KIND) else None
    if not isinstance(record, dict) or record.get("kind") != _DIGESTS_KIND:
        return None
    if not isinstance(record.get("files"), dict):
        record["files"] = {}
    return record


def _expected(remote, override):
    """The checksums to check: the built-in ones, or the one digest given instead."""
    if override is None:
        return {k: v for k, v in (("md5", remote.md5), ("sha256", remote.sha256)) if v}
    digest = str(override).lower()
    algo = {32: "md5", 64: "sha256"}.get(len(digest))
    if algo is None or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"checksum for {remote.name} must be an MD5 (32 hex digits) or a "
                         f"SHA-256 (64), got {override!r}")
    return {algo: digest}


# --------------------------------------------------------------------------- disk


@contextlib.contextmanager
def _open_part(part, mode, url, dataset, dest):
    try:
        f = open(part, mode)
    except OSError as e:
        raise _disk_error(e, part, url, dataset, dest) from None
    with f:
        yield f


def _write(out, chunk, part, url, dataset, dest):
    """Write ``chunk`` (None: flush to disk); a full or unwritable disk ends the fetch."""
    try:
        if chunk is None:
            out.flush()
            os.fsync(out.fileno())
        else:
            out.write(chunk)
    except OSError as e:
        raise _disk_error(e, part, url, dataset, dest) from None


def _disk_error(e, part, url, dataset, dest):
    full = e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if full:
        _unlink(part)  # useless until space is freed, and it holds space
    reason = f"disk full writing {part}" if full else f"cannot write {part}"
    return DataError(_failure_line(dataset, dest, [(url, f"{reason}: {_os_reason(e)}")],
                                   fix=_writable_fix()))


@contextlib.contextmanager
def _lock(folder):
    """Hold ``folder/.lock`` exclusively (POSIX), so two processes never write one file."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    try:
        handle = open(folder / ".lock", "a")
    except OSError as e:
        raise DataError(f"cannot write in the data directory {folder} ({_os_reason(e)}); "
                        f"{_writable_fix()}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"jaxnets: waiting for another process downloading into {folder}",
                  file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _unlink(path):
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# --------------------------------------------------------------------------- messages


def _failure_line(dataset, dest, tried, fix=None):
    """The one-line error: every URL tried with its reason, then what to do instead."""
    attempts = ", ".join(f"{url} ({reason})" for url, reason in tried) or "no URL to try"
    if fix is None:
        files = (f"the files {', '.join(f.name for f in FILES[dataset])}" if dataset == "mnist"
                 else f"the file {dest.name} (or its extracted cifar-10-batches-py/)")
        fix = (f"connect to the internet, or set {MIRROR_ENV} to a mirror holding "
               f"{dataset}/{dest.name}, or pass --data-dir DIR holding {files} "
               f"(from {_HOME[dataset]})")
    return (f"could not download {_LABEL[dataset]} file {dest.name} into {dest.parent}: "
            f"tried {attempts}. To fix: {fix}")


def _writable_fix():
    return (f"pass --data-dir DIR (or set {DATA_DIR_ENV}) to a writable directory with free "
            f"space")


def _net_reason(e, timeout):
    """A short phrase for a network failure: DNS, no route, refused, timeout, TLS, ..."""
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    if isinstance(e, socket.gaierror):
        return f"DNS lookup failed: {e.strerror or e}"
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
        return f"timed out after {timeout:g} s"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {_one_line(e)}"
    if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"no route to host: {e.strerror}"
    if isinstance(e, (ConnectionError, http.client.HTTPException)):
        return f"connection lost: {type(e).__name__}"
    return _one_line(e)


def _os_reason(e):
    return e.strerror or _one_line(e)


def _host(url):
    return urllib.parse.urlsplit(url).netloc


def _size(n):
    """Bytes in decimal units, as the docs and the progress bar give them: 28.9 kB, 9.9 MB."""
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} bytes"


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(progress, url, dest, total, initial):
    """A tqdm bar on a terminal; otherwise one line (progress None) or nothing (False)."""
    show = sys.stderr.isatty() if progress is None else progress
    if show:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1000,
                    desc=dest.name, file=sys.stderr, leave=False)
    if progress is None:
        more = f" (resuming at {_size(initial)})" if initial else ""
        print(f"jaxnets: downloading {url} ({_size(total)}){more} -> {dest}", file=sys.stderr)
    return _NoBar()
