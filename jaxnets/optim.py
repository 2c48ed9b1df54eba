"""Optimizers and learning-rate schedules of a run, built from Optax.

This module owns the mapping from a :class:`~jaxnets.config.TrainConfig`'s ``optimizer``,
``lr``, ``momentum``, ``weight_decay``, ``schedule`` and ``warmup_epochs`` to an Optax
``GradientTransformation``; where Optax's conventions differ from PyTorch's is written in
``docs/optimizers.md``.

Parameter groups (:data:`PARAM_GROUPS`) give parts of the network their own learning rate,
as PyTorch's ``param_groups`` do: each group is a rule that picks leaves of the params tree
and the :class:`TrainConfig` setting of its learning-rate factor (``backbone``: every leaf
outside the network's head, ``--backbone-lr-scale``). A leaf's learning rate is ``lr``
times the product of the factors of the groups it belongs to; the optimizer is then
``optax.multi_transform`` of one copy of the chosen optimizer per combination of groups
(its own moments on its own leaves: the same updates as one optimizer with per-leaf
rates). ``--freeze`` adds the frozen label: the backbone's leaves go to
``optax.set_to_zero()``, which keeps no state. With every factor 1 and no freeze the
optimizer is the plain one, state and all. A group's factor is an injected hyperparameter
(in :data:`HPARAMS`), so a vmapped sweep gives each member its own.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxnets.config import TrainConfig


def warmup_steps(config: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> int:
    """The linear warm-up's length in whole steps: ``warmup_epochs * steps_per_epoch``, or
    ``warmup_fraction * total_steps``."""
    if config.warmup_fraction:
        return int(config.warmup_fraction * total_steps)
    return int(config.warmup_epochs * steps_per_epoch)


def lr_schedule(config: TrainConfig, total_steps: int, *, steps_per_epoch: int | None = None):
    """The learning-rate multiplier at each step, peak 1 (the optimizer multiplies by ``lr``).

    ``constant``: 1. ``cosine``: ``f + (1 - f)(1 + cos(pi t / T)) / 2`` over the ``T`` steps
    after the warm-up, ``f = final_lr_fraction``. ``linear``: ``1 - (1 - f) t / T``, the same
    ``T`` (airbench's decay, in steps). ``step``: 1, times 0.1 from 50% and again from 75% of
    ``total_steps``. ``onecycle``: Optax's cosine one-cycle over ``total_steps`` (no warm-up
    of its own). A warm-up (``warmup_epochs``, or ``warmup_fraction`` of ``total_steps``)
    rises linearly from ``warmup_start`` to 1 first (airbench: 23% of the steps from 0.2,
    then linear to 0.07). ``steps_per_epoch`` defaults to
    ``total_steps / epochs`` (right when ``max_steps`` does not cut the run short).
    """
    if steps_per_epoch is None:
        if config.warmup_epochs and config.max_steps:
            raise ValueError("lr_schedule: a warm-up with max_steps needs steps_per_epoch (max_steps cuts the run "
                             "short, so total_steps / epochs is not an epoch)")
        steps_per_epoch = total_steps / max(config.epochs, 1)
    warmup = min(warmup_steps(config, steps_per_epoch, total_steps), total_steps)
    end = config.final_lr_fraction
    if config.schedule == "constant":
        main = optax.constant_schedule(1.0)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(1.0, max(total_steps - warmup, 1), alpha=end)
    elif config.schedule == "linear":
        main = optax.linear_schedule(1.0, end, max(total_steps - warmup, 1))
    elif config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, 1.0)
    else:  # step: x0.1 at 50% and 75% of training
        main = optax.piecewise_constant_schedule(
            1.0, {int(total_steps * 0.5) - warmup: 0.1, int(total_steps * 0.75) - warmup: 0.1}
        )
    if warmup:
        return optax.join_schedules([optax.linear_schedule(config.warmup_start, 1.0, warmup), main], [warmup])
    return main


def decay_mask(params):
    """True on the leaves weight decay applies to: weight matrices and kernels (``"w"``), not
    biases or batch norm's gamma/beta."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "w", params)


def head_name(model) -> str:
    """The name of ``model``'s head, the last named layer with parameters of its top-level
    composition (``fc``, ``head``): see :func:`jaxnets.network.split_head`."""
    from jaxnets.network import split_head

    return split_head(model.layer)[2]


def _in_backbone(model):
    head = head_name(model)
    return lambda path: getattr(path[0], "key", None) != head


class ParamGroup(NamedTuple):
    """A parameter group: ``setting``, the :class:`TrainConfig` field of its learning-rate
    factor (default 1: the group is inactive), and ``select(model) -> (path -> bool)``, which
    of ``model``'s param leaves (by their ``jax.tree_util`` key path) belong to it."""

    setting: str
    select: Callable


