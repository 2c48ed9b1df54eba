"""Tests for jaxnets.conv: hand-written backwards vs jax.vjp and finite differences,
winograd vs gemm vs xla implementations, implementation selection, shapes and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxnets import conv as C


@pytest.fixture(autouse=True)
def _restore_impl():
    previous = C.set_conv_impl(None)
    C.set_conv_impl(previous)
    yield
    C.set_conv_impl(previous)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _fd_check(loss, args, grads, rng, n_coords=4, h=1e-5, tol=1e-5):
    """Central differences of scalar ``loss(*args)`` at a few random coordinates of each arg.

    All perturbed inputs are evaluated in one vmapped, jitted call (one compilation).
    """
    args = [np.asarray(a) for a in args]
    stacks, where = [[] for _ in args], []
    for k, a in enumerate(args):
        for _ in range(n_coords):
            idx = tuple(int(rng.integers(0, s)) for s in a.shape)
            where.append((k, idx))
            for sign in (1, -1):
                for j, v in enumerate(args):
                    v = v.copy()
                    if j == k:
                        v[idx] += sign * h
                    stacks[j].append(v)
    vals = np.asarray(jax.jit(jax.vmap(loss))(*[jnp.asarray(np.stack(s)) for s in stacks]))
    for n, (k, idx) in enumerate(where):
        num = (vals[2 * n] - vals[2 * n + 1]) / (2 * h)
        ana = float(np.asarray(grads[k])[idx])
        err = abs(num - ana) / max(1e-8, abs(num) + abs(ana))
        assert err < tol, (k, idx, num, ana, err)


# ----------------------------------------------------------------------------- conv2d

CONV_CASES = [
    # batch, H, W, cin, cout, k, stride, padding
    (1, 5, 7, 3, 4, 3, 1, "SAME"),
    (3, 5, 7, 2, 3, 3, 2, "SAME"),
    (3, 5, 7, 2, 3, 3, 1, "VALID"),
    (1, 6, 7, 3, 2, 3, 2, "VALID"),
    (3, 5, 7, 2, 3, 3, 2, ((2, 1), (0, 2))),
    (3, 5, 7, 2, 3, 3, 1, 1),
    (1, 5, 7, 3, 4, 1, 1, "SAME"),
    (3, 5, 7, 3, 4, 1, 2, "VALID"),
    (3, 5, 7, 2, 3, 1, 1, 1),
    (3, 7, 7, 2, 3, 2, 3, ((2, 1), (1, 2))),
    # where "winograd" runs F(2x2, 3x3): 3x3, stride 1, pad 1, even H and W >= 4, cin >= 16
    (2, 4, 6, 16, 5, 3, 1, "SAME"),
    (1, 8, 4, 17, 3, 3, 1, 1),
]
IMPLS = ("winograd", "gemm", "xla")


def _conv_inputs(case, dtype, seed=0):
    b, h, w, cin, cout, k, _, _ = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, h, w, cin)), dtype)
    params = {
        "w": jnp.asarray(rng.normal(size=(k, k, cin, cout)), dtype),
        "b": jnp.asarray(rng.normal(size=(cout,)), dtype),
    }
    return params, x, rng


def _with_impl(impl, fn, *args):
    previous = C.set_conv_impl(impl)  # read at trace time, so this works inside jit
    try:
        return fn(*args)
    finally:
        C.set_conv_impl(previous)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_backward_matches_vjp_and_fd(case):
    """All impls (traced in one jit): forward vs lax, backward vs jax.vjp, and each other."""
    stride, padding = case[6], case[7]
    with jax.enable_x64(True):
        params, x, rng = _conv_inputs(case, jnp.float64)
        f = lambda p, x: C.conv2d(p, x, stride=stride, padding=padding)[0]
        pads = C._resolve_padding(
            "t", padding, x.shape[1:3], params["w"].shape[:2], (stride, stride)
        )
        out_shape = jax.eval_shape(f, params, x).shape
        dy = jnp.asarray(rng.normal(size=out_shape))

        def check1(params, x, dy):
            y, vjp = jax.vjp(f, params, x)
            ref = lax.conv_general_dilated(  # reference forward: lax's own convolution
                x, params["w"], (stride, stride), pads,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ) + params["b"]
            _, cache = C.conv2d(params, x, stride=stride, padding=padding)
            mine = C.conv2d_backward(params, cache, dy, stride=stride, padding=padding)
            return y, ref, vjp(dy), mine

        check = jax.jit(lambda *a: {i: _with_impl(i, check1, *a) for i in IMPLS})
        results = check(params, x, dy)
        for impl, (y, ref, (dp_ref, dx_ref), (dp, dx)) in results.items():
            assert y.shape == ref.shape
            assert _rel(y, ref) < 1e-12, impl
            assert jax.tree.structure(dp) == jax.tree.structure(params)
            assert dx.shape == x.shape and dx.dtype == jnp.float64
            for a, b in [(dp["w"], dp_ref["w"]), (dp["b"], dp_ref["b"]), (dx, dx_ref)]:
                assert _rel(a, b) < 1e-6, impl
        for impl in ("winograd", "xla"):
            for a, b in zip(jax.tree.leaves(results["gemm"][3]), jax.tree.leaves(results[impl][3])):
                assert _rel(a, b) < 1e-12, impl

        dp, dx = results["winograd"][3]
        with C_impl("winograd"):
            loss = lambda w, b, x: jnp.sum(f({"w": w, "b": b}, x) * dy)
            _fd_check(loss, (params["w"], params["b"], x), (dp["w"], dp["b"], dx), rng, 3)


class C_impl:
    """Context manager: set the conv implementation, restore the previous override."""

    def __init__(self, impl):
        self.impl = impl

    def __enter__(self):
        self.previous = C.set_conv_impl(self.impl)

    def __exit__(self, *exc):
        C.set_conv_impl(self.previous)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[4], CONV_CASES[7], CONV_CASES[10]], ids=str)
def test_impls_agree_float32(case):
    stride, padding = case[6], case[7]
    params, x, rng = _conv_inputs(case, jnp.float32, seed=1)
    out = {}

    def run(params, x):
        y, cache = C.conv2d(params, x, stride=stride, padding=padding)
        dy = jax.random.normal(jax.random.PRNGKey(2), y.shape)
        return (y, *C.conv2d_backward(params, cache, dy, stride=stride, padding=padding))

    for impl in IMPLS:
        C.set_conv_impl(impl)
        out[impl] = jax.jit(lambda p, x: run(p, x))(params, x)  # fresh trace per impl
    for impl in ("winograd", "gemm"):
        (yg, dpg, dxg), (yx, dpx, dxx) = out[impl], out["xla"]
        np.testing.assert_allclose(yg, yx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dpg["w"], dpx["w"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dpg["b"], dpx["b"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dxg, dxx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, cin, stride, padding, used", [
    ((2, 8, 6), 16, 1, "SAME", True),
    ((2, 8, 6), 16, 1, 1, True),
    ((2, 8, 6), 15, 1, "SAME", False),  # too few input channels
    ((2, 7, 6), 16, 1, "SAME", False),  # odd height
    ((2, 2, 2), 16, 1, "SAME", False),  # a single tile
    ((2, 8, 6), 16, 2, "SAME", False),
    ((2, 8, 6), 16, 1, "VALID", False),
])
def test_winograd_used_where_it_applies(shape, cin, stride, padding, used):
    """F(2x2, 3x3) is 16 GEMMs forward and 32 backward (plus the kernel transform's); every
    other case is im2col's one GEMM forward and two backward."""
    params = C.conv2d_init(jax.random.PRNGKey(0), cin, 4)
    x = jnp.ones((*shape, cin))
    C.set_conv_impl("winograd")
    fwd = lambda p, x: C.conv2d(p, x, stride=stride, padding=padding)[0]
    y = jax.eval_shape(fwd, params, x)
    bwd = lambda p, x: C.conv2d_backward(p, x, jnp.ones(y.shape), stride=stride, padding=padding)
    dots = lambda fn: sum(str(e.primitive) == "dot_general" for e in jax.make_jaxpr(fn)(params, x).jaxpr.eqns)
    if used:
        assert dots(fwd) >= 16 and dots(bwd) >= 32
    else:
        assert (dots(fwd), dots(bwd)) == (1, 2)


def test_conv2d_shapes_and_jit():
    params = C.conv2d_init(jax.random.PRNGKey(0), 3, 8)
    x = jnp.ones((2, 9, 11, 3))
    shape = lambda **kw: jax.eval_shape(lambda p, x: C.conv2d(p, x, **kw)[0], params, x).shape
    assert shape() == (2, 9, 11, 8)
    assert shape(stride=2) == (2, 5, 6, 8)
    assert shape(padding="VALID") == (2, 7, 9, 8)
    assert shape(padding=((0, 0), (2, 2)), stride=(1, 2)) == (2, 7, 7, 8)
    f = jax.jit(lambda p, x: C.conv2d_backward(p, x, C.conv2d(p, x)[0]))
    dp, dx = f(params, x)
    assert dp["w"].shape == (3, 3, 3, 8) and dp["b"].shape == (8,) and dx.shape == x.shape


# ----------------------------------------------------------------------------- init


@pytest.mark.parametrize("scheme", ["kaiming", "lecun", "pytorch", "course"])
def test_conv2d_init(scheme):
    p = C.conv2d_init(jax.random.PRNGKey(0), 16, 32, 3, scheme=scheme)
    assert p["w"].shape == (3, 3, 16, 32) and p["b"].shape == (32,)
    assert p["w"].dtype == jnp.float32
    fan_in = 3 * 3 * 16
    w = np.asarray(p["w"])
    if scheme == "kaiming":
        assert abs(w.std() / np.sqrt(2 / fan_in) - 1) < 0.05
    elif scheme == "lecun":
        assert abs(w.std() / np.sqrt(1 / fan_in) - 1) < 0.05
    elif scheme == "course":
        assert abs(w.std() / 1e-4 - 1) < 0.05
    else:
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w).max() <= bound and w.max() > 0.9 * bound
        assert np.abs(np.asarray(p["b"])).max() <= bound and np.any(np.asarray(p["b"]) != 0)
    if scheme != "pytorch":
        assert not np.any(np.asarray(p["b"]))
    assert C.conv2d_init(jax.random.PRNGKey(0), 4, 5, 1)["w"].shape == (1, 1, 4, 5)
    assert C.conv2d_init(jax.random.PRNGKey(0), 4, 5, (1, 3))["w"].shape == (1, 3, 4, 5)


