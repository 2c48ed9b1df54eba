"""Data parallelism (jaxnets.parallel): equality with the single-device step, and multi-process runs.

The multi-device checks run in a subprocess with 4 simulated CPU devices (the device count
is fixed when JAX starts, so it cannot change inside the pytest process).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import scaled_timeout  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = Path(__file__).resolve().parents[1]

# One run of a few steps on the same global batches, 1 device (the ordinary group chunk)
# vs 4 devices (shard_map + pmean): ``compare`` records the largest loss and parameter
# differences.
COMMON = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxnets import models as M, optim, parallel, steps, training as T
    from jaxnets.config import TrainConfig
    assert len(jax.devices()) == 4, jax.devices()
    mesh = parallel.make_mesh(jax.devices())
    rng = np.random.default_rng(0)
    results = {}

    def run(config, model, images, labels, chunk):
        optimizer = optim.build_optimizer(config, 100)
        params, state = model.init(jax.random.key(1))
        opt_state = optim.with_hparams(optimizer.init(params), optim.hparams_of(config))
        one = lambda a: jnp.asarray(a)[None]
        carry = jax.tree_util.tree_map(one, (params, state, opt_state, jnp.zeros((), bool)))
        perm = np.random.default_rng(2).permutation(len(labels)).astype(np.int32)
        keys = jax.random.split(jax.random.key(3), 1)
        mean, std = one(np.float32(0.5)), one(np.float32(0.25))
        hps = jax.tree_util.tree_map(one, optim.hparams_of(config))
        if chunk is steps.make_parallel_chunk:  # each device holds its slice of every batch
            fn = chunk(model, optimizer, config, mesh)
            carry, rest = parallel.replicate((carry, (keys, mean, std, hps, np.int32(0))), mesh)
            args = (*parallel.place_epoch(images, labels, perm, len(labels) // config.batch_size, config.batch_size, mesh),
                    *rest)
        else:
            fn = chunk(model, optimizer, config)
            args = (jnp.asarray(images), jnp.asarray(labels), one(perm), keys, mean, std, hps, 0)
        (params, state, _, _), (losses, _) = fn(carry, *args, np.int32(3), length=3)
        return np.asarray(losses[0]), jax.tree_util.tree_leaves(jax.device_get((params, state)))

    def record(name, ref, dp):
        loss_err = float(np.max(np.abs(ref[0] - dp[0])))
        param_err = max(float(np.max(np.abs(a - b))) for a, b in zip(ref[1], dp[1]))
        results[name] = {"loss": loss_err, "params": param_err, "losses": ref[0].tolist()}

    def compare(name, config, make_model, shape):
        images = rng.integers(0, 256, (64, *shape), dtype=np.uint8)
        labels = rng.integers(0, 10, 64).astype(np.int32)
        ref = run(config, make_model(None), images, labels, steps.make_group_chunk)
        dp = run(config, make_model(parallel.AXIS), images, labels, steps.make_parallel_chunk)
        record(name, ref, dp)
""")

# The equality needs synchronised batch norm: with per-device statistics each device
# normalises its quarter of the batch by its own mean and variance, a different function
# of the data (checked to differ).
EQUALITY = COMMON + textwrap.dedent("""
    for grad in ("autodiff", "manual"):
        mlp_cfg = TrainConfig(model="mlp", batch_size=16, hidden_units=(32,), batch_norm=True, dropout=0.0,
                                grad=grad, optimizer="momentum", lr=0.05)
        mlp = lambda ax: steps.build_model(mlp_cfg, (6, 6, 1), 10, bn_axis_name=ax)
        compare(f"mlp-{grad}", mlp_cfg, mlp, (6, 6, 1))
        conv_cfg = TrainConfig(model="convnet", batch_size=16, grad=grad, optimizer="adam", lr=1e-3)
        conv = lambda ax: M.ConvNet(input_shape=(8, 8, 3), plan=(4, "M", 8, "M"), bn_axis_name=ax)
        compare(f"convnet-{grad}", conv_cfg, conv, (8, 8, 3))
    # Per-device batch norm (the default) is a different computation: it must differ.
    compare("mlp-per-device-bn", mlp_cfg, lambda ax: steps.build_model(mlp_cfg, (6, 6, 1), 10), (6, 6, 1))

    # Placement: each device holds only its contiguous slice of every batch of the epoch, in
    # the global order, and an evaluation set is split over the devices with masked padding.
    labels = np.arange(64, dtype=np.int32)
    perm = rng.permutation(64)
    x, y = parallel.place_epoch(labels[:, None] * 2, labels, perm, 4, 16, mesh)
    for shard in y.addressable_shards:
        d = mesh.devices.tolist().index(shard.device)
        assert shard.data.shape == (4, 4), shard.data.shape
        np.testing.assert_array_equal(shard.data, perm.reshape(4, 16)[:, 4 * d:4 * d + 4])
    assert x.shape == (4, 16, 1) and x.addressable_shards[0].data.shape == (4, 4, 1)
    x, y, valid = parallel.place_eval(labels[:, None], labels, np.arange(10, 20), mesh)
    assert y.shape == (12,) and y.addressable_shards[0].data.shape == (3,)
    np.testing.assert_array_equal(np.asarray(y), [*range(10, 20), 19, 19])
    assert np.asarray(valid).sum() == 10 and not np.asarray(valid)[10:].any()
    print("RESULTS" + json.dumps(results))
""")

