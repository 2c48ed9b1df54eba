"""The trainer: whole dataset on the device, a jit-compiled Optax step, chunks of steps per call.

Layout of one run, following airbench: the uint8 training set lives on the device; each
epoch a ``jax.random`` permutation orders it; a compiled ``lax.scan`` runs a chunk of
steps (gather the batch, augment, normalise, gradient, Optax update) and returns the
chunk's losses, so the host only touches the device once per chunk (to advance the
progress bar and check for NaN). Every random draw derives from ``(seed, epoch, step)``,
so a run resumed from an epoch checkpoint is identical to an uninterrupted one.

:func:`train` is the library entry point; ``train.py`` is a thin CLI over it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxnets import data as D
from jaxnets import models as M

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "rmsprop")
SCHEDULES = ("constant", "cosine", "onecycle", "step")
NORMALIZATIONS = ("channel", "mean_image")
MODELS = ("mlp", "convnet", "preact_convnet")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run; the CLI's flags and defaults are generated from this."""

    model: str = "mlp"
    dataset: str = "mnist"
    data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    hidden_units: tuple = (1024, 1024)
    activation: str = "relu"
    batch_norm: bool = False
    dropout: float = 0.2
    init: str = "kaiming"
    label_smoothing: float = 0.0
    augment: bool = False
    normalize: str = "channel"
    val_size: int = 5000
    grad: str = "autodiff"
    seed: int = 0
    max_steps: int = 0
    train_subset: int = 0
    eval_batch_size: int = 1000
    chunk_steps: int = 50
    out: str | None = None
    progress: bool = True

    def validate(self):
        """Raise ValueError naming the first bad setting."""
        choices = {
            "model": MODELS, "dataset": D.DATASETS, "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES, "normalize": NORMALIZATIONS, "activation": tuple(M.L.ACTIVATIONS),
            "init": M.INIT_SCHEMES, "grad": tuple(M.GRADIENT_PATHS),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        positive = ("epochs", "batch_size", "eval_batch_size", "chunk_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.augment and self.dataset != "cifar10":
            raise ValueError("augment (random crop + flip) is meant for cifar10 only")

    def model_fields(self):
        """The settings that fix the parameters' shapes (checked on --resume)."""
        return {k: getattr(self, k) for k in ("model", "dataset", "hidden_units", "batch_norm")}


PRESETS = {
    # The course's MLP: one hidden layer of 100, SGD 2e-3, batch 200, 1500 steps,
    # N(0, 1e-4^2) weights, mean-image subtraction without std scaling.
    "course_mlp": dict(model="mlp", dataset="cifar10", hidden_units=(100,), optimizer="sgd",
                       lr=2e-3, batch_size=200, max_steps=1500, epochs=7, init="course",
                       normalize="mean_image", schedule="constant", dropout=0.0, val_size=1000),
    # The course's ConvNet: mini-VGG, Adam 1e-4, batch 32, 5000 steps.
    "course_convnet": dict(model="convnet", dataset="cifar10", optimizer="adam", lr=1e-4,
                           batch_size=32, max_steps=5000, epochs=4, schedule="constant",
                           dropout=0.0, val_size=1000),
}


# --------------------------------------------------------------------------- building


def build_model(config: TrainConfig, image_shape, classes):
    if config.model == "mlp":
        return M.MLP(
            input_size=int(np.prod(image_shape)), hidden=tuple(config.hidden_units), classes=classes,
            activation=config.activation, batch_norm=config.batch_norm, dropout=config.dropout,
            init_scheme=config.init,
        )
    return M.ConvNet(input_shape=tuple(image_shape), classes=classes,
                     preact=config.model == "preact_convnet", init_scheme=config.init)


def _schedule(config: TrainConfig, total_steps: int):
    lr, warmup = config.lr, int(config.warmup_epochs * total_steps / max(config.epochs, 1))
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    elif config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, lr)
    else:  # step: x0.1 at 50% and 75% of training
        main = optax.piecewise_constant_schedule(
            lr, {int(total_steps * 0.5) - warmup: 0.1, int(total_steps * 0.75) - warmup: 0.1}
        )
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    return main


def _decay_mask(params):
    # Weight decay on weight matrices and kernels only, not on biases or BN's gamma/beta.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "w", params
    )


