"""The trainer: whole dataset on the device, a jit-compiled Optax step, chunks of steps per call.

Layout of one run, following airbench: the uint8 training set lives on the device; each
epoch a ``jax.random`` permutation orders it; a compiled loop runs a chunk of steps
(gather the batch, augment, normalise, gradient, Optax update; the number of steps is an
argument, so one program serves every chunk) and returns the chunk's losses, so the host
only touches the device once per chunk (to advance the progress bar and check for NaN).
Every random draw derives from ``(seed, epoch, step)``, so a run resumed from an epoch
checkpoint is identical to an uninterrupted one.

:func:`train` is the library entry point; ``train.py`` is a thin CLI over it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from jaxnets import data as D
from jaxnets import models as M
from jaxnets import parallel as P

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
    conv_plan: tuple = ()
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
    devices: int = 0
    sync_bn: bool = False
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
        for item in self.conv_plan:
            if item != "M" and not (isinstance(item, int) and item > 0):
                raise ValueError(f"conv_plan items must be positive widths or 'M', got {item!r} in {self.conv_plan}")
        if self.conv_plan and self.model == "mlp":
            raise ValueError("conv_plan is a ConvNet setting; it has no effect with model=mlp")
        if self.devices < 0:
            raise ValueError(f"devices must be >= 0 (0: all), got {self.devices}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def model_fields(self):
        """The settings that fix the parameters' shapes (checked on --resume)."""
        return {k: getattr(self, k) for k in ("model", "dataset", "hidden_units", "conv_plan", "batch_norm")}


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


def build_model(config: TrainConfig, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
    """The model of ``config``; ``bn_axis_name`` syncs batch norm over that mesh axis, and
    ``batch_axis_name`` (data parallel: the axis the batch is split over) draws an MLP's
    dropout masks at each example's position in the whole batch."""
    if config.model == "mlp":
        return M.MLP(
            input_size=int(np.prod(image_shape)), hidden=tuple(config.hidden_units), classes=classes,
            activation=config.activation, batch_norm=config.batch_norm, dropout=config.dropout,
            init_scheme=config.init, bn_axis_name=bn_axis_name, batch_axis_name=batch_axis_name,
        )
    plan = tuple(config.conv_plan) or M.VGG_COURSE
    return M.ConvNet(input_shape=tuple(image_shape), plan=plan, classes=classes,
                     preact=config.model == "preact_convnet", init_scheme=config.init, bn_axis_name=bn_axis_name)


def _schedule(config: TrainConfig, total_steps: int):
    """The learning-rate multiplier over steps: a schedule with peak 1 (times the peak lr)."""
    warmup = int(config.warmup_epochs * total_steps / max(config.epochs, 1))
    if config.schedule == "constant":
        main = optax.constant_schedule(1.0)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(1.0, max(total_steps - warmup, 1))
    elif config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, 1.0)
    else:  # step: x0.1 at 50% and 75% of training
        main = optax.piecewise_constant_schedule(
            1.0, {int(total_steps * 0.5) - warmup: 0.1, int(total_steps * 0.75) - warmup: 0.1}
        )
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), main], [warmup])
    return main


def _decay_mask(params):
    # Weight decay on weight matrices and kernels only, not on biases or BN's gamma/beta.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "w", params
    )


#: Numeric settings that may differ between the members of one vmapped sweep group: each
#: member carries them as float32 arrays (the optimizer's in its injected state).
HPARAMS = ("lr", "weight_decay", "momentum", "dropout", "label_smoothing")
OPTIMIZER_HPARAMS = {"lr": "peak_lr", "weight_decay": "weight_decay", "momentum": "momentum"}


def hparams_of(config: TrainConfig):
    """The member's numeric hyperparameters as float32 arrays (see :data:`HPARAMS`)."""
    return {k: jnp.asarray(getattr(config, k), jnp.float32) for k in HPARAMS}


def build_optimizer(config: TrainConfig, total_steps: int, *, decay: bool | None = None):
    """An Optax optimizer whose numeric hyperparameters live in its state.

    ``optax.inject_hyperparams`` holds ``peak_lr``, ``weight_decay`` and ``momentum`` as
    arrays (so a sweep can give every vmapped member its own values without recompiling)
    and ``lr_scale``, the schedule's multiplier at the current step; the learning rate is
    ``peak_lr * lr_scale``. ``decay`` says whether the program has a weight-decay term at
    all (default: ``config.weight_decay != 0``); a sweep group that mixes zero and non-zero
    weight decay passes True, and its zero members add ``0 * w`` to the gradient, which
    leaves it bit-for-bit unchanged.
    """
    decay = config.weight_decay != 0 if decay is None else decay

    def make(peak_lr, lr_scale, weight_decay, momentum):
        learning_rate = peak_lr * lr_scale
        o = config.optimizer
        if o == "adamw":
            return optax.adamw(learning_rate, weight_decay=weight_decay, mask=_decay_mask)
        base = {
            "sgd": lambda: optax.sgd(learning_rate),
            "momentum": lambda: optax.sgd(learning_rate, momentum=momentum),
            "nesterov": lambda: optax.sgd(learning_rate, momentum=momentum, nesterov=True),
            "adam": lambda: optax.adam(learning_rate),
            "adagrad": lambda: optax.adagrad(learning_rate),
            "rmsprop": lambda: optax.rmsprop(learning_rate),
        }[o]()
        # L2 regularisation (coupled weight decay): adds wd * w to the gradient.
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=_decay_mask), base) if decay else base

    return optax.inject_hyperparams(make)(
        peak_lr=jnp.float32(config.lr), lr_scale=_schedule(config, total_steps),
        weight_decay=jnp.float32(config.weight_decay), momentum=jnp.float32(config.momentum))