def test_conv2d_init_bad_scheme():
    with pytest.raises(ValueError, match="conv2d_init.*init scheme"):
        C.conv2d_init(jax.random.PRNGKey(0), 3, 4, scheme="xavier")


# ----------------------------------------------------------------------------- impl choice


def _prims(fn, *args):
    # a fresh wrapper each time: JAX caches traces per function object, which (like jit)
    # would keep the implementation chosen when the function was first traced
    return {str(e.primitive) for e in jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr.eqns}


def test_impl_selection_set_and_env(monkeypatch):
    params = C.conv2d_init(jax.random.PRNGKey(0), 3, 4)
    x = jnp.ones((1, 5, 5, 3))
    fwd = lambda p, x: C.conv2d(p, x)[0]
    bwd = lambda p, x: C.conv2d_backward(p, x, jnp.ones((1, 5, 5, 4)))

    monkeypatch.delenv("JAXNETS_CONV_IMPL", raising=False)
    C.set_conv_impl(None)
    expected = "winograd" if jax.default_backend() == "cpu" else "xla"
    assert C.get_conv_impl() == expected

    assert C.set_conv_impl("xla") is None
    assert C.get_conv_impl() == "xla"
    assert "conv_general_dilated" in _prims(fwd, params, x)
    assert "conv_general_dilated" in _prims(bwd, params, x)
    assert C.set_conv_impl("gemm") == "xla"
    assert "conv_general_dilated" not in _prims(fwd, params, x)
    assert "conv_general_dilated" not in _prims(bwd, params, x)
    assert "dot_general" in _prims(fwd, params, x)

    C.set_conv_impl(None)
    monkeypatch.setenv("JAXNETS_CONV_IMPL", "xla")
    assert C.get_conv_impl() == "xla"
    assert "conv_general_dilated" in _prims(fwd, params, x)
    monkeypatch.setenv("JAXNETS_CONV_IMPL", "gemm")
    assert C.get_conv_impl() == "gemm"
    monkeypatch.setenv("JAXNETS_CONV_IMPL", "auto")
    assert C.get_conv_impl() == expected
    C.set_conv_impl("xla")  # the explicit override wins over the environment
    monkeypatch.setenv("JAXNETS_CONV_IMPL", "gemm")
    assert C.get_conv_impl() == "xla"

    C.set_conv_impl(None)
    monkeypatch.setenv("JAXNETS_CONV_IMPL", "cudnn")
    with pytest.raises(ValueError, match="JAXNETS_CONV_IMPL"):
        C.conv2d(params, x)
    with pytest.raises(ValueError, match="set_conv_impl"):
        C.set_conv_impl("fast")


