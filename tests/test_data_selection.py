"""--classes and --labels-per-class: which images a run trains, validates and tests on."""

import json

import numpy as np
import pytest

from jaxnets import cli, load_run, sweep
from jaxnets import data as D
from jaxnets import steps as S
from jaxnets import training as T
from jaxnets.config import TrainConfig, format_setting, parse_setting

quiet = dict(log=lambda *_: None)


def synthetic(n_train=400, n_test=100, seed=0):
    """Random 8x8 'CIFAR' images, ten classes, each image's first pixel its label (to trace rows)."""
    rng = np.random.default_rng(seed)
    def split(n):
        y = rng.integers(0, 10, n).astype(np.int32)
        x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        x[:, 0, 0, 0] = y
        return x, y
    (tx, ty), (vx, vy) = split(n_train), split(n_test)
    return D.Dataset("cifar10", tx, ty, vx, vy, 10, "synthetic")


def test_classes_setting_parses_and_is_checked():
    assert parse_setting("classes", "5,6,7,8,9") == (5, 6, 7, 8, 9)
    assert format_setting((5, 6), "classes") == "5,6"
    for classes, message in (((5, 5), "class 5 more than once"), ((3, 10), "unknown class 10"),
                             ((3,), "at least 2 classes")):
        with pytest.raises(ValueError, match="--classes") as e:
            TrainConfig(classes=classes).validate()
        assert message in str(e.value)
    with pytest.raises(ValueError, match="--labels-per-class must be >= 0"):
        TrainConfig(labels_per_class=-1).validate()


def test_select_classes_keeps_and_relabels_in_the_given_order():
    ds = synthetic()
    sel = D.select_classes(ds, (7, 2, 5))
    assert sel.num_classes == 3 and sel.class_ids == (7, 2, 5)
    for split in ("train", "test"):
        labels, images = getattr(sel, f"{split}_labels"), getattr(sel, f"{split}_images")
        original = images[:, 0, 0, 0]  # each image's first pixel is its original class
        assert set(labels.tolist()) == {0, 1, 2}
        assert np.array_equal(np.array([7, 2, 5])[labels], original)
        assert len(labels) == np.isin(getattr(ds, f"{split}_labels"), [7, 2, 5]).sum()
    assert D.select_classes(sel, (7, 2, 5)) is sel  # already selected: unchanged
    with pytest.raises(ValueError, match="holds classes 7,2,5 already"):
        D.select_classes(sel, (1, 2))


def test_labels_per_class_is_a_seeded_balanced_subset_before_the_validation_split():
    ds = synthetic(n_train=600)
    pool_x, pool_y = S.training_pool(ds, TrainConfig(classes=(1, 4), val_size=0, batch_size=4))
    split = lambda **kw: S.member_split(pool_x, pool_y, TrainConfig(classes=(1, 4), batch_size=4, **kw))
    train_idx, val_idx, mean, _ = split(labels_per_class=10, val_size=0, seed=3)
    assert np.bincount(pool_y[train_idx]).tolist() == [10, 10] and len(val_idx) == 0
    assert np.allclose(mean, D.normalization_stats(pool_x[train_idx])[0])  # the subset's own statistics
    assert np.array_equal(split(labels_per_class=10, val_size=0, seed=3)[0], train_idx)  # seeded
    assert not np.array_equal(split(labels_per_class=10, val_size=0, seed=4)[0], train_idx)
    t, v, _, _ = split(labels_per_class=10, val_size=5, seed=3)  # validation out of the 20 labelled images
    assert len(t) == 15 and len(v) == 5 and set(t) | set(v) == set(train_idx)
    with pytest.raises(ValueError, match=r"--labels-per-class 1000 is more than the \d+ training images of class"):
        split(labels_per_class=1000, val_size=0)


def test_a_run_on_classes_trains_tests_and_loads_back_with_k_outputs(tmp_path):
    ds = synthetic()
    config = TrainConfig(model="mlp", hidden_units=(16,), dataset="cifar10", classes=(9, 3), labels_per_class=15,
                         val_size=4, batch_size=8, epochs=1, progress=False, out=str(tmp_path / "run"))
    T.train(config, dataset=ds, **quiet)
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["classes"] == 2 and info["config"]["classes"] == [9, 3] and info["config"]["labels_per_class"] == 15
    assert info["train_examples"] == 26 and info["val_examples"] == 4
    assert info["test_examples"] == np.isin(ds.test_labels, [9, 3]).sum()
    run = load_run(tmp_path / "run")
    assert run.class_ids == (9, 3) and run.predict(ds.test_images[:5]).shape == (5, 2)
    assert run.evaluate(ds)["examples"] == info["test_examples"]  # the full dataset, scored on classes 9 and 3


def test_sweep_members_share_the_classes_and_draw_their_own_labelled_images(tmp_path):
    ds = synthetic()
    base = TrainConfig(model="mlp", hidden_units=(16,), dataset="cifar10", classes=(0, 1, 2), labels_per_class=10,
                       val_size=0, batch_size=10, epochs=1, progress=False, out=str(tmp_path / "sweep"))
    rows = sweep.sweep(base, {"seed": [0, 1]}, dataset=ds, **quiet)
    assert len(rows) == 2 and len({r["group"] for r in rows}) == 1
    for member in sorted((tmp_path / "sweep").glob("0*")):
        info = json.loads((member / "config.json").read_text())
        assert info["classes"] == 3 and info["train_examples"] == 30
    with pytest.raises(ValueError, match="--labels-per-class 500"):
        sweep.sweep(TrainConfig(**{**vars(base), "labels_per_class": 500, "out": str(tmp_path / "s2")}),
                    {"seed": [0, 1]}, dataset=ds, **quiet)
    assert not (tmp_path / "s2").exists()


def test_cli_refuses_too_many_labels_per_class_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(D, "load_dataset", lambda *a, **k: synthetic())
    code = cli.main(["--model", "mlp", "--dataset", "cifar10", "--classes", "5,6", "--labels-per-class", "400",
                     "--val-size", "0", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--labels-per-class 400" in err[0]
    assert not (tmp_path / "run").exists()
