"""Datasets: MNIST and CIFAR-10 as uint8 NHWC numpy arrays.

Where the data comes from (``source``, one of :data:`SOURCES`):

* ``"auto"`` (default): the standard distribution files in the data directory, downloaded
  there first when they are missing (:mod:`jaxnets.download`: standard library only, checked
  against the published checksums). Reading them needs numpy only, no TensorFlow.

  - MNIST: the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``, as
    published) or not.
  - CIFAR-10: the extracted ``cifar-10-batches-py/`` directory (``data_batch_1`` ..
    ``data_batch_5``, ``test_batch``) or the official ``cifar-10-python.tar.gz``.

* ``"files"``: the same files, never downloaded (a missing file is an error).
* ``"tfds"``: tensorflow-datasets' prepared copy, ``tfds.load(name, batch_size=-1,
  as_supervised=True, download=False)``. It needs TensorFlow (the ``jaxnets[tfds]``
  extra) and a tfds data directory that already holds the dataset: this source does not
  download (offline, tfds's downloader retries for minutes).

The data directory ``root`` is the ``data_dir`` argument, else the ``JAXNETS_DATA_DIR``
environment variable, else ``~/.cache/jaxnets/data``. Where the files are looked for in it:

================  ===========================================================================
MNIST             ``root/`` itself if it holds any of the four files, else ``root/mnist/``
CIFAR-10          ``root/`` if it *is* the batches directory (holds ``data_batch_1``), else
                  ``root/cifar-10-batches-py/``, ``root/cifar10/cifar-10-batches-py/``,
                  ``root/cifar-10-python.tar.gz``, ``root/cifar10/cifar-10-python.tar.gz``
                  (first that exists; the extracted directory loads faster than the tarball)
================  ===========================================================================

So one ``JAXNETS_DATA_DIR`` can serve both datasets, e.g. ``DIR/mnist/*.gz`` beside
``DIR/cifar-10-batches-py/``, and ``data_dir`` may also point straight at the folder with
the files. Downloads go to ``root/mnist/`` and ``root/cifar10/cifar-10-python.tar.gz``
(found there by the same rules); with ``"auto"``, MNIST files directly in ``root`` are read
as they are, never completed by a download. Loading MNIST takes well under a second and
CIFAR-10 from the batches directory about one (the tarball is decompressed on each load).

Every problem with the files (missing, truncated, corrupt, inconsistent) raises
:class:`DataError` with a one-line message that names the file and what was expected; the
CLI prints it and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import pickle
import tarfile
import warnings
import zlib
from typing import NamedTuple
from pathlib import Path

import numpy as np

from .errors import DATA_DIR_ENV, DataError, one_line as _one_line

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "SOURCES",
    "load_dataset",
    "normalization_stats",
    "select_classes",
    "split_validation",
]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("mnist", "cifar10")

#: Where :func:`load_dataset` takes the data from (see the module docstring).
SOURCES = ("auto", "files", "tfds")

class Shape(NamedTuple):
    """What a dataset is, before loading it: image shape, classes, training images."""

    image_shape: tuple
    classes: int
    train_examples: int


#: Each dataset's :class:`Shape`, for planning a sweep or rebuilding a model without the data.
SHAPES = {"mnist": Shape((28, 28, 1), 10, 60000), "cifar10": Shape((32, 32, 3), 10, 50000)}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_BATCHES_DIR = "cifar-10-batches-py"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

_IDX_UBYTE_MAGIC = {1: 0x00000801, 3: 0x00000803}  # ndim -> magic for unsigned-byte IDX


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset held in host memory.

    Attributes:
        name: ``"mnist"`` or ``"cifar10"``.
        train_images: uint8 array ``(N_train, H, W, C)`` (NHWC; MNIST has ``C == 1``).
        train_labels: int32 array ``(N_train,)`` with values in ``[0, num_classes)``.
        test_images: uint8 array ``(N_test, H, W, C)``.
        test_labels: int32 array ``(N_test,)``.
        num_classes: number of classes (10 for both datasets).
        source: where the data came from: ``"files:<path>"`` (a directory or tarball) or
            ``"tfds:<data_dir>"`` (``"tfds:default"`` for tfds's own default directory).
        class_ids: after :func:`select_classes`, the original class of each label
            (label ``j`` is class ``class_ids[j]``); None for all classes as published.
        data_files: each file read and how it compares with the published checksums
            (:class:`jaxnets.download.CopyChecks`: ``"verified download"``, ``"published
            MD5"`` or ``"MD5 X, published Y"``); empty for tfds and arrays made in memory.
        data_warning: the one-line warning when a file differs from the published MD5s
            (a modified copy, read as it is), else None.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    source: str
    class_ids: tuple | None = None
    data_files: dict = dataclasses.field(default_factory=dict)
    data_warning: str | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.train_images.shape}, "
            f"test={self.test_images.shape}, num_classes={self.num_classes}, "
            f"source={self.source!r}" + (f", class_ids={self.class_ids}" if self.class_ids else "") + ")"
        )


# --------------------------------------------------------------------------- public API


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                 source: str = "auto") -> Dataset:
    """Load MNIST or CIFAR-10 as uint8 NHWC arrays with int32 labels.

    Args:
        name: ``"mnist"`` or ``"cifar10"``.
        data_dir: directory with the standard files (see the module docstring for where
            they are looked for); default ``$JAXNETS_DATA_DIR``, else
            ``~/.cache/jaxnets/data``. With ``source="tfds"`` it is passed to ``tfds.load``
            as its ``data_dir`` instead (default: tfds's own).
        source: ``"auto"`` (default) reads the files, downloading the missing ones into the
            data directory first (created if needed); ``"files"`` reads them and never
            downloads; ``"tfds"`` reads tensorflow-datasets' prepared copy.

    Returns:
        A :class:`Dataset`. Files jaxnets downloaded are checked against their checksums on
        every read (a changed one is a DataError); other files are compared with the
        published MD5s, a difference being a warning in ``Dataset.data_warning``.

    Raises:
        ValueError: unknown ``name`` or ``source``.
        DataError: the data could not be read (one-line message naming the file).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")

    if source == "tfds":
        return _load_tfds(name, data_dir)
    from . import download  # here, not at the top: the downloader (urllib, ssl) is only needed for a download

    root = download.data_root(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data directory {root} is not a directory")
    if source == "auto":
        missing = _missing_files(name, root)
        if missing:
            download.fetch(name, root, names=missing)
    elif not root.is_dir():
        raise DataError(
            f"data directory {root} does not exist: pass --data-dir DIR (or set {DATA_DIR_ENV}) "
            f"with the standard {name} files, or use --data-source auto to download them"
        )
    if root.is_dir():
        download.check_cache(name, root)  # what jaxnets downloaded is checked on every read
    checks = download.CopyChecks(name)  # the rest against the published MD5s: a warning
    dataset = _load_mnist(root, checks) if name == "mnist" else _load_cifar10(root, checks)
    checks.save()
    return dataclasses.replace(dataset, data_files=dict(checks.results), data_warning=checks.warning())


def _missing_files(name: str, root: Path) -> list[str]:
    """The standard files that ``source="auto"`` downloads into ``root``: none when the
    dataset is there in a layout :func:`load_dataset` reads, else the absent ones of the
    download layout (``root/mnist/*.gz``, ``root/cifar10/cifar-10-python.tar.gz``)."""
    if name == "cifar10":
        return [] if _locate_cifar10(root) is not None else [CIFAR10_TARBALL]
    if _holds_mnist(root):  # the user's own folder: read as it is (errors name what is missing)
        return []
    return [b + ".gz" for b in MNIST_FILES.values()
            if _find_file(root / "mnist", (b + ".gz", b)) is None]


def normalization_stats(train_images: np.ndarray, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of images on the [0, 1] scale.

    Args:
        train_images: ``(N, H, W, C)`` array; uint8 values are divided by 255, floating
            values are taken to be on [0, 1] already.
        exclude: optional indices of images left out (e.g. the validation split). Their
            sums are subtracted from the whole set's, so no copy of the rest is made; for
            uint8 input every sum is an exact integer, so this equals the statistics of
            ``np.delete(train_images, exclude, 0)`` bit for bit.

    Returns:
        ``(mean, std)``, each a float32 array of shape ``(C,)`` (population std, ddof=0).
        Sums are accumulated in float64 over chunks (exact for uint8 input), so no
        full-size float copy of the set is made.
    """
    x = np.asarray(train_images)
    if x.ndim != 4:
        raise ValueError(f"normalization_stats: expected (N, H, W, C) images, got shape {x.shape}")
    excluded = 0 if exclude is None else len(exclude)
    if x.shape[0] - excluded <= 0:
        raise ValueError("normalization_stats: no images")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    total, total_sq = _column_sums(x)
    if excluded:
        left_out, left_out_sq = _column_sums(x[np.asarray(exclude)])
        total, total_sq = total - left_out, total_sq - left_out_sq
    c = x.shape[-1]
    count = (x.shape[0] - excluded) * (x[0].size // c)
    mean = total.reshape(-1, c).sum(axis=0) / count
    var = np.maximum(total_sq.reshape(-1, c).sum(axis=0) / count - mean * mean, 0.0)
    return (mean / scale).astype(np.float32), (np.sqrt(var) / scale).astype(np.float32)


def _column_sums(x):
    """Float64 sums over the images of every value and of its square, each (H*W*C,)."""
    flat = x.reshape(x.shape[0], -1)  # (N, H*W*C); column j belongs to channel j % C
    total = np.zeros(flat.shape[1], np.float64)
    total_sq = np.zeros(flat.shape[1], np.float64)
    chunk = max(1, (1 << 22) // flat.shape[1])  # ~4M values (16 MB of float32) a chunk
    for start in range(0, flat.shape[0], chunk):
        # uint8 values and their squares are exact in float32; the sums are in float64.
        part = flat[start:start + chunk].astype(np.float32)
        total += part.sum(axis=0, dtype=np.float64)
        part *= part
        total_sq += part.sum(axis=0, dtype=np.float64)
    return total, total_sq


def select_classes(dataset: Dataset, classes) -> Dataset:
    """``dataset`` with only the images of ``classes`` (original class ids) in both splits,
    relabelled ``0..k-1`` in the order given: class ``classes[j]`` becomes label ``j`` (so
    ``--classes 5,6,7,8,9`` makes class 5 label 0), and ``num_classes`` is ``k``. The images
    keep their order. Empty ``classes``, or the selection ``dataset`` already has, return it
    unchanged; a selection of an already selected dataset, an unknown class id or a class
    with no training or no test image is a ValueError.
    """
    classes = tuple(int(c) for c in classes)
    if not classes or dataset.class_ids == classes:
        return dataset
    if dataset.class_ids is not None:
        raise ValueError(f"--classes {','.join(map(str, classes))}: the dataset holds classes "
                         f"{','.join(map(str, dataset.class_ids))} already (select from the full dataset)")
    bad = [c for c in classes if not 0 <= c < dataset.num_classes]
    if bad:
        raise ValueError(f"--classes: unknown class {bad[0]} ({dataset.name} has classes 0..{dataset.num_classes - 1})")
    relabel = np.full(dataset.num_classes, -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
    out = {}
    for split in ("train", "test"):
        labels = relabel[dataset.__dict__[f"{split}_labels"]]
        keep = np.flatnonzero(labels >= 0)
        missing = sorted(set(range(len(classes))) - set(np.unique(labels[keep]).tolist()))
        if missing:
            raise ValueError(f"--classes: {dataset.source} has no {split} image of class {classes[missing[0]]}")
        out[f"{split}_images"] = dataset.__dict__[f"{split}_images"][keep]
        out[f"{split}_labels"] = labels[keep]
    return dataclasses.replace(dataset, num_classes=len(classes), class_ids=classes, **out)


def balanced_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int, class_ids=None) -> np.ndarray:
    """Sorted indices of ``per_class`` examples of each class ``0..num_classes-1``, drawn
    with ``np.random.default_rng([seed, 1])`` (a stream apart from the validation split's);
    a ValueError naming ``--labels-per-class`` and the class (as ``class_ids`` names it,
    when given: the original ids of a :func:`select_classes` dataset) when one has fewer."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 1])
    picked = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < per_class:
            name = c if class_ids is None else class_ids[c]
            raise ValueError(f"--labels-per-class {per_class} is more than the {len(rows)} training images of "
                             f"class {name} in the training pool")
        picked.append(rng.choice(rows, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def split_validation(images: np.ndarray, labels: np.ndarray, val_size: int, seed: int):
    """Split off a random validation set, deterministically.

    The examples are drawn with ``np.random.default_rng(seed).permutation(N)``: the first
    ``val_size`` indices form the validation set, the rest the training set. Both keep the
    original relative order of their examples, so the same ``(N, val_size, seed)`` always
    gives the same split and ``val_size=0`` returns the input unchanged.

    Args:
        images: ``(N, ...)`` array.
        labels: ``(N,)`` array.
        val_size: number of validation examples, ``0 <= val_size < N``.
        seed: integer seed for the permutation.

    Returns:
        ``(train_x, train_y, val_x, val_y)``.

    Raises:
        ValueError: ``val_size`` out of range, or images and labels of different lengths.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"split_validation: {n} images but {len(labels)} labels")
    if isinstance(val_size, bool) or int(val_size) != val_size:
        raise ValueError(f"split_validation: val_size must be an integer, got {val_size!r}")
    val_size = int(val_size)
    if not 0 <= val_size < n:
        raise ValueError(
            f"split_validation: val_size must be in [0, {n}) for {n} examples, got {val_size}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = np.sort(perm[:val_size])
    train_idx = np.sort(perm[val_size:])
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


# --------------------------------------------------------------------------- MNIST (IDX)


def _holds_mnist(folder: Path) -> bool:
    """Whether ``folder`` holds any of the four MNIST files (gzipped or not)."""
    return any(_find_file(folder, (b + ".gz", b)) is not None for b in MNIST_FILES.values())


def _find_mnist_dir(root: Path) -> Path:
    """``root`` if it holds any MNIST file, else ``root/mnist`` if that is a directory."""
    if _holds_mnist(root):
        return root
    return root / "mnist" if (root / "mnist").is_dir() else root


def _load_mnist(root: Path, checks=None) -> Dataset:
    folder = _find_mnist_dir(root)
    arrays = {}
    for key, base in MNIST_FILES.items():
        path = _find_file(folder, (base + ".gz", base))
        if path is None:
            searched = str(folder) if _holds_mnist(folder) else f"{root} (nor in {root / 'mnist'})"
            expected = ", ".join(b + ".gz" for b in MNIST_FILES.values())
            raise DataError(
                f"MNIST file {base}.gz not found in {searched}; expected {expected} "
                f"(gzipped or not)"
            )
        data = _read_bytes(path, gz=path.name.endswith(".gz"))
        if checks is not None:
            checks.check(path, data)  # the published MD5s are of the decompressed content
        arrays[key] = (path, _parse_idx(path, data, ndim=3 if key.endswith("images") else 1))
    out = {}
    for split in ("train", "test"):
        (ipath, images), (lpath, labels) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{lpath} has {labels.shape[0]} labels but {ipath.name} has "
                f"{images.shape[0]} images; expected equal counts"
            )
        out[f"{split}_images"] = images[..., None]
        out[f"{split}_labels"] = _checked_labels(labels, 10, lpath)
    return Dataset(name="mnist", num_classes=10, source=f"files:{folder}", **out)


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped if its name ends in ``.gz``) as uint8.

    Args:
        path: the file.
        ndim: expected number of dimensions (3 for images, 1 for labels), or None for any.

    Raises:
        DataError: unreadable file, truncated gzip, wrong magic number, or a payload size
            that does not match the header's dimensions.
    """
    path = Path(path)
    return _parse_idx(path, _read_bytes(path, gz=path.name.endswith(".gz")), ndim)


def _parse_idx(path: Path, data: bytes, ndim: int | None) -> np.ndarray:
    """The uint8 array of an IDX file's (decompressed) bytes; DataErrors as :func:`read_idx`."""
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    dims_in_header = data[3]
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= dims_in_header <= 4:
        want = f"0x{_IDX_UBYTE_MAGIC[ndim]:08x}" if ndim in _IDX_UBYTE_MAGIC else "0x000008NN"
        raise DataError(
            f"{path}: bad magic number 0x{magic:08x}; expected {want} (unsigned-byte IDX file)"
        )
    if ndim is not None and dims_in_header != ndim:
        raise DataError(
            f"{path}: magic number 0x{magic:08x} says {dims_in_header}-D data; expected "
            f"0x{_IDX_UBYTE_MAGIC.get(ndim, 0x800 + ndim):08x} ({ndim}-D)"
        )
    header = 4 + 4 * dims_in_header
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, too short for its {header}-byte IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims_in_header))
    want = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header
    if have != want:
        raise DataError(
            f"{path}: {have} bytes of data after the header, but its dimensions "
            f"{'x'.join(map(str, dims))} need {want}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


# --------------------------------------------------------------------------- CIFAR-10


def _locate_cifar10(root: Path) -> tuple[str, Path] | None:
    """``("dir", batches dir)`` or ``("tar", tarball)``: the first of the layouts in the
    module docstring that exists under ``root``; None when there is none."""
    if (root / CIFAR10_TRAIN_BATCHES[0]).is_file() or (root / CIFAR10_TEST_BATCH).is_file():
        return "dir", root
    for p in (root / CIFAR10_BATCHES_DIR, root / "cifar10" / CIFAR10_BATCHES_DIR):
        if p.is_dir():
            return "dir", p
    for p in (root / CIFAR10_TARBALL, root / "cifar10" / CIFAR10_TARBALL):
        if p.is_file():
            return "tar", p
    return None


def _load_cifar10(root: Path, checks=None) -> Dataset:
    found = _locate_cifar10(root)
    if found is None:
        raise DataError(
            f"CIFAR-10 not found in {root}: expected {CIFAR10_BATCHES_DIR}/ (data_batch_1..5, "
            f"test_batch) or {CIFAR10_TARBALL} there or in {root / 'cifar10'}"
        )
    kind, path = found
    if kind == "dir":
        batches_dir = path
        blobs = {}
        for b in CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,):
            path = batches_dir / b
            if not path.is_file():
                raise DataError(
                    f"CIFAR-10 file {b} not found in {batches_dir}; expected "
                    f"{', '.join(CIFAR10_TRAIN_BATCHES)}, {CIFAR10_TEST_BATCH}"
                )
            blobs[b] = (str(path), _read_bytes(path, gz=False))
            if checks is not None:
                checks.check(path, blobs[b][1])
        return _cifar10_from_blobs(blobs, f"files:{batches_dir}")
    blobs = _read_cifar10_tarball(path)
    if checks is not None:
        for b, (_, raw) in blobs.items():  # the published batch MD5s hold inside the tarball too
            checks.check(path, raw, member=b)
    return _cifar10_from_blobs(blobs, f"files:{path}")


def _read_cifar10_tarball(tarball: Path) -> dict:
    """Raw bytes of each batch file inside the official tarball, keyed by batch name."""
    wanted = set(CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,))
    blobs = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                base = member.name.rstrip("/").rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in blobs:
                    blobs[base] = (f"{tarball}:{member.name}", tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"{tarball}: truncated or corrupt tar.gz ({_one_line(e)}); expected the official "
            f"{CIFAR10_TARBALL}"
        ) from None
    missing = [b for b in CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,) if b not in blobs]
    if missing:
        raise DataError(
            f"{tarball}: no {', '.join(missing)} inside; expected {CIFAR10_BATCHES_DIR}/"
            f"data_batch_1..5 and test_batch"
        )
    return blobs


def _cifar10_from_blobs(blobs: dict, source: str) -> Dataset:
    parts = {b: _parse_cifar_batch(label, raw) for b, (label, raw) in blobs.items()}
    train = [parts[b] for b in CIFAR10_TRAIN_BATCHES]
    return Dataset(
        name="cifar10",
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        test_images=parts[CIFAR10_TEST_BATCH][0],
        test_labels=parts[CIFAR10_TEST_BATCH][1],
        num_classes=10,
        source=source,
    )


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays (and plain containers).

    The CIFAR-10 batches are pickles; refusing every other global keeps a doctored file
    from running code while still reading the official files and those of build_cifar10.py.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns on the numpy.core names old pickles use
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _parse_cifar_batch(label: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,32,32,3) uint8, labels (N,) int32) from one pickled batch's bytes."""
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on garbage: EOFError, KeyError, ...
        raise DataError(
            f"{label}: truncated or not a CIFAR-10 pickle ({type(e).__name__}: "
            f"{_one_line(e)}); expected a pickled dict with b'data' and b'labels'"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{label}: holds a {type(obj).__name__}; expected a dict with "
                        f"b'data' and b'labels'")
    data, labels = _get(obj, "data"), _get(obj, "labels")
    if data is None or labels is None:
        raise DataError(f"{label}: no b'data' or b'labels' entry; expected a CIFAR-10 batch")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{label}: b'data' is {data.dtype} of shape {data.shape}; expected uint8 (N, 3072)"
        )
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{label}: b'labels' is not a list of integers ({_one_line(e)})") from None
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{label}: {data.shape[0]} images but {labels.shape[0]} labels; expected equal counts"
        )
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, _checked_labels(labels, 10, label)