def _with_hparams(opt_state, hp):
    """``opt_state`` with the member's optimizer hyperparameters from ``hp``."""
    values = {name: hp[k] for k, name in OPTIMIZER_HPARAMS.items()}
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **values})


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


def _training_pool(dataset: D.Dataset, config: TrainConfig):
    """The training images a run splits into train and validation (``train_subset`` applied)."""
    train_x, train_y = dataset.train_images, dataset.train_labels
    if config.train_subset:
        train_x, train_y = train_x[: config.train_subset], train_y[: config.train_subset]
    return train_x, train_y


def member_split(train_x, train_y, config: TrainConfig):
    """``(train_idx, val_idx, mean, std)``: the seeded validation split of the training pool
    (indices into it) and the normalisation constants of its training part."""
    if config.val_size >= len(train_x):
        raise ValueError(f"val_size {config.val_size} leaves no training data ({len(train_x)} examples)")
    train_idx, _, val_idx, _ = D.split_validation(np.arange(len(train_x)), train_y, config.val_size, config.seed)
    if len(train_idx) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(train_idx)} training examples")
    if config.normalize == "channel":
        mean, std = D.normalization_stats(train_x, exclude=val_idx)
    else:  # the course's per-pixel mean image subtracted from raw 0..255 pixels, no scaling
        mean = (train_x[train_idx].astype(np.float64) / 255.0).mean(axis=0).astype(np.float32)
        std = np.full((), 1.0 / 255.0, np.float32)
    return train_idx.astype(np.int32), val_idx.astype(np.int32), mean, std


def prepare_data(dataset: D.Dataset, config: TrainConfig) -> DeviceData:
    train_x, train_y = _training_pool(dataset, config)
    train_idx, val_idx, mean, std = member_split(train_x, train_y, config)
    put = jax.device_put
    return DeviceData(put(train_x[train_idx]), put(train_y[train_idx].astype(np.int32)), put(train_x[val_idx]),
                      put(train_y[val_idx].astype(np.int32)), put(dataset.test_images),
                      put(dataset.test_labels.astype(np.int32)), put(mean), put(std))


def normalize(images_u8, mean, std):
    return (images_u8.astype(jnp.float32) / 255.0 - mean) / std


def augment(key, images, pad=4, flip=True, axis_name=None):
    """Random crop of each image from a ``pad``-pixel zero-padded copy, and (``flip``) a
    random horizontal flip. Digits are not mirror-symmetric, so MNIST gets crops only.

    ``axis_name`` (inside ``shard_map``, data parallel): ``images`` is this device's
    contiguous slice of a batch split evenly over that mesh axis, and every device has the
    same ``key``; the crops and flips are the whole batch's at the slice's rows, the same
    as a single device draws for the whole batch.
    """
    crop_key, flip_key = jax.random.split(key)
    b, h, w, _ = images.shape
    rows = b if axis_name is None else b * jax.lax.axis_size(axis_name)

    def mine(a):  # this device's rows of a draw for the whole batch (a few numbers per example)
        return a if axis_name is None else jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(axis_name) * b, b)

    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = mine(jax.random.randint(crop_key, (rows, 2), 0, 2 * pad + 1))
    crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, images.shape[-1])))(
        padded, offsets
    )
    if not flip:
        return crops
    flipped = mine(jax.random.bernoulli(flip_key, 0.5, (rows, 1, 1, 1)))
    return jnp.where(flipped, crops[:, :, ::-1], crops)


# --------------------------------------------------------------------------- steps


def make_step(model, optimizer, config: TrainConfig, axis_name=None):
    """The one training step every path runs (single runs and each member of a sweep).

    ``step(params, state, opt_state, images_u8, labels, key, mean, std, hp)`` ->
    ``(params, state, opt_state, loss, correct)``: augment, normalise, gradient by the
    chosen path, Optax update. ``hp`` holds the member's ``dropout`` and
    ``label_smoothing`` (arrays, see :func:`hparams_of`); the optimizer's hyperparameters
    are in ``opt_state``. ``key`` is split into the augmentation and the dropout keys.

    ``axis_name`` (inside ``shard_map``, data parallel): each device runs the step on its
    slice of the batch, then the gradients, loss and batch-norm running statistics are
    averaged over the axis (``lax.pmean``) before the update, and the correct counts
    summed, so parameters and optimizer state stay replicated. Every device gets the same
    ``key`` and draws the augmentation and (with a model built with ``batch_axis_name``)
    the dropout masks at its examples' positions in the whole batch, so the step equals
    the single-device step on the same global batch.
    """
    value_and_grad = M.GRADIENT_PATHS[config.grad]
    dropout_on = config.model == "mlp" and config.dropout > 0
    if axis_name is not None and dropout_on and getattr(model, "batch_axis_name", None) != axis_name:
        # Same key on every device: without it every device would repeat one slice's masks.
        raise ValueError(f"data-parallel dropout needs the model built with batch_axis_name={axis_name!r}")

    def step(params, state, opt_state, images, labels, key, mean, std, hp):
        aug_key, dropout_key = jax.random.split(key)
        x = augment(aug_key, images, flip=config.dataset != "mnist", axis_name=axis_name) if config.augment else images
        x = normalize(x, mean, std)
        extra = {"dropout_rate": hp["dropout"]} if dropout_on else {}
        (loss, new_state), grads = value_and_grad(
            model, params, state, x, labels, key=dropout_key, label_smoothing=hp["label_smoothing"], **extra
        )
        # The logits for the training accuracy: XLA merges this forward pass with the one
        # inside the gradient (same inputs, same ops), so it costs next to nothing.
        logits, _ = model.apply(params, state, x, train=True, key=dropout_key, **extra)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels)
        if axis_name is not None:
            grads, loss, new_state = jax.lax.pmean((grads, loss, new_state), axis_name)
            correct = jax.lax.psum(correct, axis_name)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, new_state, opt_state, loss, correct

    return step