#: The parameter groups by name (the optimizer's labels are joined from these names).
#: Another group is one more entry, one TrainConfig float field (default 1.0, range-checked
#: in config._FLOAT_RANGE) and its name in :data:`HPARAMS`; e.g. issue 24's biases at 64x::
#:
#:     "bias": ParamGroup("bias_lr_scale", lambda model: lambda path: path[-1].key in ("b", "beta"))
#:
#: (a bias of the backbone then trains at ``lr * backbone_lr_scale * bias_lr_scale``).
PARAM_GROUPS = {"backbone": ParamGroup("backbone_lr_scale", _in_backbone),
                # batch norm's shifts (airbench's "bias_scaler" group: its BN biases at 64x the lr)
                "bias": ParamGroup("bias_lr_scale", lambda model: lambda path: getattr(path[-1], "key", None) == "beta")}
#: The label of the leaves ``--freeze`` freezes (the backbone's) and of the leaves in no
#: active group.
FROZEN, REST = "frozen", "rest"


def active_groups(configs) -> tuple:
    """The groups whose factor differs from 1 in any of ``configs`` (a sweep group's members
    share one program, so one member's factor activates the group for all: a factor of 1
    gives those leaves exactly ``lr``, bit for bit)."""
    return tuple(name for name, g in PARAM_GROUPS.items() if any(getattr(c, g.setting) != 1.0 for c in configs))


def param_labels(model, groups, *, freeze=False):
    """``params -> labels``: each leaf's optimizer label, the ``+``-joined names of the
    active ``groups`` it belongs to (:data:`REST` for none), or :data:`FROZEN` for the
    backbone with ``freeze``."""
    selects = {name: PARAM_GROUPS[name].select(model) for name in groups}
    frozen = _in_backbone(model) if freeze else None

    def label(path, _):
        if frozen is not None and frozen(path):
            return FROZEN
        return "+".join(name for name in groups if selects[name](path)) or REST

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def group_labels(groups, *, freeze=False) -> tuple:
    """Every label :func:`param_labels` can give (each subset of ``groups``, in order)."""
    subsets = [()]
    for name in groups:
        subsets += [s + (name,) for s in subsets]
    return (FROZEN,) * freeze + tuple("+".join(s) or REST for s in subsets)


#: Numeric settings that may differ between the members of one vmapped sweep group: each
#: member carries them as float32 arrays (the optimizer's in its injected state).
HPARAMS = ("lr", "weight_decay", "momentum", "dropout", "label_smoothing",
           *(g.setting for g in PARAM_GROUPS.values()))
#: The optimizer's injected hyperparameter of each of those settings (a group's factor is
#: injected only when the group is active).
OPTIMIZER_HPARAMS = {"lr": "peak_lr", "weight_decay": "weight_decay", "momentum": "momentum",
                     **{g.setting: g.setting for g in PARAM_GROUPS.values()}}


#: Per-parameter buffers each optimizer keeps (momentum, second moments): the memory estimate's count.
MOMENT_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2}


def moment_slots(config: TrainConfig) -> int:
    """Parameter-sized buffers the optimizer keeps: :data:`MOMENT_SLOTS`, plus lookahead's slow copy."""
    return MOMENT_SLOTS[config.optimizer] + (1 if config.lookahead_period else 0)


def hparams_of(config: TrainConfig):
    """The member's numeric hyperparameters as float32 arrays (see :data:`HPARAMS`)."""
    return {k: jnp.asarray(getattr(config, k), jnp.float32) for k in HPARAMS}