# Dropout and random crop + flip: every device draws them at its examples' positions in
# the whole batch, so the masks, crops and flips, and hence the steps, equal one device's.
NOISE = COMMON + textwrap.dedent("""
    import dataclasses
    images = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    for grad in ("autodiff", "manual"):
        cfg = TrainConfig(model="mlp", dataset="cifar10", batch_size=16, hidden_units=(32, 32), dropout=0.3,
                            augment=True, grad=grad, optimizer="momentum", lr=0.05)
        ref = run(cfg, steps.build_model(cfg, (8, 8, 3), 10), images, labels, steps.make_group_chunk)
        dp = run(cfg, steps.build_model(cfg, (8, 8, 3), 10, batch_axis_name=parallel.AXIS), images, labels,
                 steps.make_parallel_chunk)
        record(f"mlp-{grad}", ref, dp)
    # Without dropout and augmentation the losses move: the equality above is not vacuous.
    quiet_cfg = dataclasses.replace(cfg, dropout=0.0, augment=False)
    quiet = run(quiet_cfg, steps.build_model(quiet_cfg, (8, 8, 3), 10), images, labels, steps.make_group_chunk)
    results["noise-effect"] = float(np.max(np.abs(quiet[0] - ref[0])))
    # A dropout model without batch_axis_name would repeat one slice's masks on every device.
    try:
        steps.make_parallel_chunk(steps.build_model(cfg, (8, 8, 3), 10), optim.build_optimizer(cfg, 10), cfg, mesh)
        results["refused"] = False
    except ValueError:
        results["refused"] = True
    print("RESULTS" + json.dumps(results))
""")

