"""Shared pytest fixtures: where the real datasets live.

The real data sits in ``shared/data`` beside the checkout (``../shared`` from the repo
root), or wherever ``JAXNETS_SHARED_DATA`` points. It is read in place, never copied into
the repo. Tests that need it are skipped, with the reason, when it is absent.

CIFAR-10 is shipped as JPEGs and has to be converted to the standard
``cifar-10-batches-py/`` layout by ``shared/tools/build_cifar10.py`` (about a minute). The
``cifar10_dir`` fixture does that once per test run: into ``$JAXNETS_CIFAR10_DIR`` when
set (a persistent cache: reused when already built, so later sessions skip the build; ``.ci/run``
builds it there before the tests), else into a temporary directory shared by the run's
xdist workers. The build holds a file lock, so parallel workers build it once between them.

Subprocess timeouts are there to fail a hung test, not a slow machine: tests wait
``timeout=scaled_timeout(120)`` (``from conftest import scaled_timeout``), a quiet-machine
bound scaled by the load.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# train.py keeps compiled programs in ~/.cache by default; tests that want the cache say where.
os.environ.setdefault("JAXNETS_COMPILE_CACHE", "off")
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta")


def _shared_dir() -> Path:
    env = os.environ.get("JAXNETS_SHARED_DATA")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


def _cifar10_built(root: Path) -> bool:
    return all((root / "cifar-10-batches-py" / f).is_file() for f in CIFAR10_FILES)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``shared/data`` (or ``$JAXNETS_SHARED_DATA``); skips when it does not exist."""
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set JAXNETS_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def mnist_dir(shared_data_dir) -> Path:
    """Directory holding the four standard MNIST IDX ``.gz`` files."""
    path = shared_data_dir / "mnist"
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST files not found in {path}")
    return path


def scaled_timeout(seconds: float) -> float:
    """``seconds`` (a generous bound on a quiet 2-core machine) times the CPU load per core
    when that is above 1 (a busy machine runs the same work proportionally slower), times
    ``$JAXNETS_TEST_TIMEOUT_SCALE`` (default 1)."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * max(1.0, load) * float(os.environ.get("JAXNETS_TEST_TIMEOUT_SCALE") or 1)


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """Directory that contains ``cifar-10-batches-py/`` (built once per test run, or cached).

    ``$JAXNETS_CIFAR10_DIR`` is used as a cache when set: if it already holds a complete
    build it is returned as is, otherwise the build is written there (atomically: into a
    temporary sibling first, then renamed). Without it the build goes to a temp dir of the
    run, shared by its xdist workers. One process builds; the others wait on the lock and
    reuse its build.
    """
    env = os.environ.get("JAXNETS_CIFAR10_DIR")
    if env:
        root = Path(env).expanduser().resolve()
    else:  # the run's base temp dir: each xdist worker's basetemp is a folder inside it
        base = tmp_path_factory.getbasetemp()
        root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cifar10-shared"
    if _cifar10_built(root):
        return root

    shared = _shared_dir()
    tool = shared.parent / "tools" / "build_cifar10.py"
    source = shared / "cifar10-jpeg.tar.gz"
    if not tool.is_file() or not source.is_file():
        pytest.skip(f"cannot build CIFAR-10: {tool} or {source} missing")
    try:
        import PIL  # noqa: F401  (build_cifar10.py needs Pillow)
    except ImportError:
        pytest.skip("cannot build CIFAR-10: Pillow is not installed")

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if _cifar10_built(root):  # another worker built it while this one waited
            return root
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
        try:
            # About a minute on a quiet 2-core machine.
            proc = subprocess.run([sys.executable, str(tool), str(staging)],
                                  capture_output=True, text=True, timeout=scaled_timeout(600))
            if proc.returncode != 0:
                pytest.fail(f"build_cifar10.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
            target = root / "cifar-10-batches-py"
            if target.exists():  # an incomplete earlier build
                shutil.rmtree(target)
            os.replace(staging / "cifar-10-batches-py", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """JAX's persistent compile cache in a temporary directory for one test module
    (``pytestmark = pytest.mark.usefixtures("compile_cache")``): modules that train many
    small runs compile the same few programs again (a new jit per train_group), and the
    cache turns the repeats into disk reads. Restored afterwards for the other modules."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