def _member_chunk(step, batch):
    """Steps ``start .. start+n-1`` of one member in a loop; see :func:`make_group_chunk`.

    Step ``i`` gathers ``images[perm[i*batch:(i+1)*batch]]``; with ``perm`` None the
    batches are laid out already, ``images[i]`` (the data-parallel path, where ``images``
    is this device's slice of every batch of the epoch). ``n`` may be traced: the loop
    runs ``n`` times and writes its losses and correct counts into buffers of the static
    ``length`` (entries from ``n`` on stay 0), so one compiled program serves every
    chunk of a run, the last, shorter one of an epoch included.
    """

    def member_chunk(carry, images, labels, perm, epoch_key, mean, std, hp, start, n, length, mask=True):
        def body(j, c):
            (params, state, opt_state, diverged), (losses, corrects) = c
            i = start + j
            if perm is None:
                x, y = images[i], labels[i]
            else:
                idx = jax.lax.dynamic_slice_in_dim(perm, i * batch, batch)
                x, y = images[idx], labels[idx]
            *new, loss, correct = step(params, state, opt_state, x, y, jax.random.fold_in(epoch_key, i), mean, std, hp)
            finite = jnp.isfinite(loss)
            if mask:  # freeze a member at its last finite step
                ok = finite & ~diverged
                new = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), tuple(new), (params, state, opt_state))
            out = (losses.at[j].set(loss), corrects.at[j].set(correct))
            return (*new, diverged | ~finite), out

        # float32, or float64 under jax_enable_x64 (a float32 loss fits either exactly).
        buffers = (jnp.zeros((length,), jax.dtypes.canonicalize_dtype(jnp.float64)), jnp.zeros((length,), jnp.int32))
        return jax.lax.fori_loop(0, n, body, (carry, buffers))

    return member_chunk


def make_train_chunk(model, optimizer, config: TrainConfig):
    """``chunk(carry, data, perm, epoch_key, start, n) -> (carry, (losses, correct))``: ``n`` steps in one loop.

    ``carry = (params, state, opt_state)``, ``data`` a :class:`DeviceData`; step ``i`` of
    the epoch uses the examples ``perm[i*B:(i+1)*B]`` of ``data.train_x`` and the key
    ``fold_in(epoch_key, i)``. ``n`` is static here (one program per chunk length). The
    member function of :func:`make_group_chunk`, for one configuration without a member
    axis (handy for benchmarks and research code).
    """
    member_chunk = _member_chunk(make_step(model, optimizer, config), config.batch_size)

    def chunk(carry, data, perm, epoch_key, start, n):
        (params, state, opt_state, _), out = member_chunk(
            (*carry, jnp.zeros((), bool)), data.train_x, data.train_y, perm, epoch_key, data.mean, data.std,
            hparams_of(config), start, n, n, mask=False)
        return (params, state, opt_state), out

    return jax.jit(chunk, static_argnames="n", donate_argnums=0)


def make_group_chunk(model, optimizer, config: TrainConfig):
    """The vmapped chunk of a group of members that share every shape-fixing setting.

    ``chunk(carry, images, labels, perms, epoch_keys, means, stds, hps, start, n, length)`` ->
    ``(carry, (losses, correct))`` with ``carry = (params, state, opt_state, diverged)``,
    each with a leading member axis, as are ``perms`` (indices into the shared uint8
    ``images``/``labels``), ``epoch_keys``, ``means``/``stds`` and ``hps``. A member whose
    loss turns non-finite is frozen at its last finite step and flagged ``diverged``; the
    others go on unaffected. Losses and correct counts are ``(members, length)``, the
    first ``n`` of each row filled (``n`` traced, ``length`` static: one program for
    every chunk of a run). A group of
    one runs the member function without vmap and without the freezing (the host stops
    a lone run at its first non-finite loss), at a single run's speed.
    """
    member_chunk = _member_chunk(make_step(model, optimizer, config), config.batch_size)

    def chunk(carry, images, labels, perms, epoch_keys, means, stds, hps, start, n, length):
        one = lambda c, p, k, m, s, h, mask=True: member_chunk(c, images, labels, p, k, m, s, h, start, n, length,
                                                                mask)
        members = (carry, perms, epoch_keys, means, stds, hps)
        if perms.shape[0] == 1:
            out = one(*_member(members, 0), mask=False)
            return jax.tree_util.tree_map(lambda a: a[None], out)
        return jax.vmap(one)(*members)

    return jax.jit(chunk, static_argnames="length", donate_argnums=0)


def make_parallel_chunk(model, optimizer, config: TrainConfig, mesh):
    """:func:`make_group_chunk` for one member, data parallel over ``mesh``'s ``"batch"`` axis.

    ``chunk(carry, images, labels, epoch_keys, means, stds, hps, start, n, length)`` ->
    ``(carry, (losses, correct))``, with a member axis of 1 like the group chunk, but with
    the epoch's batches laid out instead of a permutation: ``images``/``labels`` are
    ``(steps, batch, ...)`` with the batch dimension split over the mesh
    (:func:`jaxnets.parallel.place_epoch`); everything else is replicated. Inside
    ``shard_map`` each device runs the single-device step on its slice of each global
    batch and the gradients are ``pmean``-ed (see :func:`make_step`), for either gradient
    path. ``model`` carries ``bn_axis_name`` for synchronised batch norm, or None for
    per-device statistics.
    """
    P.check_batch(config.batch_size, mesh.size)
    member_chunk = _member_chunk(make_step(model, optimizer, config, axis_name=P.AXIS), config.batch_size)

    def chunk(carry, images, labels, epoch_keys, means, stds, hps, start, n, length):
        def body(c, images, labels, k, m, s, h, start, n):
            return member_chunk(c, images, labels, None, k, m, s, h, start, n, length, mask=False)

        spec, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(None, P.AXIS)
        sharded = jax.shard_map(body, mesh=mesh, in_specs=(spec, rows, rows, spec, spec, spec, spec, spec, spec),
                                out_specs=spec, check_vma=False)
        c, k, m, s, h = _member((carry, epoch_keys, means, stds, hps), 0)
        out = sharded(c, images, labels, k, m, s, h, start, n)
        return jax.tree_util.tree_map(lambda a: a[None], out)

    return jax.jit(chunk, static_argnames="length", donate_argnums=0)