def build_optimizer(config: TrainConfig, total_steps: int):
    """An Optax optimizer with the learning rate injected as a (schedulable) hyperparameter."""
    schedule = _schedule(config, total_steps)

    def make(learning_rate):
        o, m, wd = config.optimizer, config.momentum, config.weight_decay
        if o == "adamw":
            return optax.adamw(learning_rate, weight_decay=wd, mask=_decay_mask)
        base = {
            "sgd": lambda: optax.sgd(learning_rate),
            "momentum": lambda: optax.sgd(learning_rate, momentum=m),
            "nesterov": lambda: optax.sgd(learning_rate, momentum=m, nesterov=True),
            "adam": lambda: optax.adam(learning_rate),
            "adagrad": lambda: optax.adagrad(learning_rate),
            "rmsprop": lambda: optax.rmsprop(learning_rate),
        }[o]()
        # L2 regularisation (coupled weight decay): adds wd * w to the gradient.
        return optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), base) if wd else base

    return optax.inject_hyperparams(make)(learning_rate=schedule)


# ----------------------------------------------------------------------- device data


class DeviceData(NamedTuple):
    """The uint8 splits on the device plus the normalisation constants."""

    train_x: jax.Array
    train_y: jax.Array
    val_x: jax.Array
    val_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array
    mean: jax.Array  # subtracted after scaling to [0, 1]: per channel, or a mean image
    std: jax.Array


def prepare_data(dataset: D.Dataset, config: TrainConfig) -> DeviceData:
    train_x, train_y = dataset.train_images, dataset.train_labels
    if config.train_subset:
        train_x, train_y = train_x[: config.train_subset], train_y[: config.train_subset]
    if config.val_size >= len(train_x):
        raise ValueError(f"val_size {config.val_size} leaves no training data ({len(train_x)} examples)")
    train_x, train_y, val_x, val_y = D.split_validation(train_x, train_y, config.val_size, config.seed)
    if len(train_x) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train_x)} training examples")
    if config.normalize == "channel":
        mean, std = D.normalization_stats(train_x)
    else:  # the course's per-pixel mean image, no std scaling
        mean = (train_x.astype(np.float64) / 255.0).mean(axis=0).astype(np.float32)
        std = np.ones((), np.float32)
    put = jax.device_put
    return DeviceData(put(train_x), put(train_y.astype(np.int32)), put(val_x), put(val_y.astype(np.int32)),
                      put(dataset.test_images), put(dataset.test_labels.astype(np.int32)),
                      put(mean), put(std))


def normalize(images_u8, mean, std):
    return (images_u8.astype(jnp.float32) / 255.0 - mean) / std


def augment(key, images, pad=4):
    """Random crop of each image from a ``pad``-pixel zero-padded copy, and a random flip."""
    crop_key, flip_key = jax.random.split(key)
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
    crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, images.shape[-1])))(
        padded, offsets
    )
    flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    return jnp.where(flip, crops[:, :, ::-1], crops)


# --------------------------------------------------------------------------- steps


