"""Optimizers, learning-rate schedules and the weight-decay mask against their formulas.

Each optimizer name's update is hand-computed in NumPy for three steps and compared with
what ``build_optimizer`` does, in float64. The conventions are Optax 0.2.8's (read from its
source), which for the momentum family are also PyTorch's:

* ``sgd``:       w -= lr g
* ``momentum``:  t = mu t + g;  w -= lr t                 (heavy ball, no dampening)
* ``nesterov``:  t = mu t + g;  w -= lr (g + mu t)        (PyTorch's ``nesterov=True``)
* ``adam``:      m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  w -= lr m^ / (sqrt(v^) + eps),
  m^ = m / (1 - b1^k), v^ = v / (1 - b2^k); b1 0.9, b2 0.999, eps 1e-8
* ``adamw``:     Adam's step plus decoupled decay:  w -= lr (m^ / (sqrt(v^) + eps) + wd w)
* ``adagrad``:   s = 0.1 + sum of g^2;  w -= lr g / sqrt(s + 1e-7)   (accumulator starts at
  0.1, eps inside the root)
* ``rmsprop``:   n = 0.9 n + 0.1 g^2 (n starts at 0);  w -= lr g / sqrt(n + 1e-8)  (Optax's
  decay 0.9 and eps inside the root; PyTorch's RMSprop uses alpha 0.99, eps outside)

Weight decay for every optimizer but ``adamw`` is coupled L2: g += wd w before the update.
Either way it applies to weight matrices and kernels only (the leaves named ``"w"``), never
to biases or batch norm's gamma and beta.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnets import data as D
from jaxnets import models as M
from jaxnets import runs
from jaxnets import training as T

from jaxnets.config import TrainConfig
from jaxnets.optim import build_optimizer, decay_mask, eval_weights, moment_slots

# float32-exact hyperparameters, so float64 reference and code see the same numbers;
# deliberately not the defaults (momentum 0.9), so a setting that is ignored shows.
LR, MU, WD = 0.25, 0.75, 0.125
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8

# A parameter tree with every kind of leaf a model has: weight matrices and a conv kernel
# ("w", decayed), a bias ("b") and batch norm's "gamma"/"beta" (not decayed).
SHAPES = {"blocks": [{"linear": {"w": (3, 4)}, "bn": {"gamma": (4,), "beta": (4,)}}],
          "conv": {"w": (3, 3, 1, 2)}, "head": {"w": (4, 2), "b": (2,)}}
DECAYED = {"blocks/0/linear/w", "conv/w", "head/w"}


def leaf_names(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in flat]


def random_tree(rng, scale=1.0):
    return jax.tree_util.tree_map(lambda s: scale * rng.standard_normal(s), SHAPES,
                                  is_leaf=lambda s: isinstance(s, tuple))


def reference(name, wd, params, grads):
    """Parameters after each step, by the formulas in the module docstring (NumPy, float64)."""
    names = leaf_names(params)
    w = [np.array(a, np.float64) for a in jax.tree_util.tree_leaves(params)]
    decayed = [n in DECAYED for n in names]
    zeros = [np.zeros_like(a) for a in w]
    t, m, v = list(zeros), list(zeros), list(zeros)
    s = [np.full_like(a, 0.1) for a in w]
    out = []
    for k, tree in enumerate(grads, start=1):
        g = [np.array(a, np.float64) for a in jax.tree_util.tree_leaves(tree)]
        for i in range(len(w)):
            gi = g[i] + wd * w[i] if (decayed[i] and name != "adamw") else g[i]
            if name == "sgd":
                step = gi
            elif name in ("momentum", "nesterov"):
                t[i] = MU * t[i] + gi
                step = t[i] if name == "momentum" else gi + MU * t[i]
            elif name in ("adam", "adamw"):
                m[i] = B1 * m[i] + (1 - B1) * gi
                v[i] = B2 * v[i] + (1 - B2) * gi**2
                step = (m[i] / (1 - B1**k)) / (np.sqrt(v[i] / (1 - B2**k)) + ADAM_EPS)
                if name == "adamw" and decayed[i]:
                    step = step + wd * w[i]
            elif name == "adagrad":
                s[i] = s[i] + gi**2
                step = gi / np.sqrt(s[i] + 1e-7)
            elif name == "rmsprop":
                v[i] = 0.9 * v[i] + 0.1 * gi**2
                step = gi / np.sqrt(v[i] + 1e-8)
            else:
                raise AssertionError(name)
            w[i] = w[i] - LR * step
        out.append([a.copy() for a in w])
    return out


@pytest.fixture
def x64():
    # float64 for the comparisons with formulas (not for the end-to-end runs below).
    with jax.enable_x64(True):
        yield


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("wd", [0.0, WD], ids=["no-decay", "decay"])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "rmsprop"])
@settings(max_examples=4, deadline=None, derandomize=True)  # derandomized: the same cases in CI every run
@given(seed=st.integers(0, 2**16), log_scale=st.sampled_from([-3, 0, 2]))
def test_optimizer_updates_follow_their_formulas(name, wd, seed, log_scale):
    # Three steps with different gradients; magnitudes 1e-3 .. 1e2 put Adam's and RMSprop's
    # eps, and Adagrad's initial accumulator, in and out of play.
    rng = np.random.default_rng(seed)
    params = random_tree(rng)
    grads = [random_tree(rng, 10.0**log_scale) for _ in range(3)]
    config = TrainConfig(optimizer=name, lr=LR, momentum=MU, weight_decay=wd, schedule="constant")
    optimizer = build_optimizer(config, total_steps=100)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = optimizer.init(p)
    expected = reference(name, wd, params, grads)
    for k, g in enumerate(grads):
        updates, state = optimizer.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
        for got, want, leaf in zip(jax.tree_util.tree_leaves(p), expected[k], leaf_names(p)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name} wd={wd} step {k + 1} leaf {leaf}")


@pytest.mark.usefixtures("x64")
def test_nesterov_is_not_plain_momentum():
    # The two conventions part at the first step already: nesterov moves by (1 + mu) g.
    config = dict(lr=LR, momentum=MU, schedule="constant")
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    for name, factor in (("momentum", 1.0), ("nesterov", 1.0 + MU)):
        optimizer = build_optimizer(TrainConfig(optimizer=name, **config), total_steps=10)
        updates, _ = optimizer.update(g, optimizer.init(p), p)
        np.testing.assert_allclose(updates["w"], -LR * factor * g["w"], rtol=1e-12)


def test_decay_mask_marks_exactly_the_weight_matrices_and_kernels():
    # Independent definition: decay every leaf with two or more axes (dense weights,
    # conv kernels), no leaf with one (biases, batch norm's gamma and beta).
    models = [M.MLP(input_size=12, hidden=(8, 6), batch_norm=True),
              M.MLP(input_size=12, hidden=(8,), batch_norm=False),
              M.ConvNet(input_shape=(8, 8, 3), plan=(4, "M", 6), preact=True),
              M.ConvNet(input_shape=(8, 8, 3), plan=(4, "M", 6), preact=False)]
    for model in models:
        params, _ = jax.eval_shape(model.init, jax.random.key(0))
        mask = decay_mask(params)
        assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
        for name, leaf, m in zip(leaf_names(params), jax.tree_util.tree_leaves(params),
                                 jax.tree_util.tree_leaves(mask)):
            assert m == (len(leaf.shape) >= 2), (model, name, leaf.shape, m)


# --------------------------------------------------------------------------- schedules


def multipliers(config, total_steps, steps, steps_per_epoch=None):
    """The learning-rate multiplier at steps 0..steps-1: plain SGD with lr 1 on a gradient of
    1 moves its parameter by exactly -multiplier each step."""
    optimizer = build_optimizer(dataclasses.replace(config, optimizer="sgd", lr=1.0, weight_decay=0.0),
                                total_steps, steps_per_epoch=steps_per_epoch)
    p = {"w": jnp.zeros(())}

    def body(state, _):
        updates, state = optimizer.update({"w": jnp.ones(())}, state, p)
        return state, -updates["w"]

    _, out = jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))(optimizer.init(p))
    return np.asarray(out)


def cosine(t, start, end):
    """(1 + cos(pi (t - start) / (end - start))) / 2: 1 at ``start``, 0 at ``end``."""
    return 0.5 * (1 + np.cos(np.pi * (t - start) / (end - start)))


def onecycle(t, total):
    """Optax's cosine one-cycle, peak 1: from 1/25 up to 1 at int(0.3 T), down to
    1/(25 * 1e4) at T, each leg a half cosine."""
    peak_at = int(0.3 * total)
    up = 1 / 25 + (1 - 1 / 25) * (1 - np.cos(np.pi * t / peak_at)) / 2
    down = 1 + (1 / 25e4 - 1) * (1 - np.cos(np.pi * (t - peak_at) / (total - peak_at))) / 2
    return np.where(t <= peak_at, up, down)


def step_decay(t, total):
    """1, then 0.1 from step int(T/2), then 0.01 from step int(3T/4)."""
    return np.where(t < int(total * 0.5), 1.0, np.where(t < int(total * 0.75), 0.1, 0.01))


def warm(t, warmup, after):
    """Linear warm-up from 0 at step 0 to 1 at step ``warmup``, then ``after``."""
    return np.where(t < warmup, t / max(warmup, 1), after)


# 10 epochs of 10 steps: T = 100, a warm-up epoch is 10 steps (max_steps is checked below,
# and end to end, where the steps per epoch come from the data).
T_STEPS = 100
STEP = np.arange(T_STEPS, dtype=np.float64)
SCHEDULE_CASES = {
    "constant": (dict(schedule="constant"), np.ones(T_STEPS)),
    "constant+warmup": (dict(schedule="constant", warmup_epochs=1), warm(STEP, 10, 1.0)),
    "cosine": (dict(schedule="cosine"), cosine(STEP, 0, T_STEPS)),
    "cosine+warmup": (dict(schedule="cosine", warmup_epochs=2), warm(STEP, 20, cosine(STEP, 20, T_STEPS))),
    "cosine+half-epoch-warmup": (dict(schedule="cosine", warmup_epochs=0.5), warm(STEP, 5, cosine(STEP, 5, T_STEPS))),
    "step": (dict(schedule="step"), step_decay(STEP, T_STEPS)),
    "step+warmup": (dict(schedule="step", warmup_epochs=1), warm(STEP, 10, step_decay(STEP, T_STEPS))),
    # A warm-up past the first boundary: the decays still sit at 50% and 75% of the run.
    "step+long-warmup": (dict(schedule="step", warmup_epochs=6), warm(STEP, 60, step_decay(STEP, T_STEPS))),
    "onecycle": (dict(schedule="onecycle"), onecycle(STEP, T_STEPS)),
}


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_schedule_multiplier_at_every_step(case):
    settings_, expected = SCHEDULE_CASES[case]
    config = TrainConfig(epochs=10, **settings_)
    # The schedules compute in float32 inside Optax: agreement to float32 rounding.
    np.testing.assert_allclose(multipliers(config, T_STEPS, T_STEPS), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_warmup_with_max_steps_is_warmup_epochs_of_steps(schedule):
    # --epochs 100 --max-steps 60 at 10 steps per epoch: a 2-epoch warm-up is 20 steps (not
    # 2 * 60 / 100 = 1 step), then the schedule runs over the 60 steps.
    config = TrainConfig(epochs=100, max_steps=60, warmup_epochs=2, schedule=schedule)
    s = np.arange(60, dtype=np.float64)
    after = {"constant": np.ones(60), "cosine": cosine(s, 20, 60), "step": step_decay(s, 60)}[schedule]
    np.testing.assert_allclose(multipliers(config, 60, 60, steps_per_epoch=10), warm(s, 20, after), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.usefixtures("x64")
def test_schedule_values_at_named_steps():
    # A few values written out by hand, so the formulas above are not the only witness.
    config = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=1)
    got = multipliers(config, T_STEPS, T_STEPS)
    assert got[0] == 0.0 and got[5] == pytest.approx(0.5) and got[10] == pytest.approx(1.0)
    assert got[55] == pytest.approx(0.5)  # half way through the 90 cosine steps
    assert got[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    step = multipliers(TrainConfig(epochs=10, schedule="step"), T_STEPS, T_STEPS)
    assert (step[49], step[50], step[74], step[75]) == pytest.approx((1.0, 0.1, 0.1, 0.01))
    one = multipliers(TrainConfig(epochs=10, schedule="onecycle"), T_STEPS, T_STEPS)
    assert one[0] == pytest.approx(0.04) and one[30] == pytest.approx(1.0) and one.argmax() == 30


@pytest.mark.usefixtures("x64")
def test_linear_schedule_is_airbenchs_warmup_and_decay_in_steps():
    # airbench94's get_lr for its 476 steps, written out: 23% (109 steps) from 0.2 up to 1,
    # then linearly down to 0.07 at the end.
    total = 476
    config = TrainConfig(epochs=10, schedule="linear", warmup_fraction=0.23, warmup_start=0.2,
                         final_lr_fraction=0.07)

    def get_lr(step):
        warmup = int(total * 0.23)
        if step < warmup:
            return 0.2 * (1 - step / warmup) + step / warmup
        frac = (step - warmup) / (total - warmup)
        return 1 - frac + 0.07 * frac

    np.testing.assert_allclose(multipliers(config, total, total), [get_lr(t) for t in range(total)], rtol=1e-6)
    # The end fraction also ends a cosine; a warm-up fraction is of all the steps.
    got = multipliers(TrainConfig(epochs=10, schedule="cosine", final_lr_fraction=0.1), 100, 100)
    np.testing.assert_allclose(got, 0.1 + 0.9 * cosine(STEP, 0, 100), rtol=1e-6)


@pytest.mark.parametrize("settings_, says", [
    (dict(schedule="step", final_lr_fraction=0.1), "--final-lr-fraction"),
    (dict(warmup_start=0.2), "--warmup-start"),
    (dict(warmup_fraction=0.2, warmup_epochs=1), "--warmup-fraction and --warmup-epochs"),
    (dict(schedule="onecycle", warmup_fraction=0.2), "--warmup-fraction"),
    (dict(lookahead_power=2.0), "--lookahead-period"),
    (dict(warmup_fraction=1.0), "--warmup-fraction must be in [0, 1)"),
])
def test_schedule_and_lookahead_settings_that_do_not_apply_are_refused(settings_, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        TrainConfig(**settings_).validate()


@pytest.mark.usefixtures("x64")
def test_lookahead_follows_airbenchs_update():
    # airbench's LookaheadState with its decay 0.95^5 (t/T)^3, re-run by hand on SGD (lr 0.125,
    # gradient 2 w + 1; the decay is computed in float32, hence the tolerance): every 5th step ema = lerp(ema, w, 1 - d), w = ema; after the last
    # step w = ema (d = 1).
    total, period = 12, 5
    config = TrainConfig(optimizer="sgd", lr=0.125, schedule="constant", lookahead_period=period)
    optimizer = build_optimizer(config, total)
    w = {"w": jnp.asarray([1.0, -2.0])}
    state = optimizer.init(w)
    ref, ema = np.array([1.0, -2.0]), np.array([1.0, -2.0])
    for t in range(1, total + 1):
        updates, state = optimizer.update(jax.tree_util.tree_map(lambda a: 2 * a + 1, w), state, w)
        w = optax.apply_updates(w, updates)
        ref = ref - 0.125 * (2 * ref + 1)
        if t % period == 0 or t == total:
            d = 1.0 if t == total else 0.95 ** 5 * (t / total) ** 3
            ema = d * ema + (1 - d) * ref
            ref = ema.copy()
        np.testing.assert_allclose(w["w"], ref, rtol=1e-6, err_msg=f"step {t}")
    plain = -0.5 + 0.75 ** total * (np.array([1.0, -2.0]) + 0.5)  # SGD alone
    assert np.abs(ref - plain).min() > 1e-3  # the lookahead held the weights back
    assert eval_weights(config, total, total) == "lookahead slow weights (final sync)"
    assert eval_weights(config, 7, total).startswith("live fast weights, 2 steps after the lookahead sync at step 5")
    assert moment_slots(config) == 1 and moment_slots(TrainConfig(optimizer="sgd")) == 0


# ---------------------------------------------------------- schedules in a real run (max_steps)


def tiny_dataset(n_train=1100, n_test=50):
    # Random 8x8 digits: the schedule does not care what it learns. 1000 training rows after
    # a 100-row validation split, batch 100: exactly 10 steps per epoch.
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    return D.Dataset("mnist", images(n_train), rng.integers(0, 10, n_train).astype(np.int32),
                     images(n_test), rng.integers(0, 10, n_test).astype(np.int32), 10, "synthetic")


def stored_multipliers(tmp_path, **settings_):
    """(optimizer step count, lr multiplier of the last step) in each epoch's checkpoint."""
    out = tmp_path / "run"
    config = TrainConfig(hidden_units=(8,), dropout=0.0, batch_size=100, val_size=100, optimizer="sgd", lr=0.01,
                         progress=False, out=str(out), **settings_)
    seen = []

    def read_checkpoint(record, params, state):
        opt_state = runs.read_checkpoint(out)["opt_state"]
        seen.append((int(opt_state["count"]), float(opt_state["hyperparams"]["lr_scale"])))

    T.train(config, dataset=tiny_dataset(), log=lambda *_: None, on_epoch_end=read_checkpoint)
    return seen


