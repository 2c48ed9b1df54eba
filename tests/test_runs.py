"""Run directories (issue 16): the run files' integrity (atomic writes on a full disk, strict
JSON, checksummed checkpoints, validated config.json, the lock), the loop's promises about
them (an epoch-1 interrupt restarts cleanly, data refused before training, null not NaN, a
warning at chance, the memory estimate), sweep directories (lock, a refused sweep leaves
nothing that blocks it) and a trained run loaded back in a fresh process."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ (the synthetic digits) is not an installed package
from benchmarks.faults import digits  # noqa: E402
from jaxnets import data as D  # noqa: E402
from jaxnets import cost, plots, runs  # noqa: E402
from jaxnets import sweep  # noqa: E402
from jaxnets import training as T  # noqa: E402
from jaxnets.config import TrainConfig  # noqa: E402
from jaxnets.runs import TrainingError  # noqa: E402
from jaxnets.steps import build_model, memory_settings  # noqa: E402
from conftest import scaled_timeout  # noqa: E402  (tests/ is on sys.path under pytest)


def dataset(*, test_shape=(28, 28), n_test=200, labels=(None, None)):
    """600 training and ``n_test`` test images of :func:`benchmarks.faults.digits` (learnable
    in one epoch; ``labels`` fixes each split's class)."""
    (x, y), (tx, ty) = digits(600, label=labels[0], seed=0), digits(n_test, test_shape, label=labels[1], seed=1)
    return D.Dataset("mnist", x[..., None], y, tx[..., None], ty, 10, "synthetic")


def config(out, **settings):
    """A tiny MLP: 10 steps of 50 per epoch (100 images held out)."""
    base = dict(out=str(out), progress=False, hidden_units=(16,), dropout=0.0, val_size=100, batch_size=50, epochs=2)
    return TrainConfig(**{**base, **settings})


def strict(path):
    """JSON as strict readers take it: a bare NaN or Infinity is an error."""
    def reject(name):
        raise ValueError(f"{path}: bare {name}")
    return json.loads(Path(path).read_text(), parse_constant=reject)


def quiet(*_):
    pass


pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 2-epoch run of :func:`config` on :func:`dataset` (never modified)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    T.train(config(run), dataset=dataset(), log=quiet)
    return run


def full_disk(monkeypatch, times=None):
    """fsync fails as on a full disk (what write_atomic meets after its data is buffered):
    always, or the next ``times`` calls."""
    fsync, left = os.fsync, [times]

    def full(fd):
        if left[0] == 0:
            return fsync(fd)
        left[0] = None if left[0] is None else left[0] - 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)


# ------------------------------------------------------------------------ run files


def test_full_disk_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.msgpack"
    path.write_bytes(b"the last good one")
    full_disk(monkeypatch)
    with pytest.raises(TrainingError, match=r"checkpoint\.msgpack: cannot write \(No space left on device\); "
                                            r"the previous version is kept"):
        runs.write_atomic(path, b"new" * 1000)
    assert path.read_bytes() == b"the last good one" and os.listdir(tmp_path) == ["checkpoint.msgpack"]


def test_curves_on_a_full_disk_are_one_error_naming_the_file(tmp_path, monkeypatch):
    metrics = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_accuracy": 0.5, "val_accuracy": 0.4}]
    full_disk(monkeypatch)
    with pytest.raises(TrainingError, match=r"curves\.png: cannot write"):
        plots.plot_curves(metrics, tmp_path / "curves.png")
    assert os.listdir(tmp_path) == []


def test_run_files_are_strict_json():
    assert runs.json_text({"a": float("nan"), "b": [float("inf"), 1.5], "c": (2,)}, indent=None) == \
        '{"a": null, "b": [null, 1.5], "c": [2]}'


@pytest.mark.parametrize("text, says", [
    ("{oops", r"summary\.json: not valid JSON"),
    ("[1, 2]", r"summary\.json: expected a JSON object, got list"),
])
def test_invalid_run_json_names_the_file(tmp_path, text, says):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(TrainingError, match=says):
        runs.read_summary(tmp_path)


@pytest.mark.parametrize("settings, says", [
    ({}, None),  # every setting at its default: valid
    ({"lr": -1.0}, r"config\.json: --lr must be in \(0, inf\), got -1\.0"),
    ({"learning_rate": 0.1}, r"config\.json: unknown settings learning_rate"),
    ({"epochs": "three"}, r"config\.json: --epochs must be an integer"),
])
def test_config_json_settings_are_validated_naming_the_file(tmp_path, settings, says):
    (tmp_path / "config.json").write_text(json.dumps({"config": settings}))
    if says is None:
        assert runs.read_config(tmp_path)["config"] == {}
    else:
        with pytest.raises(TrainingError, match=says):
            runs.read_config(tmp_path)