def make_train_chunk(model, optimizer, config: TrainConfig):
    """``chunk(carry, data, perm, start) -> (carry, (losses, correct))``: ``n`` steps in one scan.

    ``carry = (params, state, opt_state)``; step ``i`` of the epoch uses the examples
    ``perm[i*B:(i+1)*B]`` and the key ``fold_in(epoch_key, i)``.
    """
    value_and_grad = M.GRADIENT_PATHS[config.grad]
    batch = config.batch_size

    def step(carry, inputs, data, perm, epoch_key):
        params, state, opt_state = carry
        index = inputs
        idx = jax.lax.dynamic_slice_in_dim(perm, index * batch, batch)
        x, y = data.train_x[idx], data.train_y[idx]
        key = jax.random.fold_in(epoch_key, index)
        aug_key, dropout_key = jax.random.split(key)
        if config.augment:
            x = augment(aug_key, x)
        x = normalize(x, data.mean, data.std)
        (loss, (new_state, logits)), grads = _value_grad_logits(
            value_and_grad, model, params, state, x, y, dropout_key, config
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        correct = jnp.sum(jnp.argmax(logits, -1) == y)
        return (params, new_state, opt_state), (loss, correct)

    def chunk(carry, data, perm, epoch_key, start, n):
        indices = start + jnp.arange(n)
        return jax.lax.scan(lambda c, i: step(c, i, data, perm, epoch_key), carry, indices)

    return jax.jit(chunk, static_argnames="n", donate_argnums=0)


def _value_grad_logits(value_and_grad, model, params, state, x, y, key, config):
    """The chosen gradient path, plus the logits for the training accuracy.

    The logits are recomputed by a forward pass that XLA merges with the one inside the
    gradient (same inputs, same ops), so the accuracy costs next to nothing.
    """
    (loss, new_state), grads = value_and_grad(
        model, params, state, x, y, key=key, label_smoothing=config.label_smoothing
    )
    logits, _ = model.apply(params, state, x, train=True, key=key)
    return (loss, (new_state, logits)), grads


def make_evaluate(model, batch_size):
    """``evaluate(params, state, x_u8, y, mean, std) -> (mean loss, accuracy)``, in batches."""

    @jax.jit
    def evaluate(params, state, images, labels, mean, std):
        n = images.shape[0]
        batches = math.ceil(n / batch_size)
        pad = batches * batch_size - n
        images = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
        labels = jnp.pad(labels, (0, pad))
        valid = jnp.arange(batches * batch_size) < n

        def one(args):
            x, y, v = args
            logits, _ = model.apply(params, state, normalize(x, mean, std), train=False)
            losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
            return jnp.sum(losses * v), jnp.sum((jnp.argmax(logits, -1) == y) * v)

        shape = lambda a: a.reshape(batches, batch_size, *a.shape[1:])
        losses, correct = jax.lax.map(one, (shape(images), shape(labels), shape(valid)))
        return jnp.sum(losses) / n, jnp.sum(correct) / n

    return evaluate


# ----------------------------------------------------------------------- run files


class TrainingError(Exception):
    """A run cannot start or continue (bad resume directory, mismatched config, NaN)."""


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _checkpoint_target(params, state, opt_state, key, epoch=0):
    return {"params": params, "state": state, "opt_state": opt_state, "key": key, "epoch": epoch}


def save_checkpoint(run_dir: Path, params, state, opt_state, key, epoch):
    payload = _checkpoint_target(params, state, opt_state, jax.random.key_data(key), epoch)
    _write_atomic(run_dir / "checkpoint.msgpack", serialization.to_bytes(jax.device_get(payload)))


def load_checkpoint(run_dir: Path, params, state, opt_state, key):
    path = run_dir / "checkpoint.msgpack"
    if not path.exists():
        raise TrainingError(f"{path} not found: nothing to resume")
    target = _checkpoint_target(params, state, opt_state, jax.random.key_data(key))
    try:
        restored = serialization.from_bytes(target, path.read_bytes())
    except Exception as e:  # msgpack/flax raise assorted types for corrupt or foreign files
        raise TrainingError(f"{path}: cannot restore checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from e
    for a, b in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(restored)):
        if np.shape(a) != np.shape(b):
            raise TrainingError(f"{path}: checkpoint shapes do not match this model ({np.shape(b)} vs {np.shape(a)})")
    restored["key"] = jax.random.wrap_key_data(jnp.asarray(restored["key"]))
    return restored


def default_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.model}-{config.dataset}-{stamp}"