def _evaluate_fn(model, batch_size, axis_name=None):
    # ``valid`` marks the real rows of a padded set; ``axis_name`` (inside ``shard_map``):
    # the rows are this device's share, and the sums are psum-ed over the axis.
    def evaluate(params, state, images, labels, mean, std, valid=None):
        n = images.shape[0]
        batches = math.ceil(n / batch_size)
        pad = batches * batch_size - n
        images = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
        labels = jnp.pad(labels, (0, pad))
        rows = valid
        valid = jnp.arange(batches * batch_size) < n
        if rows is not None:
            valid = valid & jnp.pad(rows, (0, pad))
            n = jnp.sum(rows)

        def one(args):
            x, y, v = args
            logits, _ = model.apply(params, state, normalize(x, mean, std), train=False)
            losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
            return jnp.sum(losses * v), jnp.sum((jnp.argmax(logits, -1) == y) * v)

        shape = lambda a: a.reshape(batches, batch_size, *a.shape[1:])
        losses, correct = jax.lax.map(one, (shape(images), shape(labels), shape(valid)))
        losses, correct = jnp.sum(losses), jnp.sum(correct)
        if axis_name is not None:
            losses, correct, n = jax.lax.psum((losses, correct, n), axis_name)
        return losses / n, correct / n

    return evaluate


def make_evaluate(model, batch_size):
    """``evaluate(params, state, x_u8, y, mean, std) -> (mean loss, accuracy)``, in batches."""
    return jax.jit(_evaluate_fn(model, batch_size))


def make_group_evaluate(model, batch_size):
    """``evaluate(params, state, images, labels, index, means, stds) -> (losses, accuracies)``
    per member: member ``m`` is scored on ``images[index[m]]`` (``index`` (members, n)), or
    every member on all of ``images`` when ``index`` is None (the test set)."""
    evaluate = _evaluate_fn(model, batch_size)

    def group(params, state, images, labels, index, means, stds):
        if index is None:
            return jax.vmap(lambda p, s, m, sd: evaluate(p, s, images, labels, m, sd))(params, state, means, stds)
        one = lambda p, s, idx, m, sd: evaluate(p, s, images[idx], labels[idx], m, sd)
        return jax.vmap(one)(params, state, index, means, stds)

    return jax.jit(group)


def make_parallel_evaluate(model, batch_size, mesh):
    """:func:`make_group_evaluate` for one member, data parallel over ``mesh``'s ``"batch"`` axis.

    ``evaluate(params, state, images, labels, valid, means, stds) -> (losses, accuracies)``
    (a member axis of 1) on a set split over the devices by
    :func:`jaxnets.parallel.place_eval`: each device scores its rows in batches of
    ``batch_size`` and the sums are added over the devices.
    """
    evaluate = _evaluate_fn(model, batch_size, axis_name=P.AXIS)

    def group(params, state, images, labels, valid, means, stds):
        def body(p, s, x, y, v, m, sd):
            return evaluate(p, s, x, y, m, sd, valid=v)

        spec, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(P.AXIS)
        sharded = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, rows, rows, rows, spec, spec),
                                out_specs=spec, check_vma=False)
        p, s, m, sd = _member((params, state, means, stds), 0)
        return jax.tree_util.tree_map(lambda a: a[None], sharded(p, s, images, labels, valid, m, sd))

    return jax.jit(group)


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


#: Where ``train.py`` keeps compiled programs unless told otherwise (``--compile-cache``).
DEFAULT_COMPILE_CACHE = "~/.cache/jaxnets/xla"


def use_compile_cache(directory=DEFAULT_COMPILE_CACHE, *, min_compile_seconds=0.5):
    """Keep compiled XLA programs in ``directory`` (jax's persistent compilation cache).

    A later process that compiles the same program (same model, shapes, flags, jax
    version and machine) loads it instead: on the 2-core CPU that removes the seconds of
    compilation before a ConvNet's first step. Programs that compiled in less than
    ``min_compile_seconds`` are not stored. Call it before the first compilation; it sets
    process-wide jax options.
    """
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"--compile-cache {directory}: cannot create the directory ({e.strerror})") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path


