"""Whole-model manual backprop vs jax.grad and finite differences (jaxnets.gradcheck), shapes,
one-draw init, vmap, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import gradcheck
from jaxnets import models as M
from jaxnets.gradcheck import rel_error


def assert_same_structure(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape, (x.shape, y.shape)


def data(seed, shape, classes, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    y = jnp.asarray(rng.integers(0, classes, shape[0]), jnp.int32)
    return x, y


def compare_paths(model, batch, dtype, **loss_kwargs):
    params, state = model.init(jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    state = jax.tree_util.tree_map(lambda a: a.astype(dtype), state)
    shape = (batch, model.input_size) if isinstance(model, M.MLP) else (batch, *model.input_shape)
    x, y = data(1, shape, model.classes, dtype)
    kwargs = dict(key=jax.random.PRNGKey(2), **loss_kwargs)
    (loss_a, state_a), grads_a = jax.jit(lambda p: M.autodiff_value_and_grad(model, p, state, x, y, **kwargs))(params)
    (loss_m, state_m), grads_m = jax.jit(lambda p: M.manual_value_and_grad(model, p, state, x, y, **kwargs))(params)
    assert_same_structure(grads_a, grads_m)
    assert_same_structure(state_a, state_m)
    np.testing.assert_allclose(loss_a, loss_m, rtol=1e-6)
    assert rel_error(state_a, state_m) < 1e-6
    # Leaves that are zero in exact arithmetic (a linear bias in front of batch norm) hold
    # only rounding noise, ~1e-8 in float32: compare those at 1e-3 of the gradients' scale.
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads_a))
    floor = 1e-8 if dtype == jnp.float64 else 1e-3 * scale
    return rel_error(grads_a, grads_m, floor=floor)


MLP_CASES = {
    "logreg": dict(hidden=()),
    "relu-bn-dropout": dict(hidden=(16, 9), batch_norm=True, dropout=0.3),
    "elu-dropout": dict(hidden=(11,), activation="elu", dropout=0.2),
    "tanh-bn": dict(hidden=(8, 8, 5), activation="tanh", batch_norm=True),
    "sigmoid-course-init": dict(hidden=(7,), activation="sigmoid", init_scheme="pytorch"),
    "selu-leaky": dict(hidden=(6,), activation="selu"),
}


@pytest.mark.parametrize("case", sorted(MLP_CASES))
@pytest.mark.parametrize("batch", [1, 5])
def test_mlp_manual_matches_autodiff_float64(case, batch):
    if batch == 1 and MLP_CASES[case].get("batch_norm"):
        batch = 2  # batch statistics of one example are degenerate (xhat = 0)
    model = M.MLP(input_size=13, classes=4, **MLP_CASES[case])
    with jax.enable_x64(True):
        assert compare_paths(model, batch, jnp.float64, l2=0.01, label_smoothing=0.1) < 1e-6


def test_mlp_manual_matches_autodiff_float32():
    model = M.MLP(input_size=3072, hidden=(128, 64), batch_norm=True, dropout=0.2)
    assert compare_paths(model, 32, jnp.float32) < 1e-4


SMALL_VGG = (4, "M", 6, 6, "M")


def test_convnet_manual_matches_autodiff_float64():
    model = M.ConvNet(input_shape=(7, 5, 3), plan=SMALL_VGG, classes=3)
    with jax.enable_x64(True):
        assert compare_paths(model, 3, jnp.float64, l2=0.01) < 1e-6


def test_convnet_gradcheck():
    # The whole hand-written gradient vs jax.vjp and finite differences, every parameter
    # leaf, of a pre-activation ConvNet (1x1 projection, residual adds, head BN) through the
    # CPU kernels: a Winograd convolution (16 channels at 4x4) and the phased max pool.
    model = M.ConvNet(input_shape=(8, 8, 3), plan=(16, "M", 16), classes=3, preact=True, conv_impl="winograd")
    params, state = model.init(jax.random.PRNGKey(0))
    x, y = data(3, (2, 8, 8, 3), 3, jnp.float32)
    report = gradcheck.check_model(model, params, state, x, y, coords=4, l2=0.01)
    assert report.ok, report
    assert len(report.rows) == len(jax.tree_util.tree_leaves(params))
    assert {row.name for row in report.rows} >= {"params['blocks'][1]['conv']['w']", "params['head']['b']"}


@pytest.mark.parametrize("preact", [False, True])
def test_course_convnet_manual_matches_autodiff_float32(preact):
    model = M.ConvNet(preact=preact)
    assert compare_paths(model, 4, jnp.float32) < 1e-4


@pytest.mark.parametrize(
    "model,shape",
    [
        (M.MLP(input_size=784, hidden=(30,)), (5, 28, 28, 1)),
        (M.MLP(input_size=20, hidden=()), (3, 20)),
        (M.ConvNet(), (2, 32, 32, 3)),
        (M.ConvNet(input_shape=(28, 28, 1)), (2, 28, 28, 1)),
        (M.ConvNet(input_shape=(28, 28, 1), preact=True), (2, 28, 28, 1)),
    ],
)
def test_init_and_apply_agree_on_shapes(model, shape):
    params, state = model.init(jax.random.PRNGKey(0))
    x = jnp.zeros(shape)
    logits, new_state = jax.eval_shape(lambda p, s: model.apply(p, s, x, train=True), params, state)
    assert logits.shape == (shape[0], model.classes)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


@pytest.mark.parametrize("scheme", ["kaiming", "pytorch"])
def test_init_draws_once_and_equals_the_layers_own_inits(scheme):
    # The whole model's weights come from one random draw (compile time), with the numbers
    # each layer's own init function gives it from its key.
    from jaxnets import conv
    from jaxnets import layers as L

    mlp = M.MLP(input_size=12, hidden=(9, 7), init_scheme=scheme)
    convnet = M.ConvNet(input_shape=(8, 8, 3), plan=(4, "M", 6, 6, "M"), init_scheme=scheme)
    for model in (mlp, convnet, M.ConvNet(input_shape=(8, 8, 3), plan=(4, "M", 6), preact=True)):
        assert str(jax.make_jaxpr(model.init)(jax.random.key(0))).count("random_bits[") == 1

    first = "lecun" if scheme == "kaiming" else scheme
    def by_layer(key):
        keys = jax.random.split(key, 3)
        mlp_layers = [L.linear_init(keys[0], 12, 9, scheme=first), L.linear_init(keys[1], 9, 7, scheme=scheme),
                      L.linear_init(keys[2], 7, 10, scheme=scheme)]
        keys = jax.random.split(key, 7)
        convs = [conv.conv2d_init(keys[0], 3, 4, scheme=first, bias=False), conv.conv2d_init(keys[1], 4, 6, scheme=scheme, bias=False),
                 conv.conv2d_init(keys[2], 6, 6, scheme=scheme, bias=False)]
        return mlp_layers, convs, L.linear_init(keys[3], 2 * 2 * 6, 10, scheme=scheme)

    key = jax.random.key(5)
    mlp_layers, convs, head = jax.jit(by_layer)(key)
    mlp_params, _ = jax.jit(mlp.init)(key)
    conv_params, _ = jax.jit(convnet.init)(key)
    got = ([b["linear"] for b in mlp_params["blocks"]] + [mlp_params["head"]],
           [b["conv"] for b in conv_params["blocks"]], conv_params["head"])
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure((mlp_layers, convs, head))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves((mlp_layers, convs, head))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_eval_mode_is_deterministic_and_keeps_state():
    model = M.MLP(input_size=10, hidden=(8,), batch_norm=True, dropout=0.5)
    params, state = model.init(jax.random.PRNGKey(0))
    x, _ = data(0, (6, 10), 10, jnp.float32)
    a, s1 = model.apply(params, state, x, train=False)
    b, _ = model.apply(params, state, x, train=False)
    np.testing.assert_array_equal(a, b)
    assert s1 is state or jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: bool(jnp.all(u == v)), s1, state))
    with pytest.raises(ValueError, match="PRNG key"):
        model.apply(params, state, x, train=True)


def test_vmap_over_params():
    model = M.MLP(input_size=12, hidden=(8,), batch_norm=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params, state = jax.vmap(model.init)(keys)
    x, y = data(0, (5, 12), 10, jnp.float32)
    (losses, _), grads = jax.vmap(lambda p, s: M.manual_value_and_grad(model, p, s, x, y))(params, state)
    assert losses.shape == (3,)
    for i in range(3):
        p_i = jax.tree_util.tree_map(lambda a: a[i], params)
        s_i = jax.tree_util.tree_map(lambda a: a[i], state)
        (loss_i, _), grads_i = M.autodiff_value_and_grad(model, p_i, s_i, x, y)
        np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
        assert rel_error(jax.tree_util.tree_map(lambda a: a[i], grads), grads_i) < 1e-4


def test_bad_input_errors():
    mlp = M.MLP(input_size=784, hidden=(10,))
    params, state = mlp.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"MLP: input has 3072 features .*expects 784"):
        mlp.apply(params, state, jnp.zeros((2, 32, 32, 3)), train=False)
    with pytest.raises(ValueError, match=r"MLP: input must be 2-D or 4-D"):
        mlp.apply(params, state, jnp.zeros((2, 28, 28)), train=False)
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        M.MLP(input_size=4, activation="mish")
    with pytest.raises(ValueError, match="unknown init scheme 'glorot'"):
        M.MLP(input_size=4, init_scheme="glorot")
    net = M.ConvNet()
    params, state = net.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"ConvNet: input images have shape \(28, 28, 1\)"):
        net.apply(params, state, jnp.zeros((2, 28, 28, 1)), train=False)
    with pytest.raises(ValueError, match=r"ConvNet: input must be 4-D"):
        net.apply(params, state, jnp.zeros((2, 32, 32)), train=False)
    with pytest.raises(ValueError, match="gradient path"):
        M.value_and_grad(mlp, None, None, None, None, grad="numeric")