# ----------------------------------------------------------------------------- pooling

POOL_CASES = [
    # batch, H, W, C, window, stride, padding
    (1, 5, 7, 2, 3, 2, 1),
    (3, 5, 7, 2, 3, 2, 1),
    (3, 6, 8, 2, 2, 2, 0),
    (1, 5, 7, 3, 2, 2, 0),
    (3, 5, 7, 2, 3, 1, "SAME"),
    (3, 7, 5, 2, 3, 2, ((1, 0), (2, 1))),
    (2, 6, 8, 3, 3, 2, 1),  # phased (C._pool_phased): window positions cached
    (1, 2, 4, 2, 3, 2, 1),
]


def _pool(name):
    return {
        "max": (C.max_pool, C.max_pool_backward),
        "avg": (C.avg_pool, C.avg_pool_backward),
    }[name]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_pool_backward_matches_vjp_and_fd(case, kind, ties):
    b, h, w, c, k, s, p = case
    fwd, bwd = _pool(kind)
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        if ties:  # many equal values in each window: gradient must go to one position
            x = jnp.asarray(rng.integers(-1, 2, size=(b, h, w, c)), jnp.float64)
        else:
            x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float64)
        f = lambda x: fwd(x, window=k, stride=s, padding=p)[0]
        pads = C._resolve_padding("t", p, (h, w), (k, k), (s, s))
        dy = jnp.asarray(rng.normal(size=jax.eval_shape(f, x).shape))

        @jax.jit
        def check(x, dy):
            y, vjp = jax.vjp(f, x)
            init, op = (-jnp.inf, lax.max) if kind == "max" else (0.0, lax.add)
            ref = lax.reduce_window(x, init, op, (1, k, k, 1), (1, s, s, 1), ((0, 0), *pads, (0, 0)))
            if kind == "avg":
                ref = ref / (k * k)
            _, cache = fwd(x, window=k, stride=s, padding=p)
            dx = bwd(cache, dy, window=k, stride=s, padding=p)
            ones = bwd(cache, jnp.ones_like(y), window=k, stride=s, padding=p)
            return y, ref, vjp(dy)[0], dx, ones

        y, ref, dx_ref, dx, ones = check(x, dy)
        assert y.shape == ref.shape
        assert _rel(y, ref) < 1e-12
        assert dx.shape == x.shape
        assert _rel(dx, dx_ref) < 1e-6
        if kind == "max":  # every output's gradient lands on exactly one input position
            assert float(ones.sum()) == y.size
        if not ties:
            _fd_check(lambda x: jnp.sum(f(x) * dy), (x,), (dx,), rng, n_coords=4)