def environment_info():
    import flax
    return {
        "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "optax": optax.__version__, "flax": flax.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
        "cpu": _cpu_model(), "cores": os.cpu_count(),
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


def group_key(config: TrainConfig):
    """What configs must share to train together as one vmapped program: every setting
    except the numeric :data:`HPARAMS` and the seed (and ``out``/``progress``), plus
    whether dropout is on at all (it adds ops to the program). Weight decay 0 and non-zero
    share a group: the decay term is exact at 0 (see :func:`build_optimizer`)."""
    d = dataclasses.asdict(config)
    for k in HPARAMS + ("seed", "out", "progress"):
        d.pop(k)
    d["hidden_units"] = tuple(d["hidden_units"])
    d["conv_plan"] = tuple(d["conv_plan"])
    d["dropout_on"] = config.model == "mlp" and config.dropout > 0
    return tuple(sorted(d.items()))


def train(config: TrainConfig, *, dataset: D.Dataset | None = None, resume: str | os.PathLike | None = None,
          log=print, on_epoch_end=None):
    """Train, evaluate and write a run directory; returns the summary dict.

    ``dataset`` skips loading (handy in research code and tests). ``resume`` continues the
    run in that directory from its last epoch checkpoint; the config must match in every
    setting that fixes parameter shapes. ``on_epoch_end(record, params, state)`` is called
    after each epoch's checkpoint is written (raising KeyboardInterrupt there stops the
    run as Ctrl-C would). A single run is a :func:`train_group` of one member.
    """
    t_start = time.time()
    if resume is not None:
        run_dir = Path(resume)
        config_path = run_dir / "config.json"
        if not config_path.exists():
            raise TrainingError(f"--resume {run_dir}: no config.json there, not a run directory")
        saved = json.loads(config_path.read_text())["config"]
        saved["hidden_units"] = tuple(saved["hidden_units"])
        saved["conv_plan"] = tuple(saved.get("conv_plan", ()))
        mismatched = {k: (saved.get(k), v) for k, v in config.model_fields().items() if saved.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in mismatched.items())
            raise TrainingError(f"--resume {run_dir}: config does not match the checkpoint ({detail})")
    else:
        run_dir = Path(config.out) if config.out else default_run_dir(config)
    config.validate()
    if dataset is None:
        dataset = D.load_dataset(config.dataset, config.data_dir)
    return train_group([config], [run_dir], dataset=dataset, resume=resume is not None, log=log,
                       on_epoch_end=on_epoch_end, t_start=t_start)[0]


def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _member(tree, m):
    return jax.tree_util.tree_map(lambda a: a[m], tree)


#: XLA options for programs of integer arithmetic only (threefry, sorts, gathers), which any
#: optimisation level computes bit for bit alike: without LLVM's optimisations the epoch's
#: order (6 threefry calls and two sorts) compiles in 0.3 s instead of 0.7 s on the 2-core
#: CPU, and runs in 30 ms instead of 23 ms, once per epoch.
INTEGER_PROGRAM_OPTIONS = {"xla_backend_optimization_level": 0}


def _epoch_inputs(run_key, train_idx, epoch):
    """A member's epoch order (indices into the pool) and the key its steps fold in."""
    perm_key, epoch_key = jax.random.split(jax.random.fold_in(run_key, epoch))
    return train_idx[jax.random.permutation(perm_key, train_idx.shape[0])], epoch_key


def train_group(configs, run_dirs, *, dataset: D.Dataset, resume=False, log=print, on_epoch_end=None,
                names=None, t_start=None, extra_config=None, vmap=None):
    """Train ``configs`` together, vmapped in one compiled program (on CPU: each member
    through its single run's programs, see ``vmap``); one run directory each.

    The configs must agree in :func:`group_key` (shapes and static settings); they may
    differ in the :data:`HPARAMS` and the seed. Each member gets exactly the files, and
    follows exactly the computation, of ``train(config)`` (which is this function with
    one member): its own validation split, normalisation, init, data order, dropout
    masks. A member whose loss turns non-finite stops there (status ``diverged: ...``,
    last good epoch checkpoint kept) while the others go on. Returns the summaries, in
    order. ``resume`` continues every member from the last epoch checkpoint in its run
    directory; the members still training must be at the same epoch. In a resumed group
    (more than one member) a member whose summary.json says it diverged stays stopped: it
    only keeps its slot, so the group runs the same program, and rounds the same, as when
    it started. ``extra_config`` (a list of dicts) adds entries to each member's config.json.

    ``vmap``: train the members as one vmapped program (True), or each through exactly the
    compiled programs of its single run (False: init, chunks of steps and evaluation, so
    every member's numbers are bit-for-bit its single run's), :data:`CONCURRENT_BLOCKS` members
    at a time. Default (None): vmapped, except on CPU, where XLA's batched programs are no
    faster per member than the single-run one and round differently from it (see
    :func:`member_blocks`).
    """
    t_start = time.time() if t_start is None else t_start
    configs, run_dirs = list(configs), [Path(d) for d in run_dirs]
    base, size = configs[0], len(configs)
    if len(run_dirs) != size:
        raise ValueError(f"train_group: {size} configs but {len(run_dirs)} run directories")
    for c in configs:
        c.validate()
        if group_key(c) != group_key(base):
            diff = [k for (k, a), (_, b) in zip(group_key(c), group_key(base)) if a != b]
            raise ValueError(f"train_group: configs differ in shape-fixing settings {diff}; group them apart")
    names = names or [d.name for d in run_dirs]
    devices = _group_devices(base, size)
    mesh = P.make_mesh(devices) if len(devices) > 1 else None
    if mesh is not None:
        P.check_batch(base.batch_size, mesh.size)
    writer = P.is_writer()
    if not writer:  # process 0 reports for all
        log = lambda *args, **kwargs: None
    say = (lambda m, text: log(text)) if size == 1 else (lambda m, text: log(f"[{names[m]}] {text}"))

    pool_x, pool_y = _training_pool(dataset, base)
    splits = {}
    for c in configs:
        if c.seed not in splits:
            splits[c.seed] = member_split(pool_x, pool_y, c)
    train_idx, val_idx, means, stds = (np.stack(a) for a in zip(*(splits[c.seed] for c in configs)))
    model = build_model(base, dataset.image_shape, dataset.num_classes,
                        bn_axis_name=P.AXIS if mesh is not None and base.sync_bn else None,
                        batch_axis_name=P.AXIS if mesh is not None else None)
    n_train, n_val, batch = train_idx.shape[1], val_idx.shape[1], base.batch_size
    steps_per_epoch = n_train // batch
    total_steps = steps_per_epoch * base.epochs
    if base.max_steps:
        total_steps = min(total_steps, base.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = build_optimizer(base, total_steps, decay=any(c.weight_decay != 0 for c in configs))

    put = jax.device_put if mesh is None else (lambda x: P.replicate(x, mesh))
    # Per-member inputs stay on the host and each block's members are placed once, so no
    # slicing runs (and compiles) on the device per block.
    hps = jax.tree_util.tree_map(np.asarray, _stack([hparams_of(c) for c in configs]))
    seeds = np.asarray([c.seed for c in configs], np.uint32)
    blocks = member_blocks(size, vmap=vmap if mesh is None else True)
    block_of = [(k, m - b.start) for k, b in enumerate(blocks) for m in range(b.start, b.stop)]

    def part(tree, b):  # a block's members of a stacked host tree, on the device
        return put(jax.tree_util.tree_map(lambda a: a[b], tree))

    @jax.jit
    def init(seeds, hps):
        def one(seed, hp):
            init_key, run_key = jax.random.split(jax.random.key(seed))
            params, state = model.init(init_key)
            return params, state, _with_hparams(optimizer.init(params), hp), run_key
        return jax.vmap(one)(seeds, hps)

    if mesh is not None:
        init = jax.jit(init.__wrapped__, out_shardings=P.replicated(mesh))
    inits = [init(part(seeds, b), part(hps, b)) for b in blocks]
    carries = [i[:3] for i in inits]  # (params, state, opt_state) of each block's program
    key_data = np.concatenate([np.asarray(jax.random.key_data(i[3])) for i in inits])
    del inits
    start_epoch, metrics = 0, [[] for _ in configs]
    frozen, status = np.zeros(size, bool), ["completed"] * size
    member_epochs = [0] * size
    if resume:
        restored = []
        for m, run_dir in enumerate(run_dirs):
            like = _member(carries[block_of[m][0]], block_of[m][1])
            summary_path = run_dir / "summary.json"
            previous = json.loads(summary_path.read_text())["status"] if summary_path.exists() else ""
            if size > 1 and previous.startswith("diverged"):
                frozen[m], status[m] = True, previous
            if frozen[m] and not (run_dir / "checkpoint.msgpack").exists():
                # Diverged in its first epoch: no checkpoint, and its values no longer matter.
                restored.append(dict(zip(("params", "state", "opt_state"), like),
                                     key=jax.random.wrap_key_data(key_data[m]), epoch=0))
            else:
                restored.append(load_checkpoint(run_dir, *like, jax.random.wrap_key_data(key_data[m])))
            member_epochs[m] = int(restored[m]["epoch"])
            metrics_path = run_dir / "metrics.jsonl"
            if metrics_path.exists():
                metrics[m] = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
            metrics[m] = [r for r in metrics[m] if r["epoch"] <= member_epochs[m]]
        live = sorted({e for e, f in zip(member_epochs, frozen) if not f})
        if len(live) > 1:
            raise TrainingError(f"cannot resume {run_dirs[0].parent}: the group's members stopped at different "
                                f"epochs {live}")
        start_epoch = live[0] if live else 0
        carries = [put(tuple(_stack([r[k] for r in restored[b]]) for k in ("params", "state", "opt_state")))
                   for b in blocks]
        key_data = np.stack([np.asarray(jax.random.key_data(r["key"])) for r in restored])
        if size == 1:
            log(f"resuming {run_dirs[0]} after epoch {start_epoch}")
        else:
            log(f"resuming {size - frozen.sum()} members after epoch {start_epoch}"
                + (f" ({frozen.sum()} diverged before, kept stopped)" if frozen.any() else ""))
    elif writer:
        for run_dir in run_dirs:
            if run_dir.exists() and any(run_dir.iterdir()):
                raise TrainingError(f"--out {run_dir} already holds files; choose a new directory or --resume it")
        env = environment_info()
        for m, (c, run_dir) in enumerate(zip(configs, run_dirs)):
            run_dir.mkdir(parents=True, exist_ok=True)
            info = {"config": dataclasses.asdict(c),
                    "model": repr(build_model(c, dataset.image_shape, dataset.num_classes)),
                    "environment": env, "data_source": dataset.source, "train_examples": int(n_train),
                    "val_examples": int(n_val), "test_examples": int(len(dataset.test_labels))}
            info.update((extra_config or [{}] * size)[m])
            (run_dir / "config.json").write_text(json.dumps(info, indent=2, default=str))

    host_keys = jax.random.wrap_key_data(key_data)
    pool_y, test_labels = pool_y.astype(np.int32), dataset.test_labels.astype(np.int32)
    inputs = [dict(means=part(means, b), stds=part(stds, b), hps=part(hps, b)) for b in blocks]
    # Measured on CPU only; GPU/TPU compile it with their defaults.
    integer_options = INTEGER_PROGRAM_OPTIONS if jax.default_backend() == "cpu" else None
    epoch_inputs = jax.jit(jax.vmap(_epoch_inputs, in_axes=(0, 0, None)), compiler_options=integer_options)
    if mesh is None:  # the whole uint8 pool on the one device; each step gathers its batch there
        images, labels = put(pool_x), put(pool_y)
        for b, x in zip(blocks, inputs):
            x.update(keys=jax.random.wrap_key_data(part(key_data, b)), train_idx=part(train_idx, b),
                     val_idx=part(val_idx, b))
        chunk_fn = make_group_chunk(model, optimizer, base)
        group_evaluate = make_group_evaluate(model, base.eval_batch_size)

        def epoch_data(epoch, x):
            perms, epoch_keys = epoch_inputs(x["keys"], x["train_idx"], epoch)
            return (images, labels, perms), epoch_keys

        def evaluate_val(params, state, x):
            return group_evaluate(params, state, images, labels, x["val_idx"], x["means"], x["stds"])

        test_set = None

        def evaluate_test(params, state, x):
            nonlocal test_set
            test_set = test_set or (put(dataset.test_images), put(test_labels))
            return group_evaluate(params, state, *test_set, None, x["means"], x["stds"])
    else:  # each process places only its own devices' shares (see jaxnets.parallel)
        chunk_fn = make_parallel_chunk(model, optimizer, base, mesh)
        parallel_evaluate = make_parallel_evaluate(model, base.eval_batch_size, mesh)
        val_set = P.place_eval(pool_x, pool_y, val_idx[0], mesh) if n_val else None

        def epoch_data(epoch, x):
            # Every process computes the same order a single-device run uses (from the
            # host copy of the run key) and places its devices' columns of it.
            perms, epoch_keys = epoch_inputs(host_keys, train_idx, epoch)
            return P.place_epoch(pool_x, pool_y, np.asarray(perms[0]), steps_per_epoch, batch, mesh), put(epoch_keys)

        def evaluate_val(params, state, x):
            return parallel_evaluate(params, state, *val_set, x["means"], x["stds"])

        def evaluate_test(params, state, x):
            test_set = P.place_eval(dataset.test_images, test_labels, np.arange(len(test_labels)), mesh)
            return parallel_evaluate(params, state, *test_set, x["means"], x["stds"])
    where = (f"run dir {run_dirs[0]}" if size == 1 else f"{size} members vmapped" if len(blocks) == 1
             else f"{size} members, each through its single run's programs, {min(CONCURRENT_BLOCKS, size)} at a time")
    if mesh is not None:
        where += (f"; data parallel over {mesh.size} devices ({jax.process_count()} processes), "
                  f"{base.batch_size // mesh.size} examples per device, "
                  f"{'synchronised' if base.sync_bn else 'per-device'} batch norm")
    log(f"{model!r}\n{n_train} train / {n_val} val / {len(dataset.test_labels)} test images; "
        f"{steps_per_epoch} steps per epoch, {epochs} epochs ({total_steps} steps); {where}")

    carries = [(*c, part(frozen, b)) for c, b in zip(carries, blocks)]
    # One chunk program per run: the steps per call are an argument, at most chunk_length.
    chunk_length = min(base.chunk_steps, steps_per_epoch, total_steps)
    # Blocks run one after another, CONCURRENT_BLOCKS of them at a time (each its own
    # program on its own inputs: the numbers do not depend on what runs beside it).
    pool = ThreadPoolExecutor(CONCURRENT_BLOCKS) if len(blocks) > 1 else None
    compiled = set()

    def run_blocks(fn, ks, program):
        """``{k: fn(k)}`` for the blocks ``ks``; the first call of a program runs alone (one compile)."""
        results = {}
        if program not in compiled and ks:
            results[ks[0]] = fn(ks[0])
            compiled.add(program)
        rest = [k for k in ks if k not in results]
        results.update(zip(rest, pool.map(fn, rest) if pool is not None and len(rest) > 1 else map(fn, rest)))
        return results

    def evaluate_blocks(evaluate, members, split):
        """(losses, accuracies) of every member, NaN where ``members`` is False for its whole block."""
        ks = [k for k, b in enumerate(blocks) if members[b].any()]
        got = run_blocks(lambda k: jax.device_get(evaluate(carries[k][0], carries[k][1], inputs[k])), ks, split)
        nan = lambda b: np.full(b.stop - b.start, np.nan)
        return (np.concatenate([got[k][i] if k in got else nan(b) for k, b in enumerate(blocks)]) for i in (0, 1))

    alive = ~frozen
    last_good = [e if f else start_epoch for e, f in zip(member_epochs, frozen)]
    interrupted = False
    try:
        for epoch in range(start_epoch, epochs):
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            losses, corrects = [], []
            t0 = time.time()
            epoch_batches = [epoch_data(epoch, x) if alive[b].any() else None for b, x in zip(blocks, inputs)]
            bar = _progress(epoch_steps, f"epoch {epoch + 1}/{epochs}", base.progress)
            done = 0
            while done < epoch_steps and alive.any():
                n = min(chunk_length, epoch_steps - done)
                start, steps = (np.int32(done), np.int32(n)) if mesh is None else put((np.int32(done), np.int32(n)))

                def run_block(k, n=n, start=start, steps=steps):
                    (batches, epoch_keys), x = epoch_batches[k], inputs[k]
                    carries[k], out = chunk_fn(carries[k], *batches, epoch_keys, x["means"], x["stds"], x["hps"],
                                               start, steps, length=chunk_length)
                    return jax.tree_util.tree_map(lambda a: a[:, :n], jax.device_get(out))

                outs = run_blocks(run_block, [k for k, b in enumerate(blocks) if alive[b].any()], "chunk")
                for k, b in enumerate(blocks):
                    if k not in outs:  # a stopped member alone in its block (float32: the epoch means stay float32)
                        outs[k] = (np.full((b.stop - b.start, n), np.nan, np.float32),
                                   np.zeros((b.stop - b.start, n), np.int32))
                chunk_loss = np.concatenate([outs[k][0] for k in range(len(blocks))])
                chunk_correct = np.concatenate([outs[k][1] for k in range(len(blocks))])
                for m in np.flatnonzero(alive):
                    finite = np.isfinite(chunk_loss[m])
                    if not finite.all():
                        bad = epoch * steps_per_epoch + done + int(np.argmin(finite)) + 1
                        status[m] = f"diverged: non-finite loss at step {bad} (epoch {epoch + 1})"
                        alive[m] = False
                        say(m, f"stopped: {status[m]}; kept the checkpoint of epoch {last_good[m]} "
                               f"and the metrics so far")
                losses.append(chunk_loss)
                corrects.append(chunk_correct)
                done += n
                elapsed = time.time() - t0
                bar.update(n)
                if alive.any():
                    bar.set_postfix(loss=f"{chunk_loss[alive].mean():.4f}",
                                    img_s=f"{done * batch * alive.sum() / elapsed:.0f}")
            bar.close()
            if not alive.any():
                break
            seconds = time.time() - t0
            if n_val:
                val_loss, val_acc = evaluate_blocks(evaluate_val, alive, "val")
            else:
                val_loss = val_acc = np.full(size, np.nan)
            epoch_loss, epoch_correct = np.concatenate(losses, axis=1), np.concatenate(corrects, axis=1)
            host = {}
            for m in np.flatnonzero(alive):
                record = {
                    "epoch": epoch + 1,
                    "train_loss": float(epoch_loss[m].mean()),
                    "train_accuracy": float(epoch_correct[m].sum() / (done * batch)),
                    "val_loss": float(val_loss[m]), "val_accuracy": float(val_acc[m]),
                    "seconds": round(seconds, 3), "images_per_second": round(done * batch / seconds, 1),
                    "steps": epoch * steps_per_epoch + done,
                }
                metrics[m].append(record)
                if size == 1:
                    say(m, f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc "
                           f"{record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} acc "
                           f"{record['val_accuracy']:.4f} | {seconds:.1f}s, {record['images_per_second']:.0f} img/s")
                last_good[m] = epoch + 1
                if not writer:
                    continue
                k, j = block_of[m]
                if k not in host:
                    host[k] = jax.device_get(carries[k][:3])
                p_m, s_m, o_m = _member(host[k], j)
                save_checkpoint(run_dirs[m], p_m, s_m, o_m, host_keys[m], epoch + 1)
                _write_metrics(run_dirs[m], metrics[m])
                if on_epoch_end is not None:
                    on_epoch_end(record, jax.tree_util.tree_map(jnp.asarray, p_m), jax.tree_util.tree_map(jnp.asarray, s_m))
            if size > 1:
                best = int(np.nanargmax(np.where(alive, val_acc, -np.inf))) if alive.any() else 0
                log(f"epoch {epoch + 1}: {alive.sum()}/{size} members training; best val acc {val_acc[best]:.4f} "
                    f"({names[best]}); {seconds:.1f}s, {done * batch * alive.sum() / seconds:.0f} img/s in all")
    except KeyboardInterrupt:
        interrupted = True
        for m in np.flatnonzero(alive):
            status[m] = "interrupted"
        where = f"continue with --resume {run_dirs[0]}" if size == 1 else "the group's runs are incomplete"
        log(f"\ninterrupted: checkpoint of epoch {max(last_good)} kept in {run_dirs[0] if size == 1 else 'each run dir'}; "
            f"{where}")

    completed = [s == "completed" for s in status]
    if any(completed):
        test_loss, test_acc = evaluate_blocks(evaluate_test, np.array(completed), "test")
    summaries = []
    wall = round(time.time() - t_start, 2)
    for m, (c, run_dir) in enumerate(zip(configs, run_dirs)):
        if writer:
            _write_metrics(run_dir, metrics[m])
        if metrics[m] and writer:
            plot_curves(metrics[m], run_dir / "curves.png", title=f"{c.model} on {c.dataset}")
        summary = {"status": status[m], "epochs": len(metrics[m]),
                   "steps": metrics[m][-1]["steps"] if metrics[m] else 0,
                   "best_val_accuracy": max((r["val_accuracy"] for r in metrics[m]), default=None),
                   "wall_seconds": wall}
        if size > 1:
            summary["group_size"] = size  # wall_seconds is the whole group's
        if completed[m]:
            summary.update(test_loss=float(test_loss[m]), test_accuracy=float(test_acc[m]))
            if size == 1:
                log(f"test accuracy {test_acc[m]:.4f}, loss {test_loss[m]:.4f} ({wall:.0f}s); wrote {run_dir}")
        if resume and (run_dir / "summary.json").exists():
            previous = json.loads((run_dir / "summary.json").read_text())
            summary["wall_seconds"] = round(summary["wall_seconds"] + previous.get("wall_seconds", 0.0), 2)
        summary["run_dir"] = str(run_dir)
        if mesh is not None:
            summary.update(devices=mesh.size, processes=jax.process_count())
        if writer:
            _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        summaries.append(summary)
    if pool is not None:
        pool.shutdown()
    if interrupted:
        raise KeyboardInterrupt
    return summaries


#: Blocks of members in flight at once when a group trains block by block: on the 2-core
#: CPU two single-member programs side by side ran ~20% more member-steps per second than
#: one after another (XLA:CPU's intra-op threads leave the cores partly idle).
CONCURRENT_BLOCKS = 2


def member_blocks(size, *, vmap=None):
    """How a group's ``size`` members train: slices of members, each block one program run
    after the other. ``vmap`` True: one block of all (one vmapped program); False: blocks
    of one, each member through its single run's own programs. None: vmapped except on
    XLA:CPU, where the batched matrix products run at or below the single-run speed per
    member and the batched softmax and reductions round differently from the single run's,
    so a vmapped member drifts away from its single run over hundreds of steps."""
    if vmap is None:
        vmap = jax.default_backend() != "cpu"
    return [slice(0, size)] if vmap else [slice(m, m + 1) for m in range(size)]


def _group_devices(config: TrainConfig, size: int):
    """The devices a group trains on: one for a vmapped sweep group, else ``config.devices`` (0: all)."""
    if size > 1:
        if config.devices > 1 or jax.process_count() > 1:
            raise ValueError(f"a vmapped sweep group ({size} members) trains on one device; "
                             f"--devices {config.devices} works for single runs only (use --devices 1 or 0)")
        return jax.devices()[:1]
    return P.resolve_devices(config.devices)


def _write_metrics(run_dir: Path, metrics):
    _write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, dynamic_ncols=True,
                file=sys.stderr)
