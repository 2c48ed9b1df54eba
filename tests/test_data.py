"""Tests for jaxnets.data: real MNIST / CIFAR-10, the offline readers' error handling on
synthetic corrupt files, the tensorflow-datasets path, stats and the validation split."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from jaxnets import data as D
from jaxnets import download as DL
from jaxnets.data import DataError, load_dataset, normalization_stats, split_validation

HAS_TF = importlib.util.find_spec("tensorflow") is not None


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch, tmp_path):
    """Tests must not depend on a developer's JAXNETS_DATA_DIR or cache, nor download:
    the default data dir is a fresh temporary path and any HTTP request fails the test
    (tests/test_download.py covers downloads, against a local server)."""
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(DL, "DEFAULT_DATA_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setattr(DL, "DIGESTS", str(tmp_path / "digests.json"))

    def no_network(request, timeout):
        raise AssertionError(f"test_data tried to download {request.full_url}")

    monkeypatch.setattr(DL, "_open", no_network)


# --------------------------------------------------------------------------- helpers


def write_idx(path, array, *, gz=None, magic=None):
    """Write ``array`` (uint8) as an IDX file; gzipped when the name ends in .gz."""
    array = np.asarray(array, np.uint8)
    magic = 0x0800 + array.ndim if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.tobytes()
    gz = str(path).endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_mnist(folder, n_train=12, n_test=5, gz=True, seed=0):
    """Synthetic MNIST in the standard file layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, base in D.MNIST_FILES.items():
        write_idx(folder / (base + (".gz" if gz else "")), arrays[key])
    return arrays


def cifar_batch(n, seed, protocol=4):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    obj = {b"batch_label": b"synthetic", b"labels": labels.tolist(),
           b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
           b"filenames": [b"x.png"] * n}
    return images, labels, pickle.dumps(obj, protocol=protocol)


def make_cifar(root, n=6, protocol=4):
    """Synthetic cifar-10-batches-py/ under root; returns (train_x, train_y, test_x, test_y)."""
    dest = root / "cifar-10-batches-py"
    dest.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(D.CIFAR10_TRAIN_BATCHES + (D.CIFAR10_TEST_BATCH,)):
        x, y, raw = cifar_batch(n + i, seed=i, protocol=protocol)
        (dest / name).write_bytes(raw)
        xs.append(x)
        ys.append(y)
    (dest / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}))
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def assert_one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in {msg!r}"


# --------------------------------------------------------------------------- real MNIST


