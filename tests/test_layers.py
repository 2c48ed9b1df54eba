"""Hand-written backward passes of the dense layers vs jax.vjp and finite differences
(jaxnets.gradcheck), batch norm's statistics, dropout's masks, the initialisers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import _init_fast, gradcheck
from jaxnets import layers as L

F64 = jnp.float64


def normal(seed, shape, scale=1.0):
    # numpy, not jax.random: compiling threefry for every shape costs seconds.
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), F64)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def check(forward, manual, primals, seed=0):
    report = gradcheck.check_grad(forward, manual, primals, seed=seed)
    assert report.ok, report


BATCHES = [1, 3, 8]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("fan_in,fan_out", [(5, 4), (1, 7)])
def test_linear(batch, fan_in, fan_out):
    params = L.linear_init(jax.random.PRNGKey(1), fan_in, fan_out, scheme="pytorch", dtype=F64)
    x = normal(2, (batch, fan_in))
    report = gradcheck.check(L.linear, L.linear_backward, x, params)
    assert report.ok, report
    assert [row.name for row in report.rows] == ["params['b']", "params['w']", "x"]


ACTIVATION_KWARGS = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 0.7}}


@pytest.mark.parametrize("name", sorted(L.ACTIVATIONS) + ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", [(1, 5), (7, 3), (2, 3, 5, 4)])
def test_activation(name, shape):
    x = normal(3, shape, 2.0)
    report = gradcheck.check(getattr(L, name), getattr(L, name + "_backward"), x, **ACTIVATION_KWARGS.get(name, {}))
    assert report.ok, report


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("label_form", ["int", "onehot", "soft"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy(batch, label_form, smoothing):
    classes = 6
    logits = normal(4, (batch, classes), 3.0)
    ints = jnp.asarray(np.random.default_rng(5).integers(0, classes, batch))
    labels = {
        "int": ints,
        "onehot": jax.nn.one_hot(ints, classes, dtype=F64),
        "soft": jax.nn.softmax(normal(6, (batch, classes))),
    }[label_form]
    check(
        lambda z: L.softmax_cross_entropy(z, labels, label_smoothing=smoothing)[0],
        lambda z, dl: (
            L.softmax_cross_entropy_backward(
                L.softmax_cross_entropy(z, labels, label_smoothing=smoothing)[1], dl
            ),
        ),
        (logits,),
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_on_probabilities_and_softmax_as_two_layers(smoothing):
    """The course's split: CrossEntropy on the probabilities of a separate Softmax layer is
    gradchecked on its own, and composed equals the fused loss and its gradient."""
    probs = jax.nn.softmax(normal(12, (4, 5)))
    labels = jnp.array([0, 4, 2, 2])
    check(lambda p: L.cross_entropy(p, labels, label_smoothing=smoothing)[0],
          lambda p, dl: (L.cross_entropy_backward(L.cross_entropy(p, labels, label_smoothing=smoothing)[1], dl),),
          (probs,))
    logits = normal(13, (4, 5), 2.0)
    p, softmax_cache = L.softmax(logits)
    loss, ce_cache = L.cross_entropy(p, labels, label_smoothing=smoothing)
    dlogits = L.softmax_backward(softmax_cache, L.cross_entropy_backward(ce_cache))
    fused, fused_cache = L.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    np.testing.assert_allclose(loss, fused, rtol=1e-12)
    np.testing.assert_allclose(dlogits, L.softmax_cross_entropy_backward(fused_cache), rtol=1e-9, atol=1e-15)
    # Where the split breaks and the fused loss does not: a probability that underflowed.
    far = jnp.array([[0.0, -200.0]], jnp.float32)
    assert not np.isfinite(L.cross_entropy(L.softmax(far)[0], jnp.array([1]))[0])
    assert np.isfinite(L.softmax_cross_entropy(far, jnp.array([1]))[0])


def test_cross_entropy_matches_formula_and_forms_agree():
    logits = normal(7, (5, 4))
    labels = jnp.array([0, 3, 1, 1, 2])
    expected = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(5), labels])
    got_int, _ = L.softmax_cross_entropy(logits, labels)
    got_onehot, _ = L.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 4, dtype=F64))
    np.testing.assert_allclose(got_int, expected, rtol=1e-12)
    np.testing.assert_allclose(got_onehot, expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cross_entropy_finite_for_huge_logits(dtype):
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], dtype)
    loss, cache = L.softmax_cross_entropy(logits, jnp.array([1, 0]))
    grad = L.softmax_cross_entropy_backward(cache)
    assert np.isfinite(loss) and loss > 1e3
    assert np.all(np.isfinite(grad))


def test_l2_penalty():
    params = {"a": {"w": normal(8, (3, 4)), "b": normal(9, (4,))}, "bn": {"gamma": normal(10, (4,))}}
    value, cache = L.l2_penalty(params, strength=0.3)
    np.testing.assert_allclose(value, 0.15 * np.sum(np.asarray(params["a"]["w"]) ** 2), rtol=1e-12)
    check(
        lambda p: L.l2_penalty(p, strength=0.3)[0],
        lambda p, dv: (L.l2_penalty_backward(L.l2_penalty(p, strength=0.3)[1], dv, strength=0.3),),
        (params,),
    )


@pytest.mark.parametrize("shape", [(1, 6), (9, 5), (2, 3, 3, 4)])
def test_dropout_backward(shape):
    key = jax.random.PRNGKey(11)
    check(
        lambda x: L.dropout(x, rate=0.3, key=key)[0],
        lambda x, dy: (L.dropout_backward(L.dropout(x, rate=0.3, key=key)[1], dy),),
        (normal(12, shape),),
    )


def test_dropout_keep_rate_scale_and_eval_identity():
    x = jnp.ones((200, 500), F64)
    y, _ = L.dropout(x, rate=0.25, key=jax.random.PRNGKey(0))
    kept = np.mean(np.asarray(y) != 0)
    assert abs(kept - 0.75) < 0.01
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75])
    assert abs(float(y.mean()) - 1.0) < 0.02  # inverted dropout keeps the expectation
    x = normal(1, (4, 5))
    y, cache = L.dropout(x, rate=0.5, key=jax.random.PRNGKey(0), train=False)
    assert y is x and cache is None
    with pytest.raises(ValueError, match="dropout"):
        L.dropout(x, rate=1.0, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="PRNG key"):
        L.dropout(x, rate=0.5)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(2, 5), (7, 3), (3, 5, 7, 4), (1, 3, 3, 2)])
def test_batch_norm_backward(train, shape):
    params, state = L.batch_norm_init(shape[-1], F64)
    params = {"gamma": normal(13, params["gamma"].shape) + 1.0, "beta": normal(14, params["beta"].shape)}
    state = {"mean": normal(15, state["mean"].shape), "var": jnp.exp(normal(16, state["var"].shape))}
    x = normal(17, shape, 2.0) + 0.5

    report = gradcheck.check(lambda p, x: L.batch_norm(p, state, x, train=train)[:2],
                             lambda p, cache, dy: L.batch_norm_backward(p, cache, dy, train=train), x, params)
    assert report.ok, report


@pytest.mark.parametrize("shape", [(1, 4), (1, 1, 1, 3)])
def test_batch_norm_training_refuses_one_value_per_channel(shape):
    # The batch statistics of one value are that value: xhat = 0 and y = beta for any x
    # (and the running variance would shrink). PyTorch raises; so do we, naming the shape.
    params, state = L.batch_norm_init(shape[-1], F64)
    x = normal(23, shape)
    with pytest.raises(ValueError, match=r"batch_norm: expected more than 1 value per channel when training, "
                                         rf"got input shape \({shape[0]}, "):
        L.batch_norm(params, state, x, train=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        jax.jit(lambda x: L.batch_norm(params, state, x, train=True))(x)
    y, _, _ = L.batch_norm(params, state, x, train=False)  # evaluation uses the running statistics
    np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-12)
    # One example with several positions per channel (B*H*W = 2) is a batch of statistics.
    x = np.asarray(normal(24, (1, 2, 1, shape[-1])))
    y, _, _ = L.batch_norm(params, state, jnp.asarray(x), train=True)
    np.testing.assert_allclose(y, (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5), rtol=1e-12)


def test_batch_norm_statistics_and_running_update():
    params, state = L.batch_norm_init(6, F64)
    x = normal(18, (64, 6), 3.0) + 7.0
    y, _, new_state = L.batch_norm(params, state, x, train=True, momentum=0.1)
    assert np.max(np.abs(np.asarray(y.mean(0)))) < 1e-5
    assert np.max(np.abs(np.asarray(y.var(0)) - 1.0)) < 0.1
    batch_mean, batch_var = np.asarray(x.mean(0)), np.asarray(x.var(0, ddof=1))
    np.testing.assert_allclose(new_state["mean"], 0.9 * 0.0 + 0.1 * batch_mean, rtol=1e-10)
    np.testing.assert_allclose(new_state["var"], 0.9 * 1.0 + 0.1 * batch_var, rtol=1e-10)
    # Evaluation normalises with the running statistics and leaves them as they are.
    y_eval, _, same_state = L.batch_norm(params, new_state, x, train=False)
    expected = (np.asarray(x) - new_state["mean"]) / np.sqrt(np.asarray(new_state["var"]) + 1e-5)
    np.testing.assert_allclose(y_eval, expected, rtol=1e-10)
    assert same_state is new_state


def test_batch_norm_conv_statistics_per_channel():
    params, state = L.batch_norm_init(3, F64)
    x = normal(19, (4, 5, 5, 3)) * jnp.array([1.0, 5.0, 0.1]) + jnp.array([2.0, -3.0, 9.0])
    y, _, _ = L.batch_norm(params, state, x, train=True)
    assert np.max(np.abs(np.asarray(y.mean((0, 1, 2))))) < 1e-5
    assert np.max(np.abs(np.asarray(y.var((0, 1, 2))) - 1.0)) < 0.1


@pytest.mark.parametrize("shape", [(1, 5), (6, 3), (2, 4, 4, 3)])
def test_layer_norm(shape):
    params = {"gamma": normal(20, shape[-1:]) + 1.0, "beta": normal(21, shape[-1:])}
    x = normal(22, shape, 2.0) - 1.0
    report = gradcheck.check(L.layer_norm, L.layer_norm_backward, x, params)
    assert report.ok, report
    y, _ = L.layer_norm(L.layer_norm_init(shape[-1], F64), x)
    assert np.max(np.abs(np.asarray(y.mean(-1)))) < 1e-5
    if shape[-1] > 2:
        assert np.max(np.abs(np.asarray(y.var(-1)) - 1.0)) < 0.1


def test_bad_inputs_name_the_layer_and_shapes():
    params = L.linear_init(jax.random.PRNGKey(0), 4, 3)
    with pytest.raises(ValueError, match=r"linear: input has 5 features .*expects 4"):
        L.linear(params, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"linear: input must be 2-D"):
        L.linear(params, jnp.ones((2, 2, 4)))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[0, 3\]"):
        L.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[-1, 1\]"):
        L.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([-1, 1]))
    with pytest.raises(ValueError, match="integer labels has 3 entries"):
        L.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="soft targets"):
        L.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        L.activation("swish")
    with pytest.raises(ValueError, match="unknown init scheme 'xavier'"):
        L.linear_init(jax.random.PRNGKey(0), 2, 2, scheme="xavier")
    bn_params, bn_state = L.batch_norm_init(4)
    with pytest.raises(ValueError, match="batch_norm: input has 3 features"):
        L.batch_norm(bn_params, bn_state, jnp.ones((2, 3)), train=True)


def test_init_scales():
    key = jax.random.PRNGKey(0)
    w = L.linear_init(key, 1000, 400, scheme="kaiming")["w"]
    assert abs(float(w.std()) - np.sqrt(2 / 1000)) < 0.002
    w = L.linear_init(key, 1000, 400, scheme="course")["w"]
    assert abs(float(w.std()) - 1e-4) < 2e-6
    p = L.linear_init(key, 100, 400, scheme="pytorch")
    assert float(jnp.abs(p["w"]).max()) <= 0.1 and float(jnp.abs(p["b"]).max()) <= 0.1
    assert float(p["w"].std()) > 0.05


INIT_SPECS = [((7, 5), 7, "lecun", True), ((3, 3, 4, 6), 36, "kaiming", False), ((5, 2), 5, "pytorch", True),
              ((6, 9), 6, "course", True), ((9, 4), 9, "pytorch", False)]


def per_layer_init(keys, dtype):
    """Each layer's weights drawn on their own with jax.random, the scheme's formula."""
    params = []
    for key, (shape, fan_in, scheme, bias) in zip(keys, INIT_SPECS):
        wkey, bkey = jax.random.split(key)
        if scheme == "pytorch":
            bound = 1 / np.sqrt(fan_in)
            p = {"w": jax.random.uniform(wkey, shape, dtype, -bound, bound),
                 "b": jax.random.uniform(bkey, shape[-1:], dtype, -bound, bound)}
        else:
            std = {"kaiming": np.sqrt(2 / fan_in), "lecun": np.sqrt(1 / fan_in), "course": 1e-4}[scheme]
            p = {"w": jax.random.normal(wkey, shape, dtype) * jnp.asarray(std, dtype), "b": jnp.zeros(shape[-1:], dtype)}
        params.append(p if bias else {"w": p["w"]})
    return params


@pytest.mark.parametrize("dtype", [jnp.float32, F64])
@pytest.mark.parametrize("partitionable", [True, False])
def test_layers_drawn_together_equal_per_layer_jitted_draws(dtype, partitionable):
    # Batched into one draw (partitionable threefry) or not, each layer gets the numbers of
    # its own jitted draw, std * normal(key, shape) (what the trainer's jitted init gave
    # before batching), bit for bit; eager and a single layer's init_weights give the same.
    keys = jax.random.split(jax.random.key(4), len(INIT_SPECS))
    single = lambda keys: [L.init_weights(k, *spec[:2], scheme=spec[2], bias=spec[3], dtype=dtype)
                           for k, spec in zip(keys, INIT_SPECS)]
    together = _init_fast.drawn_together(single)
    with jax.threefry_partitionable(partitionable):
        expected = jax.jit(per_layer_init, static_argnums=1)(keys, dtype)
        batched = jax.jit(together)(keys)
        eager = together(keys)
        # Without batching (not partitionable) init_weights is the jitted per-layer formula itself.
        single = single(keys) if partitionable else eager
        if partitionable:  # one draw (per distribution) for all the layers
            assert str(jax.make_jaxpr(together)(keys)).count("random_bits[") == 2
    assert jax.tree_util.tree_structure(batched) == jax.tree_util.tree_structure(expected)
    for got in (batched, eager, single):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_dropout_masks_are_independent_across_keys_and_positions():
    x = jnp.ones((256, 400))
    masks = np.stack([np.asarray(L.dropout(x, rate=0.3, key=jax.random.key(k))[0] != 0) for k in range(6)])
    assert np.all(np.abs(masks.mean(axis=(1, 2)) - 0.7) < 0.01)
    flat = masks.reshape(6, -1).astype(float)
    corr = np.corrcoef(flat)
    assert np.max(np.abs(corr[~np.eye(6, dtype=bool)])) < 0.02  # across keys
    assert abs(np.corrcoef(flat[0, :-1], flat[0, 1:])[0, 1]) < 0.02  # neighbouring units
    assert abs(np.corrcoef(flat[0, :-400], flat[0, 400:])[0, 1]) < 0.02  # same unit, next example