# Whole runs through T.train on 4 devices (a small synthetic CIFAR-shaped set; MLP with
# synchronised BN, dropout and crop + flip, manual gradients): 2 epochs straight through;
# the same run stopped after epoch 1 (as by Ctrl-C) and resumed; and the run on 1 device.
# Compiling dominates the time: the persistent compilation cache lets the interrupted and
# resumed runs reuse the first run's programs, and validation and test sets of one size
# share one evaluation program.
RUNS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax, numpy as np
    from jaxnets import data as D, training as T
    from jaxnets.config import TrainConfig
    assert len(jax.devices()) == 4, jax.devices()
    out = Path(sys.argv[1])
    jax.config.update("jax_compilation_cache_dir", str(out / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    rng = np.random.default_rng(0)
    image = lambda n: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    label = lambda n: rng.integers(0, 10, n).astype(np.int32)
    data = D.Dataset("cifar10", image(420), label(420), image(100), label(100), 10, "synthetic")

    def config(name, **kwargs):
        return TrainConfig(model="mlp", dataset="cifar10", out=str(out / name), progress=False, epochs=2,
                             batch_size=32, hidden_units=(32,), batch_norm=True, sync_bn=True, dropout=0.2,
                             augment=True, grad="manual", optimizer="adam", lr=1e-3, schedule="cosine",
                             val_size=100, eval_batch_size=50, chunk_steps=5, **kwargs)

    def train(name, resume=None, stop_after=None, **kwargs):
        final = {}

        def on_epoch_end(record, params, state):
            final["params"] = [np.asarray(a).tolist() for a in jax.tree_util.tree_leaves((params, state))]
            if record["epoch"] == stop_after:
                raise KeyboardInterrupt

        try:
            summary = T.train(config(name, **kwargs), dataset=data, resume=resume, log=lambda *_: None,
                              on_epoch_end=on_epoch_end)
        except KeyboardInterrupt:
            summary = json.loads((out / name / "summary.json").read_text())
        metrics = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines()]
        return {"summary": summary, "metrics": metrics, "params": final["params"]}

    results = {"full": train("full"), "cut": train("cut", stop_after=1)}
    results["resumed"] = train("cut", resume=out / "cut")
    results["one"] = train("one", devices=1)
    print("RESULTS" + json.dumps(results))
""")


def _env(devices):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX") and k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    return env


def _four_devices(script):
    proc = subprocess.run([sys.executable, "-c", script], env=_env(4), cwd=ROOT, capture_output=True, text=True,
                          timeout=scaled_timeout(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS", 1)[1])


def test_data_parallel_step_equals_single_device():
    results = _four_devices(EQUALITY)
    for name in ("mlp-autodiff", "mlp-manual", "convnet-autodiff", "convnet-manual"):
        assert results[name]["loss"] < 1e-5, (name, results[name])
        assert results[name]["params"] < 1e-5, (name, results[name])
    assert results["mlp-per-device-bn"]["params"] > 1e-4, results["mlp-per-device-bn"]


def test_data_parallel_dropout_and_augmentation_equal_single_device():
    """4 devices, an MLP with dropout and random crop + flip, both gradient paths: the same
    losses and parameters as one device on the same global batches."""
    results = _four_devices(NOISE)
    for name in ("mlp-autodiff", "mlp-manual"):
        assert results[name]["loss"] < 1e-5, (name, results[name])
        assert results[name]["params"] < 1e-5, (name, results[name])
    assert results["noise-effect"] > 1e-3, results
    assert results["refused"], results


@pytest.fixture(scope="module")
def four_device_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run([sys.executable, "-c", RUNS, str(out)], env=_env(4), cwd=ROOT, capture_output=True,
                          text=True, timeout=scaled_timeout(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS", 1)[1])


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def test_four_device_run_resumed_after_epoch_one_matches_uninterrupted(four_device_runs):
    full, cut, resumed = (four_device_runs[k] for k in ("full", "cut", "resumed"))
    assert full["summary"]["devices"] == 4 and resumed["summary"]["devices"] == 4
    assert cut["summary"]["status"] == "interrupted" and len(cut["metrics"]) == 1
    assert resumed["summary"]["status"] == "completed" and resumed["summary"]["steps"] == full["summary"]["steps"]
    for key in ("test_loss", "test_accuracy", "best_val_accuracy"):
        assert resumed["summary"][key] == full["summary"][key], key
    assert _max_diff(resumed["params"], full["params"]) == 0.0
    timing = ("seconds", "train_seconds", "compile_seconds", "images_per_second")
    strip = lambda metrics: [{k: v for k, v in r.items() if k not in timing} for r in metrics]
    assert strip(resumed["metrics"]) == strip(full["metrics"]) and len(full["metrics"]) == 2


def test_four_device_run_equals_one_device_run(four_device_runs):
    """The whole trainer (placement of the shards, sharded evaluation, dropout, crop +
    flip, synchronised BN) on 4 devices against 1 device: equal within float rounding."""
    full, one = four_device_runs["full"], four_device_runs["one"]
    assert "devices" not in one["summary"]
    for key in ("test_loss", "test_accuracy", "best_val_accuracy"):
        assert abs(full["summary"][key] - one["summary"][key]) < 1e-5, (key, full["summary"][key], one["summary"][key])
    for a, b in zip(full["metrics"], one["metrics"]):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert abs(a[key] - b[key]) < 1e-5, (key, a, b)
    assert _max_diff(full["params"], one["params"]) < 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_together_like_one(mnist_dir, tmp_path):
    """Two real processes (jax.distributed on 127.0.0.1, gloo CPU collectives, one device
    each) train a short MLP as one data-parallel run: both finish, only process 0 writes,
    and the metrics equal a one-process run on the same global batches."""
    args = ["--model", "mlp", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--train-subset", "1200",
            "--val-size", "200", "--batch-size", "64", "--hidden-units", "32", "--dropout", "0", "--max-steps", "20",
            "--epochs", "2", "--chunk-steps", "10", "--no-progress", "--eval-batch-size", "500"]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "--out", str(tmp_path / f"dp{i}"),
                               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)],
                              env=_env(1), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=scaled_timeout(240))[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert (tmp_path / "dp0" / "summary.json").exists() and not (tmp_path / "dp1").exists()
    one = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--out", str(tmp_path / "one")],
                         env=_env(1), cwd=tmp_path, capture_output=True, text=True, timeout=scaled_timeout(240))
    assert one.returncode == 0, one.stderr[-2000:]
    dp, ref = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("dp0", "one"))
    assert dp["devices"] == 2 and dp["processes"] == 2 and dp["steps"] == ref["steps"] == 20
    for key in ("test_loss", "test_accuracy", "best_val_accuracy"):
        assert abs(dp[key] - ref[key]) < 1e-5, (key, dp[key], ref[key])
    lines = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("dp0", "one")]
    for a, b in zip(*lines):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5


def test_batch_must_divide_over_devices():
    from jaxnets import parallel

    parallel.check_batch(64, 4)
    with pytest.raises(ValueError, match=r"batch_size 30 does not divide evenly over 4 devices.*multiple of 4"):
        parallel.check_batch(30, 4)
