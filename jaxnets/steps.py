"""What runs on the device: data placement, the training step, chunks of steps, evaluation.

This module owns the computation of a run, one function per program: :func:`build_model`
(the model a config names), :func:`member_split` and :func:`prepare_data` (the seeded
validation split, the normalisation constants of exactly the training rows, the uint8
splits on the device), :func:`augment`, :func:`normalize` and :func:`model_input` (normalise,
then ``--image-size``'s resize: the one input pipeline), :func:`make_step` (augment,
normalise, gradient, Optax update; with ``--freeze`` the head's gradient alone), the chunk programs that loop over steps on the device
(one member, a vmapped group, data parallel over a mesh) and the evaluation programs.
Following airbench, the whole uint8 training set lives on the device and the host only
touches it once per chunk. The loop that calls these programs is :mod:`jaxnets.training`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import data as D
from jaxnets import conv as conv_ops
from jaxnets import models as M
from jaxnets import network as nn
from jaxnets import parallel
from jaxnets.config import TrainConfig
from jaxnets.imagenet import IMAGENET_MEAN, IMAGENET_STD
from jaxnets.optim import MOMENT_SLOTS, hparams_of


def build_model(config: TrainConfig, image_shape, classes, bn_axis_name=None, batch_axis_name=None):
    """The model of ``config`` (:func:`jaxnets.models.build`, from the family registry);
    ``bn_axis_name`` syncs batch norm over that mesh axis, and ``batch_axis_name`` (data
    parallel: the axis the batch is split over) draws dropout masks at each example's
    position in the whole batch."""
    return M.build(config, image_shape, classes, bn_axis_name=bn_axis_name, batch_axis_name=batch_axis_name)


def memory_settings(config: TrainConfig, n_val=None) -> dict:
    """What :func:`jaxnets.cost.memory_parts` needs of a run besides its model (``n_val``:
    the validation images it gathers, default ``config.val_size``)."""
    return dict(batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                optimizer_slots=MOMENT_SLOTS[config.optimizer], n_val=config.val_size if n_val is None else n_val)


def stack_members(trees):
    """The members' pytrees stacked along a new leading member axis."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def take_member(tree, m):
    """Member ``m`` of a pytree with a leading member axis."""
    return jax.tree_util.tree_map(lambda a: a[m], tree)


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


def num_classes(config: TrainConfig) -> int:
    """The classes a run's model tells apart: those of ``--classes``, else all of the dataset's."""
    return len(config.classes) or D.SHAPES[config.dataset].classes


def run_dataset(dataset: D.Dataset, config: TrainConfig) -> D.Dataset:
    """``dataset`` as ``config`` trains and tests on it: only the ``--classes`` (relabelled
    0..k-1 in their order, :func:`jaxnets.data.select_classes`), in both splits; unchanged
    without ``--classes`` or when selected already. The one place a loaded dataset gets the
    run's classes: the trainer, the sweep and ``load_run(...).evaluate`` call it."""
    try:
        return D.select_classes(dataset, config.classes)
    except ValueError as e:
        raise D.DataError(str(e)) from None


def training_pool(dataset: D.Dataset, config: TrainConfig):
    """The training images a run splits into train and validation (``--classes`` and
    ``train_subset`` applied; ``--labels-per-class`` is drawn from it per seed, by
    :func:`member_split`)."""
    dataset = run_dataset(dataset, config)
    train_x, train_y = dataset.train_images, dataset.train_labels
    n_pool = check_sizes(len(train_x), config, train_y)
    return train_x[:n_pool], train_y[:n_pool]


def check_sizes(n_examples: int, config: TrainConfig, labels=None) -> int:
    """The training pool's size for ``config`` on ``n_examples`` training images, after
    checking that its subset, labelled images per class (each class's count, when the
    training ``labels`` are given), validation split and batch fit them (ValueError naming
    the setting): cheap, so a sweep checks every member before the first trains."""
    if config.train_subset > n_examples:
        raise ValueError(f"--train-subset {config.train_subset} is more than the {n_examples} training images "
                         f"there are (0: all of them)")
    n_pool = config.train_subset or n_examples
    n_split, what = n_pool, f"{n_pool} examples"
    if config.labels_per_class:
        k = num_classes(config)
        if labels is not None:
            counts = np.bincount(np.asarray(labels[:n_pool]), minlength=k)[:k]
            c = int(np.argmin(counts))
            if counts[c] < config.labels_per_class:
                name = config.classes[c] if config.classes else c
                raise ValueError(f"--labels-per-class {config.labels_per_class} is more than the {counts[c]} "
                                 f"training images of class {name} in the training pool")
        n_split = config.labels_per_class * k
        what = f"{n_split} examples: --labels-per-class {config.labels_per_class} x {k} classes"
    if config.val_size >= n_split:
        raise ValueError(f"val_size {config.val_size} leaves no training data ({what})")
    if n_split - config.val_size < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n_split - config.val_size} training examples")
    return n_pool