def build_optimizer(config: TrainConfig, total_steps: int, *, steps_per_epoch: int | None = None,
                    decay: bool | None = None, model=None, groups: tuple | None = None):
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

    Parameter groups (see the module docstring): ``groups`` names the active ones (default
    :func:`active_groups` of ``config``; a sweep group passes its members'), and with them
    or ``config.freeze`` the optimizer is ``optax.multi_transform`` over
    :func:`param_labels` of ``model`` (required then), each group's factor an injected
    hyperparameter.
    """
    decay = config.weight_decay != 0 if decay is None else decay
    groups = active_groups([config]) if groups is None else tuple(groups)
    grouped = bool(groups) or config.freeze
    if grouped and model is None:
        raise ValueError("build_optimizer: parameter groups (a --backbone-lr-scale, --freeze) need the model")

    def make(peak_lr, lr_scale, weight_decay, momentum, **factors):  # factors: the active groups' settings
        learning_rate = peak_lr * lr_scale
        if not grouped:
            return one(learning_rate, weight_decay, momentum)
        transforms = {}
        for label in group_labels(groups, freeze=config.freeze):
            if label == FROZEN:
                transforms[label] = optax.set_to_zero()
                continue
            names = [] if label == REST else label.split("+")
            factor = math.prod((factors[PARAM_GROUPS[n].setting] for n in names), start=1.0)
            transforms[label] = one(learning_rate * factor, weight_decay, momentum)
        return optax.multi_transform(transforms, param_labels(model, groups, freeze=config.freeze))

    def one(learning_rate, weight_decay, momentum):
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

    if config.lookahead_period:
        inner = make

        @functools.wraps(inner)  # the same signature: inject_hyperparams binds its arguments by it
        def make(*args, **kwargs):
            return lookahead(inner(*args, **kwargs), config.lookahead_period,
                             lookahead_schedule(config, total_steps), total_steps)

    schedule = lr_schedule(config, total_steps, steps_per_epoch=steps_per_epoch)
    factors = {PARAM_GROUPS[n].setting: jnp.float32(getattr(config, PARAM_GROUPS[n].setting)) for n in groups}
    # inject_hyperparams injects the factory's named parameters: name each factor in its signature.
    keyword = inspect.Parameter.KEYWORD_ONLY
    make.__signature__ = inspect.signature(make).replace(parameters=[
        *list(inspect.signature(make).parameters.values())[:4], *(inspect.Parameter(k, keyword) for k in factors)])
    return optax.inject_hyperparams(make)(
        peak_lr=jnp.float32(config.lr), lr_scale=schedule,
        weight_decay=jnp.float32(config.weight_decay), momentum=jnp.float32(config.momentum), **factors)


def with_hparams(opt_state, hp):
    """``opt_state`` with the member's optimizer hyperparameters from ``hp`` (those the
    optimizer has: a group's factor only where the group is active)."""
    values = {name: hp[k] for k, name in OPTIMIZER_HPARAMS.items() if name in opt_state.hyperparams}
    return opt_state._replace(hyperparams={**opt_state.hyperparams, **values})


# ------------------------------------------------------------------------------ lookahead


class LookaheadState(NamedTuple):
    """:func:`lookahead`'s state: the steps taken, the slow weights, the inner optimizer's state."""

    count: jax.Array
    slow: Any
    inner: Any


def lookahead_schedule(config: TrainConfig, total_steps: int):
    """Lookahead's decay after step ``t`` (1-based) of ``T``: ``lookahead_decay * (t/T)^lookahead_power``
    (airbench: ``0.95^5 (t/T)^3``, so early syncs barely hold the weights back)."""
    return lambda t: config.lookahead_decay * (t / total_steps) ** config.lookahead_power


def lookahead(inner: optax.GradientTransformation, period: int, decay, total_steps: int):
    """Lookahead (Zhang et al. 2019) around ``inner``, in airbench's form, as an Optax
    transformation: after every ``period``-th step ``t`` the slow weights move towards the
    fast ones, ``slow = d slow + (1 - d) fast`` with ``d = decay(t)``, and the fast weights
    (the live parameters) are reset to them; after step ``total_steps`` they become the slow
    weights (``d = 1``), so a run ends on the slow weights. The slow copy lives in the state
    (one parameter-sized buffer; checkpointed with the optimizer). ``optax.lookahead`` keeps
    a fixed step size on a fast/slow parameter pair; this one takes a schedule and leaves the
    parameters one tree. Batch-norm running statistics are not averaged (they are state, not
    parameters, and follow the live weights' batches).
    """

    def init(params):
        return LookaheadState(jnp.zeros((), jnp.int32), params, inner.init(params))

    def update(updates, state, params):
        if params is None:
            raise ValueError("lookahead: the update needs the parameters")
        updates, inner_state = inner.update(updates, state.inner, params)
        count = state.count + 1
        last = count >= total_steps
        sync = (count % period == 0) | last
        d = jnp.where(last, 1.0, decay(count.astype(jnp.float32)))
        fast = optax.apply_updates(params, updates)
        slow = jax.tree_util.tree_map(lambda s, f: jnp.where(sync, d * s + (1 - d) * f, s).astype(s.dtype),
                                      state.slow, fast)
        updates = jax.tree_util.tree_map(lambda u, s, p: jnp.where(sync, s - p, u).astype(u.dtype),
                                         updates, slow, params)
        return updates, LookaheadState(count, slow, inner_state)

    return optax.GradientTransformation(init, update)


def eval_weights(config: TrainConfig, steps: int, total_steps: int) -> str:
    """Which weights the parameters are after ``steps`` of ``total_steps`` steps, in words: what
    an evaluation and checkpoint then used (metrics.jsonl and summary.json say it)."""
    period = config.lookahead_period
    if not period:
        return "live"
    if steps >= total_steps:
        return "lookahead slow weights (final sync)"
    since = steps % period
    if since == 0:
        return f"lookahead slow weights (synced at step {steps})"
    return f"live fast weights, {since} step{'s' if since > 1 else ''} after the lookahead sync at step {steps - since}"