def test_max_pool_tie_goes_to_first_position():
    x = jnp.zeros((1, 2, 2, 1))
    y, cache = C.max_pool(x, window=2, stride=2, padding=0)
    dx = C.max_pool_backward(cache, jnp.ones_like(y), window=2, stride=2, padding=0)
    np.testing.assert_array_equal(dx[0, :, :, 0], [[1, 0], [0, 0]])
    g = jax.grad(lambda x: C.max_pool(x, window=2, stride=2, padding=0)[0].sum())(x)
    np.testing.assert_array_equal(g, dx)
    # The phased 3x3/2 pool: the window's first real position is x[0, 0] (the rest of its
    # first row and column is padding).
    assert C._pool_phased(x.shape, (3, 3), (2, 2), ((1, 1), (1, 1)))
    y, cache = C.max_pool(x)
    np.testing.assert_array_equal(C.max_pool_backward(cache, jnp.ones_like(y))[0, :, :, 0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(jax.grad(lambda x: C.max_pool(x)[0].sum())(x)[0, :, :, 0], [[1, 0], [0, 0]])


def test_phased_max_pool_only_for_its_geometry():
    assert C._pool_phased((2, 32, 32, 3), (3, 3), (2, 2), ((1, 1), (1, 1)))
    assert not C._pool_phased((2, 31, 32, 3), (3, 3), (2, 2), ((1, 1), (1, 1)))
    assert not C._pool_phased((2, 32, 32, 3), (2, 2), (2, 2), ((0, 0), (0, 0)))
    assert not C._pool_phased((2, 32, 32, 3), (3, 3), (1, 1), ((1, 1), (1, 1)))
    previous = C.set_conv_impl("xla")  # GPU/TPU's choice: the strided pool
    try:
        assert not C._pool_phased((2, 32, 32, 3), (3, 3), (2, 2), ((1, 1), (1, 1)))
    finally:
        C.set_conv_impl(previous)


def test_phased_max_pool_equals_strided(monkeypatch):
    # Ties and NaNs included: the same outputs and the same routing, bit for bit.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-2, 3, size=(3, 8, 6, 4)), jnp.float32).at[0, 1, 1, 0].set(jnp.nan)
    x = x.at[1, 3, 2, 1].set(jnp.nan).at[2, 0, 0, 2].set(-jnp.inf)
    dy = jnp.asarray(rng.normal(size=(3, 4, 3, 4)), jnp.float32)

    def run(x, dy):
        y, cache = C.max_pool(x)
        return y, C.max_pool_backward(cache, dy), jax.grad(lambda x: jnp.sum(C.max_pool(x)[0] * dy))(x)

    phased = jax.jit(run)(x, dy)
    monkeypatch.setattr(C, "_pool_phased", lambda *args: False)
    strided = jax.jit(run)(x, dy)
    for a, b in zip(phased, strided):
        np.testing.assert_array_equal(a, b)


def test_pool_shapes():
    shape = lambda fn, x, **kw: jax.eval_shape(lambda x: fn(x, **kw)[0], x).shape
    x = jnp.ones((2, 32, 32, 3))
    assert shape(C.max_pool, x) == (2, 16, 16, 3)
    assert shape(C.max_pool, jnp.ones((2, 2, 2, 3))) == (2, 1, 1, 3)
    assert shape(C.avg_pool, x, window=2, stride=2, padding=0) == (2, 16, 16, 3)
    # padding counts as zeros in the average (count_include_pad=True)
    y, _ = C.avg_pool(jnp.ones((1, 2, 2, 1)), window=3, stride=2, padding=1)
    np.testing.assert_allclose(y, 4 / 9)


# ----------------------------------------------------------------------------- flatten


def test_flatten():
    x = jnp.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    y, cache = C.flatten(x)
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(y[1], np.arange(60, 120))
    dx = C.flatten_backward(cache, y * 2)
    np.testing.assert_array_equal(dx, x * 2)
    with pytest.raises(ValueError, match="flatten_backward"):
        C.flatten_backward(cache, jnp.ones((2, 59)))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("impl", IMPLS)
def test_conv_bad_inputs(impl):
    C.set_conv_impl(impl)
    p = C.conv2d_init(jax.random.PRNGKey(0), 3, 4)
    x = jnp.ones((2, 5, 5, 3))
    with pytest.raises(ValueError, match=r"conv2d: input must be 4-D, got shape \(5, 5, 3\)"):
        C.conv2d(p, x[0])
    with pytest.raises(ValueError, match=r"conv2d: input has 2 channels.*expects 3"):
        C.conv2d(p, x[..., :2])
    with pytest.raises(ValueError, match="conv2d: kernel .* bigger than the padded input"):
        C.conv2d(p, jnp.ones((2, 2, 5, 3)), padding="VALID")
    with pytest.raises(ValueError, match="conv2d: unknown padding"):
        C.conv2d(p, x, padding="FULL")
    with pytest.raises(ValueError, match="conv2d: padding must be"):
        C.conv2d(p, x, padding=((1, 1),))
    with pytest.raises(ValueError, match="conv2d: padding must be non-negative"):
        C.conv2d(p, x, padding=-1)
    with pytest.raises(ValueError, match="conv2d: stride must be >= 1"):
        C.conv2d(p, x, stride=0)
    with pytest.raises(ValueError, match="conv2d: bias b has 3 entries"):
        C.conv2d({"w": p["w"], "b": jnp.zeros(3)}, x)
    with pytest.raises(ValueError, match="conv2d: kernel w must be 4-D"):
        C.conv2d({"w": p["w"][0], "b": p["b"]}, x)
    with pytest.raises(ValueError, match=r"conv2d_backward: dy has shape \(2, 4, 4, 4\)"):
        C.conv2d_backward(p, x, jnp.ones((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="conv2d_backward: input must be 4-D"):
        C.conv2d_backward(p, x[0], jnp.ones((2, 5, 5, 4)))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_bad_inputs(kind):
    fwd, bwd = _pool(kind)
    name = f"{kind}_pool"
    x = jnp.ones((2, 5, 5, 3))
    with pytest.raises(ValueError, match=rf"{name}: input must be 4-D"):
        fwd(x[0])
    with pytest.raises(ValueError, match=rf"{name}: window .* bigger than the padded input"):
        fwd(jnp.ones((2, 2, 2, 3)), window=3, stride=1, padding=0)
    with pytest.raises(ValueError, match=rf"{name}: padding .* smaller than the window"):
        fwd(x, window=2, stride=2, padding=2)
    with pytest.raises(ValueError, match=rf"{name}: window must be >= 1"):
        fwd(x, window=0, padding=0)
    with pytest.raises(ValueError, match=rf"{name}: stride must be >= 1"):
        fwd(x, stride=0)
    y, cache = fwd(x)
    with pytest.raises(ValueError, match=rf"{name}_backward: dy has shape"):
        bwd(cache, jnp.ones((2, 2, 2, 3)))


def test_conv2d_without_bias():
    params = C.conv2d_init(jax.random.PRNGKey(0), 3, 4, bias=False)
    assert set(params) == {"w"}
    with jax.enable_x64(True):
        params = {"w": params["w"].astype(jnp.float64)}
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)))
        y, vjp = jax.vjp(lambda p, x: C.conv2d(p, x, stride=2)[0], params, x)
        dy = jnp.asarray(np.random.default_rng(1).normal(size=y.shape))
        dp, dx = C.conv2d_backward(params, C.conv2d(params, x, stride=2)[1], dy, stride=2)
        ref_dp, ref_dx = vjp(dy)
        assert set(dp) == {"w"}
        np.testing.assert_allclose(dp["w"], ref_dp["w"], rtol=1e-10)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10)
