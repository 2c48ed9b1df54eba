"""airbench's layers (GELU, frozen-scale BN, whitening conv, scaled head, Dirac init) and
network: hand-written backward vs jax.vjp and finite differences in float64, and the
data-dependent whitening's defining property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import conv as conv_ops
from jaxnets import gradcheck
from jaxnets import layers as L
from jaxnets import models as M

F64 = jnp.float64


def normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), F64)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def test_gelu_backward_and_formula():
    x = normal(0, (6, 5), 2.0)
    report = gradcheck.check(L.gelu, L.gelu_backward, x)
    assert report.ok, report
    np.testing.assert_allclose(L.gelu(x)[0], jax.nn.gelu(x, approximate=False), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_shift_backward(train):
    params = {"beta": normal(1, (4,))}
    state = {"mean": normal(2, (4,)), "var": 1 + jnp.abs(normal(3, (4,)))}
    x = normal(4, (3, 5, 2, 4), 3.0)
    report = gradcheck.check(lambda p, x: L.batch_norm_shift(p, state, x, train=train, eps=1e-12)[:2],
                             lambda p, cache, dy: L.batch_norm_shift_backward(p, cache, dy, train=train), x, params)
    assert report.ok, report
    # Scale frozen at 1: the output is exactly batch norm's with gamma = 1.
    y, _, new_state = L.batch_norm_shift(params, state, x, train=train, momentum=0.4)
    y_full, _, full_state = L.batch_norm({"gamma": jnp.ones(4, F64), **params}, state, x, train=train, momentum=0.4)
    np.testing.assert_array_equal(y, y_full)
    np.testing.assert_array_equal(new_state["mean"], full_state["mean"])


def test_scaled_linear_backward():
    params = {"w": normal(5, (7, 3))}
    report = gradcheck.check(lambda p, x: L.scaled_linear(p, x, scale=1 / 9),
                             lambda p, c, dy: L.scaled_linear_backward(p, c, dy, scale=1 / 9), normal(6, (4, 7)), params)
    assert report.ok, report


def test_whitening_filters_whiten_the_training_patches():
    # Correlated channels: after the filters, the 2x2 patches' uncentred covariance is ~ I
    # (up to eps) and the second half of the filters is the first negated.
    rng = np.random.default_rng(7)
    images = rng.standard_normal((20, 9, 8, 3)) @ np.array([[1, 0.8, 0.2], [0, 1, 0.5], [0, 0, 0.3]])
    w = conv_ops.whitening_filters(images, eps=1e-9)
    assert w.shape == (2, 2, 3, 24)
    y, _ = conv_ops.conv2d({"w": jnp.asarray(w)}, jnp.asarray(images), padding=0, impl="gemm")
    z = np.asarray(y).reshape(-1, 24)[:, :12]
    np.testing.assert_allclose(z.T @ z / len(z), np.eye(12), atol=1e-6)
    np.testing.assert_array_equal(w[..., 12:], -w[..., :12])
    with pytest.raises(ValueError, match=r"whitening_filters: expected training images \(N, H, W, C\)"):
        conv_ops.whitening_filters(images[0])


def test_dirac_keeps_first_cin_channels_and_other_filters():
    w = normal(8, (3, 3, 4, 6))
    d = conv_ops.dirac_(w)
    x = normal(9, (2, 5, 5, 4))
    y, _ = conv_ops.conv2d({"w": d}, x, padding=1, impl="gemm")
    np.testing.assert_allclose(y[..., :4], x, atol=1e-12)
    np.testing.assert_array_equal(d[..., 4:], w[..., 4:])


def small_airbench():
    return M.Airbench(input_shape=(28, 28, 3), widths=(4, 6, 5), classes=3, bn_eps=1e-5, conv_impl="gemm")


def test_airbench_gradcheck_after_data_init():
    # The whole hand-written gradient (whitening bias, Dirac convs, 2x2 pools, frozen-scale BN,
    # GELU, the x1/9 head) vs jax.vjp and finite differences, in float64.
    model = small_airbench()
    params, state = model.init(jax.random.PRNGKey(0))
    params, state = jax.tree_util.tree_map(lambda a: a.astype(F64), (params, state))
    x = normal(10, (4, 28, 28, 3))
    params, state = M.data_init(model, params, state, x)
    assert float(jnp.abs(state["whiten"]["w"]).sum()) > 0
    labels = jnp.array([0, 1, 2, 1])
    report = gradcheck.check_model(model, params, state, x, labels, coords=3, label_smoothing=0.2)
    assert report.ok, report
    assert {row.name for row in report.rows} >= {"params['whiten']['b']", "params['blocks'][2]['bn2']['beta']",
                                                  "params['head']['w']"}


def test_airbench_shape_checks():
    assert sum(a.size for a in jax.tree_util.tree_leaves(M.Airbench().init(jax.random.PRNGKey(0))[0])) == 1971352
    with pytest.raises(ValueError, match=r"Airbench: images of shape \(24, 24, 3\) shrink to"):
        M.Airbench(input_shape=(24, 24, 3))
    model = small_airbench()
    params, state = model.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"Airbench: data-dependent init got images of shape \(28, 28, 1\)"):
        M.data_init(model, params, state, np.zeros((2, 28, 28, 1)))
    assert "airbench" in M.FAMILIES


def test_trainer_data_init_uses_each_fresh_members_training_rows_only():
    # The trainer's hook (training._data_init): member 0 (fresh) gets the whitening of its own
    # training rows, normalised as it trains, not of its validation rows; member 1 (resumed,
    # its state in the checkpoint) is left as it was; a shape the model was not built for is
    # one DataError line.
    from jaxnets import data as D
    from jaxnets import placement
    from jaxnets import training as T
    from jaxnets.config import TrainConfig
    from jaxnets.optim import build_optimizer, hparams_of
    from jaxnets.steps import member_split, normalize, stack_members

    rng = np.random.default_rng(3)
    pool_x = rng.integers(0, 256, (40, 28, 28, 3), dtype=np.uint8)
    pool_y = np.arange(40) % 3
    configs = [TrainConfig(model="airbench", dataset="cifar10", val_size=10, batch_size=8, seed=s) for s in (0, 1)]
    splits = [member_split(pool_x, pool_y, c) for c in configs]
    train_idx, val_idx, means, stds = (np.stack(a) for a in zip(*splits))
    pool_x[val_idx[0]] = 255 - pool_x[val_idx[0]] // 4  # validation rows unlike the rest: they would show
    model = small_airbench()
    optimizer = build_optimizer(configs[0], 10)
    members = placement.MemberBlocks(2, vmap=False, put=jax.device_put)
    hps = jax.tree_util.tree_map(np.asarray, stack_members([hparams_of(c) for c in configs]))
    with jax.enable_x64(False):
        carries, _ = T._init_members(model, optimizer, members, configs, hps, None)
        out = T._data_init(model, optimizer, members, carries, hps, None, pool_x, train_idx, means, stds,
                           fresh=[True, False])
        got = [np.asarray(out[k][1]["whiten"]["w"][0]) for k in range(2)]
        want = conv_ops.whitening_filters(np.asarray(normalize(pool_x[train_idx[0]], means[0], stds[0])))
        with_val = conv_ops.whitening_filters(np.asarray(normalize(pool_x, means[0], stds[0])))
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(got[0], with_val, rtol=1e-2, atol=1e-2)
        assert not got[1].any()  # resumed: untouched
        with pytest.raises(D.DataError, match=r"^data-dependent init: Airbench: data-dependent init got images "
                                              r"of shape \(32, 32, 3\)"):
            T._data_init(model, optimizer, members, carries, hps, None, np.zeros((40, 32, 32, 3), np.uint8),
                         train_idx, means, stds, fresh=[True, True])