def test_cosine_with_max_steps_decays_over_the_max_steps(tmp_path):
    # --epochs 100 --max-steps 30 at 10 steps per epoch: three epochs, and the cosine reaches
    # 0 at step 30, not at step 1000. The checkpoint holds the multiplier of the epoch's last
    # step (steps 9, 19, 29).
    seen = stored_multipliers(tmp_path, epochs=100, max_steps=30, schedule="cosine")
    assert [c for c, _ in seen] == [10, 20, 30]
    np.testing.assert_allclose([m for _, m in seen], cosine(np.array([9, 19, 29]), 0, 30), rtol=1e-6, atol=1e-7)


def test_warmup_with_max_steps_lasts_warmup_epochs_of_steps(tmp_path):
    # One warm-up epoch is one epoch of steps (10 here), whatever --epochs and --max-steps
    # say: then the cosine runs from step 10 to step 30.
    seen = stored_multipliers(tmp_path, epochs=100, max_steps=30, schedule="cosine", warmup_epochs=1)
    assert [c for c, _ in seen] == [10, 20, 30]
    expected = warm(np.array([9, 19, 29]), 10, cosine(np.array([9, 19, 29]), 10, 30))
    np.testing.assert_allclose([m for _, m in seen], expected, rtol=1e-6, atol=1e-7)


def test_bias_lr_scale_is_a_parameter_group_of_batch_norms_betas():
    # airbench's BN biases at 64x the lr, here 4x: the first Nesterov step on a gradient of ones
    # is lr (1 + mu) on every leaf but beta, and 4 times that on beta (with lookahead around it).
    from jaxnets import steps
    config = TrainConfig(hidden_units=(8,), batch_norm=True, dropout=0.0, optimizer="nesterov", lr=0.125,
                         momentum=0.5, bias_lr_scale=4.0, lookahead_period=2, schedule="constant").validate()
    model = steps.build_model(config, (4, 4, 1), 3)
    params, _ = model.init(jax.random.key(0))
    optimizer = build_optimizer(config, 6, model=model)
    updates, _ = optimizer.update(jax.tree_util.tree_map(jnp.ones_like, params), optimizer.init(params), params)
    bn = updates["blocks"][0]["bn"]
    np.testing.assert_allclose(bn["beta"], -4 * 0.125 * 1.5)
    np.testing.assert_allclose(bn["gamma"], -0.125 * 1.5)
    np.testing.assert_allclose(updates["head"]["b"], -0.125 * 1.5)