def member_split(train_x, train_y, config: TrainConfig):
    """``(train_idx, val_idx, mean, std)``: the seeded validation split of the training pool
    (indices into it) and the normalisation constants of its training part; a DataError when
    a channel of the training part is constant (std 0, nothing to normalise by).

    With ``--labels-per-class N`` the split is of a class-balanced subset of N images per
    class, drawn with the seed (:func:`jaxnets.data.balanced_subset`): the labelled images a
    run has, so the validation images come out of them (``--val-size 0``: all N per class
    train). Runs with the same seed draw the same images, whatever else they change, so a
    from-scratch run and a fine-tune at seed s see the same labelled images.
    """
    check_sizes(len(train_x), dataclasses.replace(config, train_subset=0), train_y)  # train_x is the pool already
    rows = np.arange(len(train_x))
    if config.labels_per_class:
        rows = D.balanced_subset(train_y, config.labels_per_class, num_classes(config), config.seed,
                                 config.classes or None)
    train_idx, _, val_idx, _ = D.split_validation(rows, train_y[rows], config.val_size, config.seed)
    if config.normalize == "channel":
        if config.labels_per_class:  # a few thousand images: their own statistics
            mean, std = D.normalization_stats(train_x[train_idx])
        else:  # the whole pool's sums less the validation rows' (no copy of the pool)
            mean, std = D.normalization_stats(train_x, exclude=val_idx)
        flat = np.flatnonzero(~(std > 0))  # (x - mean) / 0: every loss NaN from step 1, not the lr's doing
        if flat.size:
            c = int(flat[0])
            raise D.DataError(f"the training images' channel {c} is constant (every pixel {255 * mean[c]:g} of 255, "
                              f"std 0): --normalize channel would divide by 0; these are not usable images "
                              f"(check the data files)")
    elif config.normalize == "imagenet":  # the constants ImageNet-pretrained weights were trained with
        mean, std = IMAGENET_MEAN.copy(), IMAGENET_STD.copy()
    else:  # the course's per-pixel mean image subtracted from raw 0..255 pixels, no scaling
        mean = (train_x[train_idx].astype(np.float64) / 255.0).mean(axis=0).astype(np.float32)
        std = np.full((), 1.0 / 255.0, np.float32)
    return train_idx.astype(np.int32), val_idx.astype(np.int32), mean, std


def prepare_data(dataset: D.Dataset, config: TrainConfig) -> DeviceData:
    dataset = run_dataset(dataset, config)
    train_x, train_y = training_pool(dataset, config)
    train_idx, val_idx, mean, std = member_split(train_x, train_y, config)
    put = jax.device_put
    return DeviceData(put(train_x[train_idx]), put(train_y[train_idx].astype(np.int32)), put(train_x[val_idx]),
                      put(train_y[val_idx].astype(np.int32)), put(dataset.test_images),
                      put(dataset.test_labels.astype(np.int32)), put(mean), put(std))


def normalize(images_u8, mean, std):
    return (images_u8.astype(jnp.float32) / 255.0 - mean) / std