def test_mnist_real(mnist_dir):
    ds = load_dataset("mnist", mnist_dir)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.shape == (60000,) and ds.train_labels.dtype == np.int32
    assert ds.test_labels.shape == (10000,) and ds.test_labels.dtype == np.int32
    assert ds.image_shape == (28, 28, 1)
    assert ds.source == f"files:{mnist_dir}"
    mean, std = normalization_stats(ds.train_images)
    assert mean.dtype == np.float32 and mean.shape == (1,) and std.shape == (1,)
    np.testing.assert_allclose(mean, [0.13066], atol=5e-6)
    np.testing.assert_allclose(std, [0.30811], atol=5e-6)
    np.testing.assert_array_equal(
        np.bincount(ds.train_labels, minlength=10),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    assert np.bincount(ds.test_labels).sum() == 10000
    # The shared copy is the dataset byte for byte (decompressed): no warning.
    assert ds.data_files == {str(mnist_dir / (b + ".gz")): "published MD5" for b in D.MNIST_FILES.values()}
    assert ds.data_warning is None


def test_a_modified_copy_is_read_with_a_warning_naming_the_file(mnist_dir, tmp_path):
    """Issue 26: a --data-dir copy whose labels were shifted by one is still read (people
    train on modified copies on purpose), with a warning naming that file alone; the MD5 is
    of the decompressed content (as the published ones are), so an unzipped copy verifies."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for b in D.MNIST_FILES.values():
        (copy / b).write_bytes(gzip.decompress((mnist_dir / (b + ".gz")).read_bytes()))  # unzipped: still published
    labels = D.read_idx(copy / "train-labels-idx1-ubyte")
    write_idx(copy / "train-labels-idx1-ubyte", (labels + 1) % 10)
    ds = load_dataset("mnist", copy, source="files")
    np.testing.assert_array_equal(ds.train_labels, (labels + 1) % 10)
    shifted = str(copy / "train-labels-idx1-ubyte")
    assert ds.data_files[shifted].startswith("MD5 ") and DL.published_md5("mnist", "train-labels-idx1-ubyte") \
        in ds.data_files[shifted]
    assert [k for k, v in ds.data_files.items() if v != "published MD5"] == [shifted]
    assert "\n" not in ds.data_warning
    assert ds.data_warning.startswith(f"1 of 4 MNIST files in {copy} differ from the published MD5s "
                                      f"(train-labels-idx1-ubyte)")


def test_a_copys_md5_is_remembered_by_path_size_and_mtime(tmp_path):
    """An unchanged file is hashed once: its MD5 is kept in DIGESTS by path, size and mtime
    (a doctored record is believed while both hold), and hashed again once either changes."""
    make_mnist(tmp_path / "m")
    first = load_dataset("mnist", tmp_path / "m", source="files")
    assert first.data_warning.startswith("4 of 4 MNIST files")
    record = json.loads((tmp_path / "digests.json").read_text())
    labels = tmp_path / "m" / "train-labels-idx1-ubyte.gz"
    entry = record["files"][str(labels.resolve())]
    assert entry["size"] == labels.stat().st_size and entry["mtime_ns"] == labels.stat().st_mtime_ns
    entry["md5"] = DL.published_md5("mnist", labels.name)  # only a remembered MD5 can say this
    (tmp_path / "digests.json").write_text(json.dumps(record))
    assert load_dataset("mnist", tmp_path / "m").data_files[str(labels)] == "published MD5"
    os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
    assert load_dataset("mnist", tmp_path / "m").data_files[str(labels)].startswith("MD5 ")


@pytest.mark.parametrize("content", ["not json", '{"kind": "my own"}'])
def test_a_digests_file_that_is_not_ours_is_left_alone(tmp_path, content):
    (tmp_path / "digests.json").write_text(content)
    make_mnist(tmp_path / "m")
    assert load_dataset("mnist", tmp_path / "m").data_warning.startswith("4 of 4 MNIST files")
    assert (tmp_path / "digests.json").read_text() == content


def test_mnist_found_from_parent_dir_and_env(mnist_dir, monkeypatch):
    """data_dir may be the folder holding mnist/; JAXNETS_DATA_DIR works the same way."""
    ds = load_dataset("mnist", mnist_dir.parent)
    assert ds.source == f"files:{mnist_dir}" and len(ds.train_labels) == 60000
    monkeypatch.setenv(D.DATA_DIR_ENV, str(mnist_dir.parent))
    assert load_dataset("mnist").source == f"files:{mnist_dir}"


# --------------------------------------------------------------------------- synthetic MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_synthetic_roundtrip(tmp_path, gz):
    arrays = make_mnist(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", tmp_path, source="files")
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train_labels"])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays["test_images"])
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert ds.train_labels.dtype == np.int32
    assert ds.train_images.flags.writeable


def test_mnist_missing_file(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_error(e, "t10k-labels-idx1-ubyte.gz", tmp_path, "train-images-idx3-ubyte.gz")


def test_mnist_empty_dir_names_both_places_searched(tmp_path):
    (tmp_path / "mnist").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path, source="files")
    assert_one_line_error(e, "train-images-idx3-ubyte.gz", tmp_path / "mnist")


def test_mnist_bad_magic(tmp_path):
    make_mnist(tmp_path)
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz",
                     np.zeros((3, 28, 28), np.uint8), magic=0x12345678)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_error(e, path, "magic", "0x00000803")


def test_mnist_labels_file_in_images_slot(tmp_path):
    """A 1-D (labels) IDX file where images are expected: magic 0x801 vs 0x803."""
    make_mnist(tmp_path)
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(12, np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_error(e, path, "0x00000801", "0x00000803")


def test_mnist_truncated_gzip(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_error(e, path, "gzip")


def test_mnist_not_gzip(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_error(e, path, "gzip")


@pytest.mark.parametrize("extra", [-100, 7])
def test_mnist_wrong_size(tmp_path, extra):
    make_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:extra] if extra < 0 else raw + b"\0" * extra)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    have = 12 * 28 * 28 + extra
    assert_one_line_error(e, path, f"{have} bytes", "12x28x28", 12 * 28 * 28)


def test_mnist_label_count_mismatch(tmp_path):
    make_mnist(tmp_path, n_train=12)
    path = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_error(e, path, "11 labels", "12 images")


def test_mnist_label_out_of_range(tmp_path):
    make_mnist(tmp_path, n_test=5)
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 10, 3]))
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_error(e, path, "0..9")


# --------------------------------------------------------------------------- real CIFAR-10


def test_cifar10_real(cifar10_dir):
    ds = load_dataset("cifar10", cifar10_dir)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_images.shape == (50000, 32, 32, 3)
    assert ds.test_images.shape == (10000, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.flags.c_contiguous
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
    mean, std = normalization_stats(ds.train_images)
    assert mean.shape == (3,) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, [0.4913, 0.4821, 0.4465], atol=2e-4)
    np.testing.assert_allclose(std, [0.2452, 0.2428, 0.2606], atol=2e-4)
    # data_dir may also be the batches directory itself
    same = load_dataset("cifar10", cifar10_dir / "cifar-10-batches-py")
    np.testing.assert_array_equal(same.test_images, ds.test_images)
    # Each batch compared with its published MD5; the JPEG copy differs (a warning naming
    # them, not an error), the official files would not.
    names = D.CIFAR10_TRAIN_BATCHES + (D.CIFAR10_TEST_BATCH,)
    assert set(ds.data_files) == {str(cifar10_dir / "cifar-10-batches-py" / b) for b in names}
    differ = [p for p, r in ds.data_files.items() if r != "published MD5"]
    assert all(ds.data_files[p].startswith("MD5 ") for p in differ)
    assert (ds.data_warning is None) == (not differ)
    if differ:
        assert ds.data_warning.startswith(f"{len(differ)} of 6 CIFAR-10 files in {cifar10_dir / 'cifar-10-batches-py'}")


# --------------------------------------------------------------------------- synthetic CIFAR-10


def test_cifar10_synthetic_dir_layout(tmp_path):
    """NHWC from channel-major rows: pixel (r, c) of channel k is data[k*1024 + r*32 + c]."""
    tx, ty, sx, sy = make_cifar(tmp_path)
    ds = load_dataset("cifar10", tmp_path, source="files")
    np.testing.assert_array_equal(ds.train_images, tx)
    np.testing.assert_array_equal(ds.train_labels, ty)
    np.testing.assert_array_equal(ds.test_images, sx)
    np.testing.assert_array_equal(ds.test_labels, sy)
    assert ds.source == f"files:{tmp_path / 'cifar-10-batches-py'}"


def test_cifar10_python2_style_pickles(tmp_path):
    """The official files are protocol-2 pickles naming numpy.core.multiarray."""
    tx, _, _, _ = make_cifar(tmp_path, protocol=2)
    for name in D.CIFAR10_TRAIN_BATCHES + (D.CIFAR10_TEST_BATCH,):
        path = tmp_path / "cifar-10-batches-py" / name
        raw = path.read_bytes()
        assert b"cnumpy._core.multiarray\n" in raw
        path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    np.testing.assert_array_equal(load_dataset("cifar10", tmp_path).train_images, tx)


def test_cifar10_tarball(tmp_path):
    src = tmp_path / "src"
    tx, ty, sx, sy = make_cifar(src)
    out = tmp_path / "dl"
    out.mkdir()
    with tarfile.open(out / D.CIFAR10_TARBALL, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset("cifar10", out)
    assert ds.source == f"files:{out / D.CIFAR10_TARBALL}"
    # Not downloaded by jaxnets: each member compared with its batch's published MD5.
    assert sorted(ds.data_files) == sorted(f"{out / D.CIFAR10_TARBALL}:{b}"
                                           for b in D.CIFAR10_TRAIN_BATCHES + (D.CIFAR10_TEST_BATCH,))
    assert ds.data_warning.startswith(f"6 of 6 CIFAR-10 files in {out / D.CIFAR10_TARBALL} differ")
    np.testing.assert_array_equal(ds.train_images, tx)
    np.testing.assert_array_equal(ds.train_labels, ty)
    np.testing.assert_array_equal(ds.test_images, sx)
    np.testing.assert_array_equal(ds.test_labels, sy)


def test_cifar10_truncated_tarball(tmp_path):
    src = tmp_path / "src"
    make_cifar(src, n=200)
    with tarfile.open(tmp_path / D.CIFAR10_TARBALL, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    path = tmp_path / D.CIFAR10_TARBALL
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert_one_line_error(e, path)


def test_cifar10_tarball_missing_member(tmp_path):
    src = tmp_path / "src"
    make_cifar(src)
    (src / "cifar-10-batches-py" / "test_batch").unlink()
    with tarfile.open(tmp_path / D.CIFAR10_TARBALL, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert_one_line_error(e, tmp_path / D.CIFAR10_TARBALL, "test_batch")


def test_cifar10_missing_everything(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, source="files")
    assert_one_line_error(e, tmp_path, "cifar-10-batches-py", D.CIFAR10_TARBALL)


def test_cifar10_missing_batch(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert_one_line_error(e, "data_batch_3", tmp_path / "cifar-10-batches-py", "test_batch")


@pytest.mark.parametrize("corrupt", ["garbage", "truncated", "not_a_dict", "evil"])
def test_cifar10_bad_pickle(tmp_path, corrupt):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    if corrupt == "garbage":
        raw = b"this is not a pickle at all"
    elif corrupt == "truncated":
        raw = raw[: len(raw) // 2]
    elif corrupt == "not_a_dict":
        raw = pickle.dumps([1, 2, 3])
    else:  # a pickle that would run code: refused by the restricted unpickler
        raw = b"cos\nsystem\n(S'echo pwned'\ntR."
    path.write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert_one_line_error(e, path)


def test_cifar10_label_count_mismatch(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    obj = pickle.loads(path.read_bytes())
    obj[b"labels"] = obj[b"labels"][:-1]
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert_one_line_error(e, path, "labels", "equal counts")


def test_cifar10_wrong_row_size(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    obj = pickle.loads(path.read_bytes())
    obj[b"data"] = obj[b"data"][:, :3000]
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert_one_line_error(e, path, "3072")


# --------------------------------------------------------------------------- argument checks


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="unknown source"):
        load_dataset("mnist", tmp_path, source="web")
    with pytest.raises(DataError) as e:  # the default data dir does not exist (yet)
        load_dataset("mnist", source="files")
    assert_one_line_error(e, "--data-dir", D.DATA_DIR_ENV, DL.data_root(), "--data-source auto")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path / "nope", source="files")
    assert_one_line_error(e, tmp_path / "nope")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "a-file")
    assert_one_line_error(e, tmp_path / "a-file", "not a directory")
    assert D.SOURCES == ("auto", "files", "tfds")


def test_auto_fetches_exactly_what_is_missing(tmp_path, monkeypatch):
    """source="auto" asks the downloader for the absent files of the download layout only;
    a dataset present in any layout it reads is loaded without asking."""
    calls = []

    def fake_fetch(name, root, *, names):
        calls.append((name, root, names))
        raise DataError("stop here")

    monkeypatch.setattr(DL, "fetch", fake_fetch)
    with pytest.raises(DataError, match="stop here"):
        load_dataset("mnist")
    assert calls == [("mnist", DL.data_root(), [b + ".gz" for b in D.MNIST_FILES.values()])]
    arrays = make_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", arrays["train_labels"])  # raw
    calls.clear()
    with pytest.raises(DataError, match="stop here"):
        load_dataset("mnist", tmp_path)
    assert calls == [("mnist", tmp_path, ["t10k-images-idx3-ubyte.gz"])]
    calls.clear()
    with pytest.raises(DataError, match="stop here"):
        load_dataset("cifar10", tmp_path)
    assert calls == [("cifar10", tmp_path, [D.CIFAR10_TARBALL])]
    make_cifar(tmp_path / "cifar10")  # root/cifar10/cifar-10-batches-py: read, not fetched
    calls.clear()
    assert load_dataset("cifar10", tmp_path).source == \
        f"files:{tmp_path / 'cifar10' / 'cifar-10-batches-py'}"
    assert calls == []


# --------------------------------------------------------------------------- tfds


def _fake_tfds_load(calls, n=4, hw=(28, 28), channels=None):
    """Stand-in for tfds.load(..., batch_size=-1, as_supervised=True): (images, labels)."""

    def load(name, *, split, batch_size, as_supervised, data_dir, download):
        calls.append(dict(name=name, split=split, batch_size=batch_size,
                          as_supervised=as_supervised, data_dir=data_dir, download=download))
        shape = (n, *hw) + ((channels,) if channels else (1,))
        rng = np.random.default_rng(len(calls))
        return rng.integers(0, 256, shape, dtype=np.uint8), np.arange(n, dtype=np.int64) % 10

    return load


def test_tfds_path_with_fake_load(monkeypatch, tmp_path):
    """The tfds branch calls tfds.load as documented and converts its output."""
    tfds = pytest.importorskip("tensorflow_datasets")
    calls = []
    monkeypatch.setattr(D, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(tfds, "load", _fake_tfds_load(calls, hw=(32, 32), channels=3))
    ds = load_dataset("cifar10", tmp_path, source="tfds")
    assert [c["split"] for c in calls] == ["train", "test"]
    assert all(c["batch_size"] == -1 and c["as_supervised"] and c["name"] == "cifar10"
               and c["data_dir"] == str(tmp_path) and c["download"] is False for c in calls)
    assert ds.train_images.shape == (4, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32
    assert ds.source == f"tfds:{tmp_path}"
    # with no data_dir, tfds's own default directory
    calls.clear()
    monkeypatch.setattr(tfds, "load", _fake_tfds_load(calls))
    ds = load_dataset("mnist", source="tfds")
    assert ds.source == "tfds:default" and calls[0]["data_dir"] is None
    assert ds.test_images.shape == (4, 28, 28, 1)


def test_tfds_failure_becomes_data_error(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve host\nsecond line")

    monkeypatch.setattr(D, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", source="tfds")
    assert_one_line_error(e, "--data-dir", "ConnectionError", "train-images-idx3-ubyte.gz")


def test_tfds_without_the_extra_names_it(monkeypatch):
    """tensorflow-datasets is not a core dependency (issue 27): without it (import blocked
    here), --data-source tfds is one line naming the extra."""
    import sys
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import` raises ImportError
    with pytest.raises(DataError) as e:
        load_dataset("mnist", source="tfds")
    assert_one_line_error(e, "tensorflow-datasets is not installed", "jaxnets[tfds]", "--data-source auto")


@pytest.mark.skipif(HAS_TF, reason="TensorFlow is installed here")
def test_tfds_without_tensorflow_is_a_data_error():
    """The real situation offline: tfds is installed, TensorFlow is not."""
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", source="tfds")
    assert_one_line_error(e, "TensorFlow", "--data-dir", "cifar-10-batches-py")


@pytest.mark.skipif(not HAS_TF, reason="tfds needs TensorFlow (not installed)")
def test_tfds_source_does_not_download(tmp_path, caplog):
    """An empty tfds data dir: a one-line error at once, no download attempt, and none of
    tfds's warnings (it logs one about the missing dataset_info.json through absl)."""
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path, source="tfds")
    assert_one_line_error(e, "does not download", "--data-source auto", "--data-dir")
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == []


@pytest.mark.skipif(not HAS_TF, reason="tfds.testing.mock_data needs TensorFlow (not installed)")
def test_tfds_mock_data(monkeypatch):
    """The real tfds.load under tfds.testing.mock_data (random examples, no download).

    Workaround: mock datasets carry no split sizes, so batch_size=-1 becomes
    padded_batch(sys.maxsize), which aborts the process in TensorFlow 2.21
    (std::length_error); giving the splits a size avoids it.
    """
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds.core.splits.SplitDict, "total_num_examples",
                        property(lambda self: 7))
    with tfds.testing.mock_data(num_examples=7):
        for name, shape in (("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))):
            ds = load_dataset(name, source="tfds")
            assert ds.train_images.shape == (7, *shape) and ds.train_images.dtype == np.uint8
            assert ds.test_labels.shape == (7,) and ds.test_labels.dtype == np.int32
            assert ds.source == "tfds:default"


# --------------------------------------------------------------------------- stats / split


def test_normalization_stats_matches_float64():
    x = np.random.default_rng(0).integers(0, 256, (37, 5, 6, 3), dtype=np.uint8)
    mean, std = normalization_stats(x)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32
    fmean, fstd = normalization_stats(ref.astype(np.float32))  # floats taken as [0, 1]
    np.testing.assert_allclose(fmean, mean, rtol=1e-5)
    np.testing.assert_allclose(fstd, std, rtol=1e-5)
    with pytest.raises(ValueError):
        normalization_stats(x[:, :, :, 0])


def test_normalization_stats_exclude_equals_stats_of_the_rest_bit_for_bit():
    x = np.random.default_rng(1).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    val = np.array([3, 7, 8, 20, 49])
    rest = np.delete(x, val, axis=0)
    for got, want in zip(normalization_stats(x, exclude=val), normalization_stats(rest)):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(normalization_stats(x)[0], normalization_stats(rest)[0])  # the exclusion matters
    with pytest.raises(ValueError, match="no images"):
        normalization_stats(x, exclude=np.arange(50))


def test_split_validation_deterministic_and_disjoint():
    n = 1000
    images = np.arange(n)[:, None, None, None] * np.ones((1, 2, 2, 1), np.int64)
    labels = np.arange(n) % 10
    a = split_validation(images, labels, 100, seed=3)
    b = split_validation(images, labels, 100, seed=3)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    tx, ty, vx, vy = a
    assert tx.shape == (900, 2, 2, 1) and vx.shape == (100, 2, 2, 1)
    train_ids, val_ids = tx[:, 0, 0, 0], vx[:, 0, 0, 0]
    assert not set(train_ids) & set(val_ids)
    assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == list(range(n))
    np.testing.assert_array_equal(ty, train_ids % 10)  # labels stay with their images
    np.testing.assert_array_equal(vy, val_ids % 10)
    assert not np.array_equal(vx, split_validation(images, labels, 100, seed=4)[2])
    assert not np.array_equal(val_ids, np.arange(100))  # actually shuffled
    tx0, ty0, vx0, vy0 = split_validation(images, labels, 0, seed=0)
    np.testing.assert_array_equal(tx0, images)
    assert len(vx0) == 0 and len(vy0) == 0


@pytest.mark.parametrize("val_size", [-1, 10, 11])
def test_split_validation_rejects_bad_sizes(val_size):
    x, y = np.zeros((10, 2)), np.zeros(10)
    with pytest.raises(ValueError, match="val_size"):
        split_validation(x, y, val_size, seed=0)


def test_split_validation_rejects_length_mismatch():
    with pytest.raises(ValueError, match="labels"):
        split_validation(np.zeros((10, 2)), np.zeros(9), 2, seed=0)


def test_dataset_is_frozen(tmp_path):
    make_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path)
    with pytest.raises(Exception):
        ds.name = "other"
    assert "mnist" in repr(ds) and "(12, 28, 28, 1)" in repr(ds)