def environment_info():
    import flax
    return {
        "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "optax": optax.__version__, "flax": flax.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "cpu": _cpu_model(), "cores": os.cpu_count(),
        "host": platform.node(),
    }


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot_curves(metrics, path: Path, title=""):
    """Loss and accuracy per epoch, train vs validation, side by side (like the course reports)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("val", "-s")):
        ax_loss.plot(epochs, [m[f"{split}_loss"] for m in metrics], style, label=split, markersize=3)
        ax_acc.plot(epochs, [100 * m[f"{split}_accuracy"] for m in metrics], style, label=split, markersize=3)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- train


def train(config: TrainConfig, *, dataset: D.Dataset | None = None, resume: str | os.PathLike | None = None,
          log=print, on_epoch_end=None):
    """Train, evaluate and write a run directory; returns the summary dict.

    ``dataset`` skips loading (handy in research code and tests). ``resume`` continues the
    run in that directory from its last epoch checkpoint; the config must match in every
    setting that fixes parameter shapes. ``on_epoch_end(record, params, state)`` is called
    after each epoch's checkpoint is written (raising KeyboardInterrupt there stops the
    run as Ctrl-C would).
    """
    t_start = time.time()
    if resume is not None:
        run_dir = Path(resume)
        config_path = run_dir / "config.json"
        if not config_path.exists():
            raise TrainingError(f"--resume {run_dir}: no config.json there, not a run directory")
        saved = json.loads(config_path.read_text())["config"]
        saved["hidden_units"] = tuple(saved["hidden_units"])
        mismatched = {k: (saved.get(k), v) for k, v in config.model_fields().items() if saved.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in mismatched.items())
            raise TrainingError(f"--resume {run_dir}: config does not match the checkpoint ({detail})")
    config.validate()
    if dataset is None:
        dataset = D.load_dataset(config.dataset, config.data_dir)
    data = prepare_data(dataset, config)
    model = build_model(config, dataset.image_shape, dataset.num_classes)

    n_train = data.train_x.shape[0]
    steps_per_epoch = n_train // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = build_optimizer(config, total_steps)

    key = jax.random.key(config.seed)
    init_key, run_key = jax.random.split(key)
    params, state = model.init(init_key)
    opt_state = optimizer.init(params)
    start_epoch, metrics = 0, []

    if resume is not None:
        restored = load_checkpoint(run_dir, params, state, opt_state, run_key)
        params, state, opt_state = restored["params"], restored["state"], restored["opt_state"]
        run_key, start_epoch = restored["key"], int(restored["epoch"])
        metrics_path = run_dir / "metrics.jsonl"
        if metrics_path.exists():
            metrics = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
        metrics = [m for m in metrics if m["epoch"] <= start_epoch]
        log(f"resuming {run_dir} after epoch {start_epoch}")
    else:
        run_dir = Path(config.out) if config.out else default_run_dir(config)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise TrainingError(f"--out {run_dir} already holds files; choose a new directory or --resume it")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(
            {"config": dataclasses.asdict(config), "model": repr(model), "environment": environment_info(),
             "data_source": dataset.source, "train_examples": int(n_train),
             "val_examples": int(data.val_x.shape[0]), "test_examples": int(data.test_x.shape[0])},
            indent=2, default=str))

    chunk_fn = make_train_chunk(model, optimizer, config)
    evaluate = make_evaluate(model, config.eval_batch_size)
    log(f"{model!r}\n{n_train} train / {data.val_x.shape[0]} val / {data.test_x.shape[0]} test images; "
        f"{steps_per_epoch} steps per epoch, {epochs} epochs ({total_steps} steps); run dir {run_dir}")

    carry = (params, state, opt_state)
    last_good = None
    status = "completed"
    try:
        for epoch in range(start_epoch, epochs):
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            perm_key, epoch_key = jax.random.split(jax.random.fold_in(run_key, epoch))
            perm = jax.random.permutation(perm_key, n_train)
            losses, corrects = [], []
            t0 = time.time()
            bar = _progress(epoch_steps, f"epoch {epoch + 1}/{epochs}", config.progress)
            done = 0
            while done < epoch_steps:
                n = min(config.chunk_steps, epoch_steps - done)
                carry, (chunk_loss, chunk_correct) = chunk_fn(carry, data, perm, epoch_key, done, n)
                chunk_loss = np.asarray(chunk_loss)
                if not np.all(np.isfinite(chunk_loss)):
                    bad = epoch * steps_per_epoch + done + int(np.argmin(np.isfinite(chunk_loss))) + 1
                    status = f"diverged: non-finite loss at step {bad} (epoch {epoch + 1})"
                    raise FloatingPointError(status)
                losses.append(chunk_loss)
                corrects.append(np.asarray(chunk_correct))
                done += n
                elapsed = time.time() - t0
                bar.update(n)
                bar.set_postfix(loss=f"{chunk_loss.mean():.4f}", img_s=f"{done * config.batch_size / elapsed:.0f}")
            bar.close()
            seconds = time.time() - t0
            params, state, opt_state = carry
            val_loss, val_acc = evaluate(params, state, data.val_x, data.val_y, data.mean, data.std) \
                if data.val_x.shape[0] else (float("nan"), float("nan"))
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.concatenate(losses).mean()),
                "train_accuracy": float(np.concatenate(corrects).sum() / (done * config.batch_size)),
                "val_loss": float(val_loss), "val_accuracy": float(val_acc),
                "seconds": round(seconds, 3), "images_per_second": round(done * config.batch_size / seconds, 1),
                "steps": epoch * steps_per_epoch + done,
            }
            metrics.append(record)
            log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
                f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} | "
                f"{seconds:.1f}s, {record['images_per_second']:.0f} img/s")
            save_checkpoint(run_dir, params, state, opt_state, run_key, epoch + 1)
            _write_metrics(run_dir, metrics)
            last_good = epoch + 1
            if on_epoch_end is not None:
                on_epoch_end(record, params, state)
    except FloatingPointError:
        log(f"stopped: {status}; kept the checkpoint of epoch {last_good or start_epoch} and the metrics so far")
    except KeyboardInterrupt:
        status = "interrupted"
        log(f"\ninterrupted: checkpoint of epoch {last_good or start_epoch} kept in {run_dir}; "
            f"continue with --resume {run_dir}")

    _write_metrics(run_dir, metrics)
    if metrics:
        plot_curves(metrics, run_dir / "curves.png", title=f"{config.model} on {config.dataset}")
    summary = {"status": status, "epochs": len(metrics), "steps": metrics[-1]["steps"] if metrics else 0,
               "best_val_accuracy": max((m["val_accuracy"] for m in metrics), default=None),
               "wall_seconds": round(time.time() - t_start, 2)}
    if status == "completed":
        test_loss, test_acc = evaluate(params, state, data.test_x, data.test_y, data.mean, data.std)
        summary.update(test_loss=float(test_loss), test_accuracy=float(test_acc))
        log(f"test accuracy {test_acc:.4f}, loss {test_loss:.4f} ({summary['wall_seconds']:.0f}s); wrote {run_dir}")
    if resume is not None and (run_dir / "summary.json").exists():
        previous = json.loads((run_dir / "summary.json").read_text())
        summary["wall_seconds"] = round(summary["wall_seconds"] + previous.get("wall_seconds", 0.0), 2)
    summary["run_dir"] = str(run_dir)
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    if status == "interrupted":
        raise KeyboardInterrupt
    return summary


def _write_metrics(run_dir: Path, metrics):
    _write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr)