def model_input(images_u8, mean, std, image_size=0):
    """What the network sees of a batch of uint8 images: :func:`normalize`-d, then resized
    to ``image_size`` x ``image_size`` (``--image-size``; 0: as they are) by
    :func:`jaxnets.conv.resize_bilinear`. The one input pipeline of training, evaluation
    and :meth:`jaxnets.runs.Run.predict`. Normalised first, so a mean image (``--normalize
    mean_image``) is subtracted at the images' own size; the resize is linear with weights
    summing to 1, so per-channel constants give the same either way. The input needs no
    gradient: no backward runs through the resize."""
    x = normalize(images_u8, mean, std)
    if image_size and tuple(x.shape[1:3]) != (image_size, image_size):
        x, _ = conv_ops.resize_bilinear(x, size=image_size)
    return x


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
    ``(params, state, opt_state, loss, correct)``: augment, normalise and resize
    (:func:`model_input`), gradient by the chosen path, Optax update. With
    ``config.freeze`` the gradient is :class:`jaxnets.network.HeadOnly`'s (the head's
    alone, the backbone in evaluation mode). ``hp`` holds the member's ``dropout`` and
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
    if config.freeze:  # a linear probe: the backbone in evaluation mode, no gradient through it
        model = nn.HeadOnly(model)
    dropout_on = model.has_dropout
    if axis_name is not None and dropout_on and getattr(model, "batch_axis_name", None) != axis_name:
        # Same key on every device: without it every device would repeat one slice's masks.
        raise ValueError(f"data-parallel dropout needs the model built with batch_axis_name={axis_name!r}")

    def step(params, state, opt_state, images, labels, key, mean, std, hp):
        aug_key, dropout_key = jax.random.split(key)
        x = augment(aug_key, images, flip=config.dataset != "mnist", axis_name=axis_name) if config.augment else images
        x = model_input(x, mean, std, config.image_size)
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
    ``fold_in(epoch_key, i)``. A one-member call of :func:`make_group_chunk`, the program
    the trainer runs (handy for benchmarks and research code): one compiled program per
    chunk length ``n``.
    """
    group = make_group_chunk(model, optimizer, config)
    hp = hparams_of(config)

    def chunk(carry, data, perm, epoch_key, start, n):
        one = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)
        members = one((*carry, jnp.zeros((), bool)))
        members, (losses, correct) = group(members, data.train_x, data.train_y, one(perm), one(epoch_key),
                                           one(data.mean), one(data.std), one(hp), start, n, n)
        params, state, opt_state, _ = take_member(members, 0)
        return (params, state, opt_state), (losses[0], correct[0])

    return chunk


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
            out = one(*take_member(members, 0), mask=False)
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
    parallel.check_batch(config.batch_size, mesh.size)
    member_chunk = _member_chunk(make_step(model, optimizer, config, axis_name=parallel.AXIS), config.batch_size)

    def chunk(carry, images, labels, epoch_keys, means, stds, hps, start, n, length):
        def body(c, images, labels, k, m, s, h, start, n):
            return member_chunk(c, images, labels, None, k, m, s, h, start, n, length, mask=False)

        spec, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(None, parallel.AXIS)
        sharded = jax.shard_map(body, mesh=mesh, in_specs=(spec, rows, rows, spec, spec, spec, spec, spec, spec),
                                out_specs=spec, check_vma=False)
        c, k, m, s, h = take_member((carry, epoch_keys, means, stds, hps), 0)
        out = sharded(c, images, labels, k, m, s, h, start, n)
        return jax.tree_util.tree_map(lambda a: a[None], out)

    return jax.jit(chunk, static_argnames="length", donate_argnums=0)


def _evaluate_fn(model, batch_size, axis_name=None, image_size=0):
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
            logits, _ = model.apply(params, state, model_input(x, mean, std, image_size), train=False)
            losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
            return jnp.sum(losses * v), jnp.sum((jnp.argmax(logits, -1) == y) * v)

        shape = lambda a: a.reshape(batches, batch_size, *a.shape[1:])
        losses, correct = jax.lax.map(one, (shape(images), shape(labels), shape(valid)))
        losses, correct = jnp.sum(losses), jnp.sum(correct)
        if axis_name is not None:
            losses, correct, n = jax.lax.psum((losses, correct, n), axis_name)
        return losses / n, correct / n

    return evaluate


def make_evaluate(model, batch_size, image_size=0):
    """``evaluate(params, state, x_u8, y, mean, std) -> (mean loss, accuracy)``, in batches
    (the images through :func:`model_input` with ``image_size``)."""
    return jax.jit(_evaluate_fn(model, batch_size, image_size=image_size))


def make_group_evaluate(model, batch_size, image_size=0):
    """``evaluate(params, state, images, labels, index, means, stds) -> (losses, accuracies)``
    per member: member ``m`` is scored on ``images[index[m]]`` (``index`` (members, n)), or
    every member on all of ``images`` when ``index`` is None (the test set)."""
    evaluate = _evaluate_fn(model, batch_size, image_size=image_size)

    def group(params, state, images, labels, index, means, stds):
        if index is None:
            return jax.vmap(lambda p, s, m, sd: evaluate(p, s, images, labels, m, sd))(params, state, means, stds)
        one = lambda p, s, idx, m, sd: evaluate(p, s, images[idx], labels[idx], m, sd)
        return jax.vmap(one)(params, state, index, means, stds)

    return jax.jit(group)


def make_parallel_evaluate(model, batch_size, mesh, image_size=0):
    """:func:`make_group_evaluate` for one member, data parallel over ``mesh``'s ``"batch"`` axis.

    ``evaluate(params, state, images, labels, valid, means, stds) -> (losses, accuracies)``
    (a member axis of 1) on a set split over the devices by
    :func:`jaxnets.parallel.place_eval`: each device scores its rows in batches of
    ``batch_size`` and the sums are added over the devices.
    """
    evaluate = _evaluate_fn(model, batch_size, axis_name=parallel.AXIS, image_size=image_size)

    def group(params, state, images, labels, valid, means, stds):
        def body(p, s, x, y, v, m, sd):
            return evaluate(p, s, x, y, m, sd, valid=v)

        spec, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(parallel.AXIS)
        sharded = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, rows, rows, rows, spec, spec),
                                out_specs=spec, check_vma=False)
        p, s, m, sd = take_member((params, state, means, stds), 0)
        return jax.tree_util.tree_map(lambda a: a[None], sharded(p, s, images, labels, valid, m, sd))

    return jax.jit(group)