def test_damaged_checkpoints_are_refused(tmp_path):
    params = {"w": np.arange(1000, dtype=np.float32)}
    runs.save_checkpoint(tmp_path, params, {}, {}, jax.random.key(0), 3)
    assert runs.checkpoint_epoch(tmp_path) == 3
    good = (tmp_path / runs.CHECKPOINT).read_bytes()
    np.testing.assert_array_equal(runs.read_checkpoint(tmp_path)["params"]["w"], params["w"])
    flipped = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 50):  # inside the parameters' bytes
        flipped[i] ^= 0xFF
    for damaged, says in ((bytes(flipped), "SHA-256 mismatch"), (good[:len(good) // 2], "cannot read it"),
                          (b"", "cannot read it")):
        (tmp_path / runs.CHECKPOINT).write_bytes(damaged)
        with pytest.raises(TrainingError, match=f"checkpoint.msgpack: damaged checkpoint.*{says}"):
            runs.read_checkpoint(tmp_path)


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_ones(tmp_path):
    lock = tmp_path / runs.LOCK
    with runs.RunLock(tmp_path):
        assert lock.read_text() == f"jaxnets-lock {os.getpid()} {os.uname().nodename}\n"  # there with its owner at once
        with pytest.raises(TrainingError, match=rf"another process is writing this run \(PID {os.getpid()} on "):
            runs.RunLock(tmp_path).__enter__()
    assert os.listdir(tmp_path) == []  # released, and no temporary owner file left
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale in (f"{dead.pid} {os.uname().nodename}\n", f"jaxnets-lock {dead.pid} {os.uname().nodename}\n"):
        lock.write_text(stale)  # a dead process's lock, in the record before issue 26 and now
        with runs.RunLock(tmp_path):
            assert lock.read_text().startswith(f"jaxnets-lock {os.getpid()} ")
    lock.write_text(f"{os.getpid()} another-host\n")  # another machine's process: cannot tell, so kept
    with pytest.raises(TrainingError, match="another process"):
        runs.RunLock(tmp_path).__enter__()


@pytest.mark.parametrize("mine", ["", "garbage", "my notes\n", "123 host extra\n"])
def test_a_users_file_named_lock_is_never_taken_over(tmp_path, mine):
    # Issue 26: a user's .lock in --out counted the directory as empty and the lock deleted it.
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.LOCK).write_text(mine)
    for new in (True, False):
        with pytest.raises(TrainingError, match=f"{run}.*already holds files" if new else
                           rf"{run / runs.LOCK}: not a jaxnets lock \(no owner record in it"):
            runs.prepare_run_dir(run, new=new)
            runs.RunLock(run).__enter__()
    with pytest.raises(TrainingError, match="already holds files"):
        T.train(config(run), dataset=dataset(), log=quiet)
    with pytest.raises(TrainingError, match="already holds files"):
        sweep.sweep(config(run), {"seed": [0, 1]}, out=run, dataset=dataset(), log=quiet, progress=False)
    assert [p.name for p in run.iterdir()] == [runs.LOCK] and (run / runs.LOCK).read_text() == mine


def test_deferred_interrupts_finish_the_block_first():
    # The handlers the block replaces and restores are set here: a pytest started as a
    # script's background job (or under nohup) has SIGINT ignored, not Python's default.
    def outside(signum, frame):
        raise AssertionError("SIGTERM reached the handler outside the block")

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, outside)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with runs.deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("metrics")
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("checkpoint")
        assert done == ["metrics", "checkpoint"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------- the loop's promises


def test_interrupt_in_epoch_1_restarts_cleanly(finished, tmp_path, monkeypatch):
    # Defect 3: stopped before the first checkpoint, the run used to be a dead end (nothing
    # to resume, and a rerun refused for the files it had written).
    save = T.save_checkpoint

    def interrupted_at_first(*args, **kwargs):
        monkeypatch.setattr(T, "save_checkpoint", save)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", interrupted_at_first)
    run, lines = tmp_path / "run", []
    with pytest.raises(KeyboardInterrupt):
        T.train(config(run), dataset=dataset(), log=lines.append)
    assert "no epoch finished, so --resume starts it from the first epoch" in lines[-1]
    summary = strict(run / "summary.json")
    assert summary["status"] == "interrupted" and summary["epochs"] == 0 and runs.read_metrics(run) == []
    resumed = T.train(resume=run, dataset=dataset(), log=lines.append)
    assert "no epoch had finished, starting from the first" in "\n".join(lines)
    assert [m["epoch"] for m in runs.read_metrics(run)] == [1, 2]
    assert resumed["test_loss"] == strict(finished / "summary.json")["test_loss"]  # as if never stopped


def test_a_write_failing_in_a_resumed_run_leaves_files_that_agree(tmp_path, monkeypatch):
    # A full disk at epoch 3's checkpoint of a run resumed after epoch 1: the error comes out,
    # and the summary and metrics end at the checkpoint (epoch 2), not at the first start's 1.
    run = tmp_path / "run"

    def stop_after_first(record, params, state):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(config(run, epochs=3), dataset=dataset(), log=quiet, on_epoch_end=stop_after_first)
    assert strict(run / "summary.json")["epochs"] == 1
    save = T.save_checkpoint

    def full_at_epoch_3(run_dir, params, state, opt_state, key, epoch, **kwargs):
        if epoch == 3:
            full_disk(monkeypatch, times=1)
        return save(run_dir, params, state, opt_state, key, epoch, **kwargs)

    monkeypatch.setattr(T, "save_checkpoint", full_at_epoch_3)
    with pytest.raises(TrainingError, match=r"checkpoint\.msgpack: cannot write \(No space left on device\)"):
        T.train(resume=run, dataset=dataset(), log=quiet)
    summary = strict(run / "summary.json")
    assert summary["status"].startswith("failed: ") and summary["epochs"] == 2 == runs.checkpoint_epoch(run)
    assert [m["epoch"] for m in runs.read_metrics(run)] == [1, 2]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == runs.LOCK]


