"""The composition API (jaxnets.network): every leaf layer and combinator against jax.vjp and
finite differences in float64, the params layouts, dropout keys, bad compositions, every
registered family's manual gradient against jax.grad, and seeded random compositions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import gradcheck
from jaxnets import layers as L
from jaxnets import models as M
from jaxnets import network as nn
from jaxnets.config import TrainConfig
from jaxnets.gradcheck import rel_error



def images(shape, seed=0):
    # Away from kinks: finite differences are wrong at a ReLU's 0 or a max pool's tie.
    return np.random.default_rng(seed).standard_normal(shape)


def ok(report):
    assert report.ok, report
    return report


LEAVES = {
    "linear": (nn.Linear(5), (3, 7)),
    "linear-no-bias": (nn.Linear(4, "pytorch", bias=False), (3, 6)),
    "conv3x3": (nn.Conv(4), (2, 5, 6, 3)),
    "conv5x5-stride2": (nn.Conv(3, 5, stride=2), (2, 7, 8, 2)),
    "conv1x1-stride2-no-bias": (nn.Conv(3, 1, stride=2, bias=False), (2, 6, 5, 2)),
    "conv-asymmetric-pad": (nn.Conv(2, 3, stride=2, padding=((0, 1), (1, 0))), (2, 6, 6, 2)),
    "max-pool": (nn.MaxPool(), (2, 7, 6, 3)),
    "max-pool-2x2": (nn.MaxPool(2, 2, 0), (2, 6, 6, 3)),
    "avg-pool": (nn.AvgPool(), (2, 6, 5, 3)),
    "flatten": (nn.Flatten(), (2, 3, 4, 2)),
    "gelu-function": (nn.Function(lambda x: (jax.nn.gelu(x, approximate=False), x),
                                  lambda x, dy: dy * jax.grad(lambda v: jax.nn.gelu(v, approximate=False).sum())(x)),
                      (3, 5)),
}


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_layers_against_vjp_and_finite_differences(name):
    layer, shape = LEAVES[name]
    ok(gradcheck.check_layer(layer, images(shape)))


@pytest.mark.parametrize("activation", sorted(L.ACTIVATIONS))
def test_activation_layers(activation):
    ok(gradcheck.check_layer(nn.Activation(activation), images((4, 6)) + 0.05))


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_layer_in_both_modes(train):
    layer = nn.BatchNorm(momentum=0.3, eps=1e-3)
    params = {"gamma": jnp.asarray(images((3,), 1)), "beta": jnp.asarray(images((3,), 2))}
    state = {"mean": jnp.asarray(images((3,), 3)), "var": jnp.asarray(1 + images((3,), 4) ** 2)}
    ok(gradcheck.check_layer(layer, images((4, 3, 2, 3)), params=params, state=state, train=train))


def test_dropout_layer_with_its_key():
    ok(gradcheck.check_layer(nn.Dropout(0.4), images((5, 8)), key=jax.random.PRNGKey(3)))


def block(width, stride=1):
    """A torchvision-style basic block: conv-bn-relu-conv-bn, a projection where the shape changes, relu."""
    branch = nn.serial(("conv1", nn.Conv(width, 3, stride=stride, bias=False)), ("bn1", nn.BatchNorm()), nn.relu(),
                       ("conv2", nn.Conv(width, 3, bias=False)), ("bn2", nn.BatchNorm()))
    shortcut = ("downsample", nn.serial(nn.Conv(width, 1, stride=stride, bias=False), nn.BatchNorm()))
    return nn.serial(nn.residual(branch, shortcut if stride > 1 else None), nn.relu(), keys="dict")


def test_residual_blocks_identity_and_projection():
    x = images((2, 6, 6, 4))
    ok(gradcheck.check_layer(block(4), x))
    ok(gradcheck.check_layer(block(5, stride=2), x))
    ok(gradcheck.check_layer(block(4), x, train=False))


def test_residual_backward_is_the_sum_of_both_paths():
    res = nn.residual(nn.serial(("scale", nn.Linear(3, bias=False))))
    params, state, _ = res.init(iter([jax.random.PRNGKey(0)]), (3,), jnp.float32)
    x, dy = jnp.asarray(images((2, 3)), jnp.float32), jnp.asarray(images((2, 3), 1), jnp.float32)
    ctx = nn.Context(train=True)
    _, cache, _ = res.forward(params, state, x, ctx)
    _, dx = res.backward(params, cache, dy, ctx)
    np.testing.assert_allclose(dx, dy + dy @ params["scale"]["w"].T, rtol=1e-6)


def test_params_read_like_torchvision():
    net = nn.Composed(nn.serial(("conv1", nn.Conv(4, 3, bias=False)), ("bn1", nn.BatchNorm()), nn.relu(),
                                ("layer1", nn.serial(block(4), block(6, stride=2))), nn.Flatten(),
                                ("fc", nn.Linear(3))), input_shape=(4, 4, 2))
    params, state = net.init(jax.random.PRNGKey(0))
    names = {jax.tree_util.keystr(p, simple=True, separator=".")
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert names == {"conv1.w", "bn1.gamma", "bn1.beta", "fc.w", "fc.b"} | {
        f"layer1.{i}.{n}" for i in (0, 1) for n in ("conv1.w", "bn1.gamma", "bn1.beta", "conv2.w", "bn2.gamma",
                                                     "bn2.beta")} | {
        "layer1.1.downsample.0.w", "layer1.1.downsample.1.gamma", "layer1.1.downsample.1.beta"}
    assert set(state["layer1"][1]) == {"bn1", "bn2", "downsample"} and state["layer1"][1]["downsample"][0] == {}
    assert "fc" not in state and net.classes == 3


def test_dropout_keys_differ_between_layers():
    two = nn.serial(nn.Dropout(0.5), nn.Dropout(0.5))  # a list: fold_in(key, i) each
    ones = jnp.ones((4, 64))
    _, cache, _ = two.forward([], [], ones, nn.Context(True, jax.random.PRNGKey(0)))
    assert not np.array_equal(cache[0], cache[1])
    named = nn.serial(("a", nn.Linear(64)), nn.Dropout(0.5), nn.Dropout(0.5))
    params, _, _ = named.init(iter([jax.random.PRNGKey(1)]), (64,), jnp.float32)
    _, cache, _ = named.forward(params, {}, ones, nn.Context(True, jax.random.PRNGKey(0)))
    assert not np.array_equal(cache[1], cache[2])


def test_bad_compositions_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match=r"needs a name here"):
        nn.serial(("a", nn.Linear(3)), nn.Linear(4))
    with pytest.raises(ValueError, match="unique"):
        nn.serial(("a", nn.Linear(3)), ("a", nn.Linear(4)))
    with pytest.raises(TypeError, match="expected a jaxnets.network.Layer"):
        nn.serial(jnp.tanh)
    with pytest.raises(ValueError, match=r"branch's output shape \(5,\) differs from the input \(3,\)"):
        nn.residual(nn.serial(("a", nn.Linear(5)))).init(iter([jax.random.PRNGKey(0)]), (3,), jnp.float32)
    clash = nn.residual(nn.serial(("a", nn.Linear(3))), nn.serial(("a", nn.Linear(3))))
    with pytest.raises(ValueError, match=r"merged params keys \['a'\] appear twice"):
        clash.init(iter(jax.random.split(jax.random.PRNGKey(0), 2)), (3,), jnp.float32)
    with pytest.raises(ValueError, match="put a Flatten"):
        nn.Composed(nn.serial(("fc", nn.Linear(3))), input_shape=(2, 2, 1)).init(jax.random.PRNGKey(0))
    net = nn.Composed(nn.serial(nn.Flatten(), ("fc", nn.Linear(3))), input_shape=(2, 2, 1))
    with pytest.raises(ValueError, match=r"input has shape \(1, 3, 3, 1\), but the model was built for"):
        net.apply(*net.init(jax.random.PRNGKey(0)), jnp.zeros((1, 3, 3, 1)), train=False)


def test_networks_are_hashable_static_values():
    a, b = M.ConvNet(plan=(4, "M")), M.ConvNet(plan=(4, "M"))
    assert a == b and hash(a) == hash(b) and a.layer == b.layer and hash(a.layer) == hash(b.layer)
    assert M.ConvNet(plan=(4, "M")) != M.ConvNet(plan=(5, "M"))


# ------------------------------------------------------------------- whole networks


#: A small instance of every registered family: (settings, image shape). A new family must
#: add its entry, so that its hand-written gradient is checked.
SMALL = {
    "mlp": (dict(hidden_units=(7, 5), batch_norm=True, dropout=0.3, activation="elu"), (4, 3, 1)),
    "convnet": (dict(conv_plan=(4, "M", 6, 6)), (6, 5, 3)),
    "preact_convnet": (dict(conv_plan=(4, 4, "M", 6)), (6, 6, 3)),
    "resnet18": (dict(stem="imagenet"), (32, 32, 3)),
    "resnet34": (dict(stem="cifar"), (8, 8, 3)),
    "efficientnet_lite0": (dict(), (32, 32, 3)),
    "airbench": (dict(), (28, 28, 3)),
}


def manual_vs_autodiff(model, shape, seed=0, **kw):
    with jax.enable_x64(True):
        params, state = model.init(jax.random.PRNGKey(seed))
        to64 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), t)
        params, state = to64(params), to64(state)
        x = jnp.asarray(images((3, *shape), seed + 1))
        y = jnp.asarray(np.random.default_rng(seed).integers(0, model.classes, 3), jnp.int32)
        kw = dict(key=jax.random.PRNGKey(5), label_smoothing=0.1, l2=1e-3, **kw)
        # Jitted, as the trainer runs them: op by op, a 16-block EfficientNet in float64
        # took ~5x longer to dispatch than to compile whole.
        jitted = lambda f: jax.jit(lambda p, s, x, y: f(model, p, s, x, y, **kw))
        (la, sa), ga = jitted(M.autodiff_value_and_grad)(params, state, x, y)
        (lm, sm), gm = jitted(M.manual_value_and_grad)(params, state, x, y)
        assert jax.tree_util.tree_structure(ga) == jax.tree_util.tree_structure(params)
        assert rel_error(la, lm) < 1e-12 and rel_error(sa, sm) < 1e-12
        # A leaf that is zero in exact arithmetic (a conv bias in front of batch norm) holds
        # only rounding noise (~1e-17): compare it at the gradients' scale, not its own.
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(ga))
        return rel_error(ga, gm, floor=1e-3 * scale)


@pytest.mark.parametrize("family", sorted(M.FAMILIES))
def test_every_registered_family_manual_equals_jax_grad(family):
    assert family in SMALL, f"add a small instance of the new family {family!r} to SMALL"
    settings, shape = SMALL[family]
    model = M.build(TrainConfig(model=family, **settings), shape, 4)
    assert manual_vs_autodiff(model, shape) < 1e-10


def random_composition(rng, shape):
    """A seeded random network: convs (1/3/5, stride 1/2), batch norms, activations, pools,
    residual blocks with and without projection, dropout, then flatten and a head."""
    items, (h, w, c) = [], shape
    for i in range(rng.integers(2, 5)):
        kind = rng.choice(["conv", "residual", "pool", "bn-act"])
        if kind == "conv" or (kind == "pool" and min(h, w) < 3):
            k, s = int(rng.choice([1, 3, 5])), int(rng.choice([1, 2])) if min(h, w) >= 4 else 1
            c = int(rng.integers(2, 5))
            items.append((f"conv{i}", nn.Conv(c, k, stride=s, bias=bool(rng.integers(2)))))
            h, w = -(-h // s), -(-w // s)
        elif kind == "residual":
            branch = nn.serial(("bn", nn.BatchNorm()), nn.Activation(str(rng.choice(["relu", "tanh", "elu"]))),
                               ("conv", nn.Conv(c, 3)))
            project = bool(rng.integers(2))
            shortcut = ("proj", nn.serial(nn.Conv(c, 1, bias=False), nn.BatchNorm())) if project else None
            items.append((f"res{i}", nn.residual(branch, shortcut)))
        elif kind == "pool":
            items.append(nn.MaxPool() if rng.integers(2) else nn.AvgPool(2, 2, 0))
            h, w = (h + 1) // 2 if items[-1].window == 3 else h // 2, (w + 1) // 2 if items[-1].window == 3 else w // 2
        else:
            items += [(f"bn{i}", nn.BatchNorm()), nn.Activation(str(rng.choice(sorted(L.ACTIVATIONS))))]
    items += [nn.Flatten(), nn.Dropout(0.25), ("head", nn.Linear(3))]
    return nn.Composed(nn.serial(*items), input_shape=shape)


@pytest.mark.parametrize("seed", range(6))
def test_random_compositions_manual_equals_jax_grad(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(5, 9)), int(rng.integers(5, 9)), int(rng.integers(1, 4)))
    net = random_composition(rng, shape)
    assert manual_vs_autodiff(net, shape, seed) < 1e-10, net.layer


def test_a_composed_network_passes_check_model():
    net = random_composition(np.random.default_rng(11), (6, 6, 2))
    params, state = net.init(jax.random.PRNGKey(0))
    x = images((3, 6, 6, 2))
    ok(gradcheck.check_model(net, params, state, x, jnp.asarray([0, 1, 2]), key=jax.random.PRNGKey(1)))
