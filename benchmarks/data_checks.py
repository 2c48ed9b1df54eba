"""The cost of checking data files on read (issue 26): ``load_dataset`` with and without the
checks, in one process, the modes interleaved repeat by repeat (so a loaded machine slows
them alike).

Modes, for MNIST (the four IDX ``.gz`` files) and CIFAR-10 (``cifar-10-batches-py/``):

* ``off``: the checks disabled (``download.check_cache`` and ``CopyChecks.check`` no-ops),
  the load as before issue 26;
* ``stamped`` (MNIST; CIFAR-10's download is the tarball, not measured here): the files as
  jaxnets' download cache holds them (links stamped in ``.verified.json``): each costs a stat;
* ``copy, remembered``: the user's ``--data-dir`` copy whose MD5s are remembered in
  :data:`~jaxnets.download.DIGESTS` (every read after the first);
* ``copy, first read``: the same with nothing remembered, so every file is hashed (MD5 of
  what was read: MNIST's decompressed content, CIFAR-10's batches).

    python -m benchmarks.data_checks --mnist DIR --cifar10 DIR [--repeats 5]

Prints the median seconds of each mode and its ratio to ``off``. The copies it stamps and
the digests it remembers live in a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from jaxnets import data as D
from jaxnets import download as DL


@contextlib.contextmanager
def _checks_off():
    check, cache = DL.CopyChecks.check, DL.check_cache
    DL.CopyChecks.check = lambda self, *a, **k: None
    DL.check_cache = lambda *a, **k: None
    try:
        yield
    finally:
        DL.CopyChecks.check, DL.check_cache = check, cache


def _stamped_copy(source: Path, work: Path) -> Path:
    """MNIST's files laid out and stamped as jaxnets' download cache holds them (links where
    the file system allows, so nothing is copied)."""
    root = work / "mnist-cache"
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for name in [b + ".gz" for b in D.MNIST_FILES.values()]:
        try:
            os.link(source / name, folder / name)
        except OSError:
            shutil.copy2(source / name, folder / name)
        # The stamp says "verified as downloaded"; what is measured is its cost on read.
        DL._stamp(folder / name, {"md5": DL.published_md5("mnist", name)})
    return root


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(dataset, folder: Path, repeats: int, work: Path) -> dict:
    """Median load seconds of each mode, interleaved."""
    stamped = _stamped_copy(folder, work) if dataset == "mnist" else None
    digests = work / f"{dataset}-digests.json"
    DL.DIGESTS = str(digests)
    load = lambda where: D.load_dataset(dataset, where, source="files")
    load(folder)  # warm the page cache and the imports
    times = {"off": [], **({"stamped": []} if stamped else {}), "copy, remembered": [], "copy, first read": []}
    for _ in range(repeats):
        with _checks_off():
            times["off"].append(_time(lambda: load(folder)))
        if stamped:
            times["stamped"].append(_time(lambda: load(stamped)))
        times["copy, remembered"].append(_time(lambda: load(folder)))
        digests.unlink(missing_ok=True)
        times["copy, first read"].append(_time(lambda: load(folder)))
    return {mode: statistics.median(t) for mode, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, help="folder with MNIST's four IDX .gz files")
    parser.add_argument("--cifar10", type=Path, help="a cifar-10-batches-py/ folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; medians of {args.repeats}, interleaved")
    saved = DL.DIGESTS
    with tempfile.TemporaryDirectory(prefix="jaxnets-data-checks-") as work:
        try:
            for dataset, folder in (("mnist", args.mnist), ("cifar10", args.cifar10)):
                if folder is None:
                    continue
                result = measure(dataset, folder, args.repeats, Path(work))
                off = result["off"]
                print(f"{dataset}: " + "; ".join(f"{mode} {s:.3f} s ({s / off - 1:+.1%})" for mode, s in result.items()))
        finally:
            DL.DIGESTS = saved


if __name__ == "__main__":
    main()