@pytest.mark.parametrize("test_shape, n_test, says", [
    ((28, 28), 0, "the test split is empty"),
    ((27, 27), 200, r"test images of shape \(27, 27, 1\) differ from the training images' \(28, 28, 1\)"),
])
def test_test_split_is_checked_before_training(tmp_path, test_shape, n_test, says):
    # Defect 5: found only after a whole training run (or ending with accuracy NaN, exit 0).
    with pytest.raises(D.DataError, match=says):
        T.train(config(tmp_path / "run"), dataset=dataset(test_shape=test_shape, n_test=n_test), log=quiet)
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing


def test_no_validation_split_writes_null_not_nan(tmp_path):
    run = tmp_path / "run"
    T.train(config(run, val_size=0, epochs=1), dataset=dataset(), log=quiet)
    summary, metrics = strict(run / "summary.json"), runs.read_metrics(run)
    assert summary["best_val_accuracy"] is None and summary["final_val_accuracy"] is None
    assert metrics[0]["val_loss"] is None and metrics[0]["val_accuracy"] is None
    assert "NaN" not in (run / "metrics.jsonl").read_text() and summary["test_accuracy"] > 0.5


def test_run_at_chance_gets_a_warning(tmp_path):
    # Defect 7: every training label 0, every test label 1 -- test accuracy 0, nothing learned.
    run, lines = tmp_path / "run", []
    summary = T.train(config(run), dataset=dataset(labels=(0, 1)), log=lines.append)
    assert summary["status"] == "completed" and summary["test_accuracy"] == 0.0
    assert "at chance for 10 classes" in strict(run / "summary.json")["warning"]
    assert any(line.startswith("warning: test accuracy 0.00% is at chance") for line in lines)


def test_memory_estimate_refuses_what_cannot_fit(tmp_path):
    huge = config(tmp_path / "run", hidden_units=(60000, 60000))
    # Adam: parameters x (1 + 2 slots + gradient + update + previous) float32.
    n_params = 784 * 60000 + 60000 + 60000 * 60000 + 60000 + 60000 * 10 + 10
    model = lambda c: build_model(c, (28, 28, 1), 10)
    assert cost.memory_parts(model(huge), **memory_settings(huge))["state"] == 4 * n_params * 6
    assert f"{4 * n_params * 6 / 2**30:.1f}" == "81.5"
    with pytest.raises(ValueError, match=r"parameters and optimizer state 81\.5 GiB.*more than the 1\.0 GiB available: "
                                         r"use a smaller model"):
        cost.check_memory(model(huge), **memory_settings(huge), available=2**30)
    wide_batch = config(tmp_path / "run", batch_size=10**7)
    with pytest.raises(ValueError, match=r"use a smaller --batch-size \(now 10000000\)"):
        cost.check_memory(model(wide_batch), **memory_settings(wide_batch), available=2**30)
    small = config(tmp_path / "run")
    assert cost.check_memory(model(small), **memory_settings(small), available=2**30) < 2**30
    with pytest.raises(ValueError, match="more than the .* GiB available"):  # a single run, before init
        T.train(huge, dataset=dataset(), log=quiet)
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing


# ---------------------------------------------------------------------------- sweeps


def test_a_sweep_is_run_by_one_process_at_a_time(tmp_path):
    out, base, axes = tmp_path / "sweep", config(tmp_path / "sweep"), {"seed": [0, 1]}
    out.mkdir()
    sweep._write_plan(out, base, axes, ["000-seed=0", "001-seed=1"], [[0, 1]])
    (out / runs.LOCK).write_text(f"{os.getpid()} {os.uname().nodename}\n")
    with pytest.raises(TrainingError, match="another process is writing this run"):
        sweep.sweep(base, axes, out=out, resume=True, dataset=dataset(), log=quiet, progress=False)


def test_a_sweep_refused_on_its_data_leaves_nothing_that_blocks_it(tmp_path):
    out, axes = tmp_path / "sweep", {"seed": [0, 1]}
    too_big = config(out, batch_size=1000)  # larger than the 500 training images: refused after the plan
    with pytest.raises(ValueError, match="batch_size 1000 exceeds"):
        sweep.sweep(too_big, axes, out=out, dataset=dataset(), log=quiet, progress=False)
    assert not out.exists()  # refused on its data: nothing left behind
    with pytest.raises(TrainingError, match=r"--resume .*sweep: no such sweep directory"):  # nor made by a resume
        sweep.sweep(config(out), axes, out=out, resume=True, dataset=dataset(), log=quiet, progress=False)
    assert not out.exists()
    # A resume of an empty directory starts the sweep (and here meets the same refusal, not "no plan").
    out.mkdir()
    with pytest.raises(ValueError, match="batch_size 1000 exceeds"):
        sweep.sweep(too_big, axes, out=out, resume=True, dataset=dataset(), log=quiet, progress=False)
    with pytest.raises(ValueError, match="--devices 2: a sweep trains each member on one device"):
        sweep.sweep(config(tmp_path / "other", devices=2), axes, dataset=dataset(), log=quiet, progress=False)
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------- load_run