def _get(d: dict, key: str):
    """``d[b"key"]`` or ``d["key"]`` (pickles written from Python 3 may use str keys)."""
    return d.get(key.encode(), d.get(key))


# --------------------------------------------------------------------------- tfds


def _tensorflow_available() -> bool:
    """Whether TensorFlow is importable (tfds cannot load anything without it)."""
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def _load_tfds(name: str, data_dir) -> Dataset:
    hint = (
        f"use --data-source auto (downloads the standard files), or --data-source files "
        f"with --data-dir DIR holding the standard {name} files "
        + ("(train-images-idx3-ubyte.gz, ...)" if name == "mnist"
           else f"({CIFAR10_BATCHES_DIR}/ or {CIFAR10_TARBALL})")
    )
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tensorflow-datasets is not installed (pip install 'jaxnets[tfds]'), "
                        f"so it can't load {name}; {hint}") from None
    if not _tensorflow_available():
        raise DataError(f"tensorflow-datasets needs TensorFlow (pip install 'jaxnets[tfds]') "
                        f"to load {name}; {hint}")
    tfds_name = {"mnist": "mnist", "cifar10": "cifar10"}[name]
    out = {}
    absl_logger = logging.getLogger("absl")  # tfds warns through absl about what it lacks
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        for split in ("train", "test"):
            # download=False: this source reads tfds's prepared copy; offline, tfds's own
            # downloader retries for minutes before it fails.
            ds = tfds.load(tfds_name, split=split, batch_size=-1, as_supervised=True,
                           data_dir=None if data_dir is None else str(data_dir),
                           download=False)
            images, labels = ds  # eager tf.Tensors (batch_size=-1): the whole split
            out[f"{split}_images"] = np.asarray(images)
            out[f"{split}_labels"] = np.asarray(labels)
    except Exception as e:  # not prepared in the tfds data dir, broken dir, ...
        raise DataError(f"tensorflow-datasets could not provide {name} "
                        f"({type(e).__name__}: {_one_line(e)}); the tfds source reads a prepared "
                        f"copy and does not download: {hint}") from None
    finally:
        absl_logger.setLevel(level)
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        where = f"tfds {tfds_name} {split} split"
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{where}: images are {images.dtype} {images.shape}; "
                            f"expected uint8 (N, H, W, C)")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{where}: {images.shape[0]} images but labels of shape "
                            f"{labels.shape}; expected equal counts")
        out[f"{split}_images"] = np.ascontiguousarray(images)
        out[f"{split}_labels"] = _checked_labels(labels, SHAPES[name].classes, where)
    return Dataset(name=name, num_classes=SHAPES[name].classes,
                   source=f"tfds:{data_dir if data_dir is not None else 'default'}", **out)


# --------------------------------------------------------------------------- helpers


def _find_file(folder: Path, names) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _read_bytes(path: Path, gz: bool) -> bytes:
    """Whole file contents, gunzipped if ``gz``; every failure becomes a DataError."""
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({_one_line(e)}); "
                        f"expected a complete .gz file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e)})") from None


def _checked_labels(labels: np.ndarray, num_classes: int, where) -> np.ndarray:
    """Labels as int32, after checking every one is in ``[0, num_classes)``."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels range {int(labels.min())}..{int(labels.max())}; expected "
            f"0..{num_classes - 1}"
        )
    return labels.astype(np.int32)

