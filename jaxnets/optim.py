"""Optimizers and learning-rate schedules of a run, built from Optax.

This module owns the mapping from a :class:`~jaxnets.config.TrainConfig`'s ``optimizer``,
``lr``, ``momentum``, ``weight_decay``, ``schedule`` and ``warmup_epochs`` to an Optax
``GradientTransformation``; where Optax's conventions differ from PyTorch's is written in
``docs/optimizers.md``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxnets.config import TrainConfig


def warmup_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The linear warm-up's length: ``warmup_epochs * steps_per_epoch`` steps (whole steps)."""
    return int(config.warmup_epochs * steps_per_epoch)


def lr_schedule(config: TrainConfig, total_steps: int, *, steps_per_epoch: int | None = None):
    """The learning-rate multiplier at each step, peak 1 (the optimizer multiplies by ``lr``).

    ``constant``: 1. ``cosine``: ``(1 + cos(pi t / T)) / 2`` over the ``T`` steps after the
    warm-up. ``step``: 1, times 0.1 from 50% and again from 75% of ``total_steps``.
    ``onecycle``: Optax's cosine one-cycle over ``total_steps`` (no warm-up of its own).
    A warm-up (``warmup_epochs``) rises linearly from 0 to 1 over
    ``warmup_epochs * steps_per_epoch`` steps first. ``steps_per_epoch`` defaults to
    ``total_steps / epochs`` (right when ``max_steps`` does not cut the run short).
    """
    if steps_per_epoch is None:
        if config.warmup_epochs and config.max_steps:
            raise ValueError("lr_schedule: a warm-up with max_steps needs steps_per_epoch (max_steps cuts the run "
                             "short, so total_steps / epochs is not an epoch)")
        steps_per_epoch = total_steps / max(config.epochs, 1)
    warmup = min(warmup_steps(config, steps_per_epoch), total_steps)
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


def decay_mask(params):
    """True on the leaves weight decay applies to: weight matrices and kernels (``"w"``), not
    biases or batch norm's gamma/beta."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "w", params)


#: Numeric settings that may differ between the members of one vmapped sweep group: each
#: member carries them as float32 arrays (the optimizer's in its injected state).
HPARAMS = ("lr", "weight_decay", "momentum", "dropout", "label_smoothing")
#: The optimizer's injected hyperparameter of each of those settings.
OPTIMIZER_HPARAMS = {"lr": "peak_lr", "weight_decay": "weight_decay", "momentum": "momentum"}


#: Per-parameter buffers each optimizer keeps (momentum, second moments): the memory estimate's count.
MOMENT_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2}


def hparams_of(config: TrainConfig):
    """The member's numeric hyperparameters as float32 arrays (see :data:`HPARAMS`)."""
    return {k: jnp.asarray(getattr(config, k), jnp.float32) for k in HPARAMS}


def build_optimizer(config: TrainConfig, total_steps: int, *, steps_per_epoch: int | None = None,
                    decay: bool | None = None):
    """An Optax optimizer whose numeric hyperparameters live in its state.

    ``optax.inject_hyperparams`` holds ``peak_lr``, ``weight_decay`` and ``momentum`` as
    arrays (so a sweep can give every vmapped member its own values without recompiling)
    and ``lr_scale``, the schedule's multiplier at the current step; the learning rate is
    ``peak_lr * lr_scale``. Weight decay is decoupled for ``adamw``
    (``w -= lr * wd * w`` beside Adam's step) and coupled L2 otherwise (``g += wd * w``
    before the optimizer), on :func:`decay_mask`'s leaves only. ``decay`` says whether the
    program has a weight-decay term at all (default: ``config.weight_decay != 0``); a sweep
    group that mixes zero and non-zero weight decay passes True, and its zero members add
    ``0 * w`` to the gradient, which leaves it bit-for-bit unchanged.
    """
    decay = config.weight_decay != 0 if decay is None else decay

    def make(peak_lr, lr_scale, weight_decay, momentum):
        learning_rate = peak_lr * lr_scale
        o = config.optimizer
        if o == "adamw":
            return optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)
        base = {
            "sgd": lambda: optax.sgd(learning_rate),
            "momentum": lambda: optax.sgd(learning_rate, momentum=momentum),
            "nesterov": lambda: optax.sgd(learning_rate, momentum=momentum, nesterov=True),
            "adam": lambda: optax.adam(learning_rate),
            "adagrad": lambda: optax.adagrad(learning_rate),
            "rmsprop": lambda: optax.rmsprop(learning_rate),
        }[o]()
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base) if decay else base

    schedule = lr_schedule(config, total_steps, steps_per_epoch=steps_per_epoch)
    return optax.inject_hyperparams(make)(
        peak_lr=jnp.float32(config.lr), lr_scale=schedule,
        weight_decay=jnp.float32(config.weight_decay), momentum=jnp.float32(config.momentum))


def with_hparams(opt_state, hp):
    """``opt_state`` with the member's optimizer hyperparameters from ``hp``."""
    values = {name: hp[k] for k, name in OPTIMIZER_HPARAMS.items()}
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **values})