def test_a_run_loads_back_in_a_fresh_process(finished, tmp_path):
    test = dataset()
    np.savez(tmp_path / "test.npz", images=test.test_images, labels=test.test_labels)
    code = ("import sys, json, numpy as np, jaxnets; run = jaxnets.load_run(sys.argv[1]); d = np.load(sys.argv[2]); "
            "p = run.predict(d['images']); r = run.evaluate(images=d['images'], labels=d['labels']); "
            "print(json.dumps(dict(r, sums=[float(p.sum(1).min()), float(p.sum(1).max())], "
            "argmax_accuracy=float((p.argmax(1) == d['labels']).mean()), epoch=run.epoch)))")
    child = subprocess.run([sys.executable, "-c", code, str(finished), str(tmp_path / "test.npz")],
                           capture_output=True, text=True, timeout=scaled_timeout(120), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == 0, child.stderr
    got, summary = json.loads(child.stdout.splitlines()[-1]), strict(finished / "summary.json")
    assert got["epoch"] == 2 and got["examples"] == 200
    assert got["accuracy"] == got["argmax_accuracy"] == summary["test_accuracy"]
    assert got["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert got["sums"] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_predict_accepts_uint8_and_unit_floats_and_refuses_the_rest(finished):
    run, images = runs.load_run(finished), dataset().test_images[:5]
    probs = run.predict(images)
    np.testing.assert_allclose(run.predict(images / np.float32(255)), probs, atol=1e-5)
    np.testing.assert_allclose(run.predict((images / 255.0).astype(np.float64)), probs, atol=1e-5)
    for given, says in [
        (images.astype(np.int64), r"given int64 of shape \(5, 28, 28, 1\), neither uint8 nor floating point"),
        (images.astype(np.float32), r"given float32 .*values 0\.\.\d+ \(a 0\.\.255 float image: divide it by 255\)"),
        (np.full(images.shape, -0.5, np.float32), r"values -0\.5\.\.-0\.5;"),
        (np.where(images == 0, np.nan, images / 255.0), r"holding \d+ NaN or infinite values"),
        (np.full(images.shape, np.inf, np.float32), r"holding 3920 NaN or infinite values"),
        (images[:0], r"given uint8 of shape \(0, 28, 28, 1\), an empty batch"),
        (images[0], r"given uint8 of shape \(28, 28, 1\), one image without a batch axis \(pass images\[None\]\)"),
        (images[:, :27], r"given uint8 of shape \(5, 27, 28, 1\);"),
        (images[..., 0], r"given uint8 of shape \(5, 28, 28\);"),
    ]:
        for call in (run.predict, lambda x: run.evaluate(images=x, labels=np.zeros(len(x)))):
            with pytest.raises(ValueError, match=says) as e:
                call(given)
            assert "\n" not in str(e.value)
            assert r"expected images of shape (N, 28, 28, 1) with N >= 1, as uint8 pixels 0..255 or floating " \
                   "point in [0, 1]" in str(e.value)


def test_a_checkpoint_copied_in_from_another_run_is_refused(finished, tmp_path):
    # Issue 26: a tanh run's checkpoint in a relu run's directory (same shapes) loaded silently.
    tanh = tmp_path / "tanh"
    T.train(config(tanh, activation="tanh", epochs=1), dataset=dataset(), log=quiet)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    (run / runs.CHECKPOINT).write_bytes((tanh / runs.CHECKPOINT).read_bytes())
    says = (rf"{run / runs.CHECKPOINT} belongs to another run \(run id [0-9a-f]+\) than {run / 'config.json'} "
            rf"\(run id [0-9a-f]+\)")
    with pytest.raises(TrainingError, match=says):
        runs.load_run(run)
    with pytest.raises(TrainingError, match=says):
        T.train(resume=run, changes={"epochs": 3}, log=quiet)
    assert (run / "config.json").read_bytes() == before["config.json"]  # refused before config.json was touched
    # Without run ids (another config.json's copy): the settings that differ are named.
    info = json.loads((run / "config.json").read_text())
    del info["run_id"]
    (run / "config.json").write_text(json.dumps(info))
    with pytest.raises(TrainingError, match=rf"belongs to another run than {run / 'config.json'}: --activation tanh "
                                            rf"in the checkpoint, relu in config.json"):
        runs.load_run(run)


def test_a_checkpoint_without_a_run_record_loads_with_a_note(finished, tmp_path):
    # Checkpoints written before issue 26 (committed runs among them) still load, unchecked, saying so.
    from flax import serialization
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    raw = runs.read_checkpoint(run)
    raw.pop("run")
    body = serialization.msgpack_serialize(raw)
    (run / runs.CHECKPOINT).write_bytes(serialization.msgpack_serialize(
        {"format": "jaxnets-checkpoint-1", "sha256": hashlib.sha256(body).hexdigest(), "body": body}))
    with pytest.warns(UserWarning, match="written before checkpoints recorded their run; not checked"):
        loaded = runs.load_run(run)
    np.testing.assert_allclose(loaded.predict(dataset().test_images[:5]),
                               runs.load_run(finished).predict(dataset().test_images[:5]), atol=1e-6)
    lines = []
    T.train(resume=run, changes={"epochs": 3}, dataset=dataset(), log=lines.append)
    assert any(line.startswith("note: ") and "not checked against config.json" in line for line in lines)
    assert "run" in runs.read_checkpoint(run)  # the resumed run's new checkpoint records its run


def test_a_sweep_checks_every_member_on_the_data_before_the_first_trains(tmp_path):
    # Issue 26: a later member's --val-size leaving no training images failed after the first trained.
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match=r"sweep member 001-val_size=600: val_size 600 leaves no training data "
                                         r"\(600 examples\)"):
        sweep.sweep(config(out), {"val_size": [100, 600]}, out=out, dataset=dataset(), log=quiet, progress=False)
    assert not out.exists()  # nothing trained, no plan: the directory is no dead end
    with pytest.raises(ValueError, match=r"--train-subset 1000 is more than the 600 training images there are"):
        sweep.sweep(config(out), {"train_subset": [0, 1000]}, out=out, dataset=dataset(), log=quiet, progress=False)
    assert not out.exists()


def test_a_train_subset_larger_than_the_data_is_refused(tmp_path):
    # Issue 26: trained on the 600 images there are while config.json recorded 1000.
    with pytest.raises(ValueError, match=r"--train-subset 1000 is more than the 600 training images there are"):
        T.train(config(tmp_path / "run", train_subset=1000), dataset=dataset(), log=quiet)
    assert not (tmp_path / "run" / "config.json").exists()


def test_evaluate_refuses_labels_it_would_truncate_wrap_or_index_out_of_bounds(finished):
    """Issue 26 (found beyond its list): float labels were truncated, -1 and 10 silently gave
    accuracy 0 / loss NaN, labels without images evaluated the test split instead; a bad
    batch_size was a ZeroDivisionError."""
    run, images = runs.load_run(finished), dataset().test_images[:3]
    assert run.evaluate(images=images, labels=np.array([0, 1, 2]))["examples"] == 3
    for labels, says in [(np.array([0, 1, 10]), r"given int64 of shape \(3,\), values 0\.\.10; expected 3 integer class "
                                                r"indices 0\.\.9, shape \(3,\)"),
                         (np.array([-1, 1, 2]), r"values -1\.\.2"),
                         (np.array([0.5, 1, 2]), r"given float64 of shape \(3,\), not integers"),
                         (np.array([True, False, True]), r"given bool .*not integers"),
                         (np.array([0, 1]), r"given int64 of shape \(2,\); expected 3 integer")]:
        for x in (images, images / np.float32(255)):  # the uint8 program and predict's path alike
            with pytest.raises(ValueError, match=says) as e:
                run.evaluate(images=x, labels=labels)
            assert str(e.value).startswith("labels: given ") and "\n" not in str(e.value)
    for kwargs in ({"images": images}, {"labels": [0, 1, 2]}, {"dataset": dataset(), "images": images, "labels": [0]}):
        with pytest.raises(ValueError, match=r"evaluate: give images and labels together"):
            run.evaluate(**kwargs)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
            run.predict(images, batch_size=bad)
    with pytest.raises(TypeError, match=r"load_run: expected the path of a run directory, got NoneType"):
        runs.load_run(None)
    with pytest.raises(TrainingError, match=r"config\.json: a file, not a run directory"):
        runs.load_run(finished / "config.json")


@pytest.mark.parametrize("key, value, says", [
    ("image_shape", "x", r'"image_shape" is "x"; expected a list of 3 positive integers'),
    ("image_shape", [28, 28], r'"image_shape" is \[28, 28\]'),
    ("classes", "ten", r'"classes" is "ten"; expected a positive integer'),
    ("classes", 0, r'"classes" is 0'),
    ("resumes", {}, r'"resumes" is \{\}; expected a list of objects'),
    ("run_id", 5, r'"run_id" is 5; expected a non-empty string'),
])
def test_a_config_json_edited_by_hand_is_refused_naming_the_entry(finished, tmp_path, key, value, says):
    """Issue 26 (found beyond its list): an edited image_shape/classes reached the model as a
    numpy UFuncTypeError or an int() ValueError, or (image_shape [28, 28]) built a model for
    other images; a resumes object was an AttributeError traceback on --resume."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    info = json.loads((run / "config.json").read_text())
    info[key] = value
    (run / "config.json").write_text(json.dumps(info))
    with pytest.raises(TrainingError, match=r"config\.json: " + says):
        runs.load_run(run)


def test_metrics_with_a_lost_epoch_are_refused_before_a_resume_writes(finished, tmp_path):
    """Issue 26 (found beyond its list): a metrics.jsonl that lost its last line resumed to
    epochs 1, 3 (epoch 2 never recorded again); one that lost its first is out of order."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0])
    with pytest.raises(TrainingError, match=r"metrics\.jsonl: has metrics for epoch 1, but checkpoint\.msgpack is of "
                                            r"epoch 2; a resume would leave epoch 2 without metrics"):
        T.train(resume=run, changes={"epochs": 3}, log=quiet)
    (run / "metrics.jsonl").write_text(lines[1])
    with pytest.raises(TrainingError, match=r"metrics\.jsonl, line 1: epoch 2 after no epoch; expected epoch 1"):
        T.train(resume=run, changes={"epochs": 3}, log=quiet)
    assert json.loads((run / "config.json").read_text()) == json.loads((finished / "config.json").read_text())


def test_a_resume_in_a_read_only_directory_names_resume(finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    monkeypatch.setattr(runs.os, "access", lambda path, mode: Path(path) != run)  # as on a read-only mount
    with pytest.raises(TrainingError, match=r"^--resume .*run: the directory is not writable \(a resume writes"):
        T.train(resume=run, changes={"epochs": 3}, log=quiet)
