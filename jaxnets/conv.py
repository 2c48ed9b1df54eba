"""Convolution, pooling and flatten layers, each with a hand-written backward.

Conventions are those of :mod:`jaxnets.layers`: ``foo(...) -> (y, cache)`` and
``foo_backward(...)``; images are NHWC, convolution kernels HWIO ``(kh, kw, cin, cout)``;
static settings (stride, padding, window) are keyword arguments of both functions; bad
shapes raise ``ValueError`` at trace time.

Three implementations of the convolution (forward *and* backward)
----------------------------------------------------------------
* ``"gemm"``: im2col + one matrix product. The patches are built from ``kh*kw`` strided
  slices of the padded input concatenated on the channel axis, giving a
  ``(B*Ho*Wo, kh*kw*cin)`` matrix that is multiplied by the kernel reshaped to
  ``(kh*kw*cin, cout)``. The backward is two more GEMMs plus ``col2im`` (the adjoint of the
  strided slices: ``lax.pad`` with interior padding, summed). 1x1 convolutions are a plain
  GEMM. XLA:CPU runs ``lax.conv_general_dilated`` through a slow generic kernel, so this
  is several times faster there, both with the hand-written backward and under
  ``jax.grad`` (autodiff of slices/concat/dot is again slices/pads/dots).
* ``"winograd"``: Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2015) for the
  3x3, stride-1, pad-1 convolutions of a VGG (even H and W >= 4, cin >= 16), ``"gemm"``
  for every other convolution. Each 2x2 output tile is computed from a 4x4 input tile with
  16 products instead of 36, so the three GEMMs of a training step do 2.25x fewer FLOPs;
  the tile transforms are additions. Measured on a 2-core CPU at batch 128 it halves the
  time of forward and backward from 16x16x64 to 4x4x512; with 3 input channels or a 2x2
  image (one tile) it is slower than im2col, hence the limits. Rounding differs from the
  direct sum by a few float32 ulps of the output's scale.
* ``"xla"``: ``lax.conv_general_dilated`` and, for the backward, the two convolutions
  that are its transposes. This is what cuDNN / the TPU compiler are good at.

``"auto"`` (the default) picks ``"winograd"`` when ``jax.default_backend() == "cpu"`` and
``"xla"`` otherwise. Override with :func:`set_conv_impl` or the environment variable
``JAXNETS_CONV_IMPL`` (``auto``/``winograd``/``gemm``/``xla``; :func:`set_conv_impl`
wins). The choice is made at *trace* time: functions already compiled by ``jax.jit`` keep
the implementation they were traced with.

Pooling
-------
Both pools are written as a reduction over the ``window*window`` strided slices of the
padded input (dense ops only, no ``reduce_window``/scatter). Measured on a 2-core CPU,
3x3/2/1 max pool of (128, 32, 32, 64): forward ~24 ms slices vs ~18 ms ``reduce_window``,
but ``jax.grad`` ~54 ms slices vs ~250 ms ``reduce_window`` (``select_and_scatter``), so
the slices formulation wins for training.
``max_pool`` pads with ``-inf`` and, on ties, routes the whole gradient to the *first*
maximal position in scan order (row-major over the window); the forward is a chain of
``where(m >= s, m, s)`` so that ``jax.grad`` of the forward routes ties the same way as
:func:`max_pool_backward`. Under the CPU convolutions the course's 3x3/2/1 pool of an
even-sized image is *phased*: unit-stride window slices, and the first maximal positions
stored by the forward for the backward (see :func:`_pool_phased`; same numbers).
``avg_pool`` pads with zeros and always divides by ``window*window`` (PyTorch's
``count_include_pad=True``).
"""

import os

import jax
import jax.numpy as jnp
from jax import lax

from jaxnets._checks import check_choice, check_dim, check_ndim
from jaxnets.layers import init_weights

CONV_IMPLS = ("auto", "winograd", "gemm", "xla")
_ENV_VAR = "JAXNETS_CONV_IMPL"
_impl_override = None


def set_conv_impl(impl):
    """Choose the convolution implementation: ``"auto"``, ``"winograd"``, ``"gemm"`` or ``"xla"``.

    ``None`` removes the override, so the environment variable ``JAXNETS_CONV_IMPL``
    (default ``"auto"``) decides again. Returns the previous override (``None`` if there
    was none), so a caller can restore it. Affects functions traced after the call only.
    """
    global _impl_override
    if impl is not None:
        check_choice("set_conv_impl", "conv implementation", impl, CONV_IMPLS)
    previous, _impl_override = _impl_override, impl
    return previous


def get_conv_impl():
    """The implementation a convolution traced now would use: ``"winograd"``, ``"gemm"`` or ``"xla"``."""
    impl = _impl_override
    if impl is None:
        impl = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
        check_choice(f"conv2d (env {_ENV_VAR})", "conv implementation", impl, CONV_IMPLS)
    if impl == "auto":
        impl = "winograd" if jax.default_backend() == "cpu" else "xla"
    return impl


# ----------------------------------------------------------------------------- helpers


def _pair(layer, name, v):
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
    ):
        return tuple(v)
    raise ValueError(f"{layer}: {name} must be an int or a pair of ints, got {v!r}")


def _check_stride(layer, stride):
    s = _pair(layer, "stride", stride)
    if min(s) < 1:
        raise ValueError(f"{layer}: stride must be >= 1, got {stride!r}")
    return s


def _resolve_padding(layer, padding, in_hw, k_hw, s_hw):
    """Explicit ``((top, bottom), (left, right))`` for "SAME"/"VALID"/int/pairs."""
    if isinstance(padding, str):
        mode = padding.upper()
        check_choice(layer, "padding", mode, ("SAME", "VALID"))
        if mode == "VALID":
            return ((0, 0), (0, 0))
        pads = []
        for n, k, s in zip(in_hw, k_hw, s_hw):  # as lax / TensorFlow: out = ceil(n / s)
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int) and not isinstance(padding, bool):
        pads = ((padding, padding), (padding, padding))
    else:
        try:
            pads = tuple((int(lo), int(hi)) for lo, hi in padding)
            ok = len(pads) == 2 and all(
                isinstance(e, int) and not isinstance(e, bool) for p in padding for e in p
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"{layer}: padding must be 'SAME', 'VALID', an int or "
                f"((top, bottom), (left, right)), got {padding!r}"
            )
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"{layer}: padding must be non-negative, got {padding!r}")
    return pads


def _out_size(layer, what, in_hw, k_hw, s_hw, pads, x_shape):
    out = []
    for n, k, s, (lo, hi) in zip(in_hw, k_hw, s_hw, pads):
        if n + lo + hi < k:
            raise ValueError(
                f"{layer}: {what} {k_hw} is bigger than the padded input "
                f"{(in_hw[0] + sum(pads[0]), in_hw[1] + sum(pads[1]))} "
                f"(input shape {tuple(x_shape)}, padding {pads})"
            )
        out.append((n + lo + hi - k) // s + 1)
    return tuple(out)


def _slices(xp, k_hw, s_hw, out_hw):
    """The ``kh*kw`` strided windows of ``xp`` (B, Hp, Wp, C), each (B, Ho, Wo, C)."""
    (kh, kw), (sh, sw), (ho, wo) = k_hw, s_hw, out_hw
    b, _, _, c = xp.shape
    return [
        lax.slice(
            xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _unslice(piece, i, j, s_hw, padded_hw):
    """Adjoint of ``_slices``'s window (i, j): zero-fill ``piece`` back to (B, Hp, Wp, C)."""
    (sh, sw), (hp, wp) = s_hw, padded_hw
    _, ho, wo, _ = piece.shape
    cfg = (
        (0, 0, 0),
        (i, hp - i - (ho - 1) * sh - 1, sh - 1),
        (j, wp - j - (wo - 1) * sw - 1, sw - 1),
        (0, 0, 0),
    )
    return lax.pad(piece, jnp.zeros((), piece.dtype), cfg)


def _pad(x, pads, value):
    if not any(any(p) for p in pads):
        return x
    cfg = ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0))
    return lax.pad(x, jnp.asarray(value, x.dtype), cfg)


def _crop(xp, pads, in_hw):
    """Inverse of ``_pad``: drop the padded border of a (B, Hp, Wp, C) array."""
    (t, _), (l, _) = pads
    if not any(any(p) for p in pads):
        return xp
    return xp[:, t : t + in_hw[0], l : l + in_hw[1], :]


# --------------------------------------------------------------------------- winograd
# F(2x2, 3x3): for a 4x4 input tile d and a 3x3 kernel g, the 2x2 output tile is
# Y = A^T [(G g G^T) * (B^T d B)] A with the matrices below (points 0, 1, -1, inf). Tile t
# of a pad-1 image covers padded rows 2t..2t+3: writing the padded image as
# (B, H/2+1, 2, W/2+1, 2, C), the four rows of every tile are [t, 0], [t, 1], [t+1, 0],
# [t+1, 1], so tiles are unit-stride slices and the transforms fused elementwise ops.

WINOGRAD_MIN_CHANNELS = 16
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_applies(w_shape, x_shape, s_hw, pads):
    h, w = x_shape[1:3]
    return (tuple(w_shape[:2]) == (3, 3) and s_hw == (1, 1) and pads == ((1, 1), (1, 1))
            and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 4 and w_shape[2] >= WINOGRAD_MIN_CHANNELS)


def _conv_method(w_shape, x_shape, s_hw, pads):
    """What computes this convolution now: ``"winograd"`` where it applies, else ``"gemm"``
    for the CPU implementations, or ``"xla"`` (per :func:`get_conv_impl`)."""
    impl = get_conv_impl()
    if impl == "winograd" and not _winograd_applies(w_shape, x_shape, s_hw, pads):
        return "gemm"
    return impl


def _bt(d0, d1, d2, d3):
    """``B^T d`` along one tile axis: the rows of ``B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]``."""
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _b(e0, e1, e2, e3):
    """``B e``, the adjoint of :func:`_bt`."""
    return [e0, e1 - e2 + e3, e1 + e2 - e0, -e3]


def _at(m0, m1, m2, m3):
    """``A^T m`` along one tile axis: ``A^T = [[1,1,1,0],[0,1,-1,-1]]``."""
    return [m0 + m1 + m2, m1 - m2 - m3]


def _a(e0, e1):
    """``A e``, the adjoint of :func:`_at`."""
    return [e0, e0 + e1, e0 - e1, -e1]


def _tile_halves(z, axis):
    """The four tile rows along ``axis`` of a (.., n+1, 2, ..) phased array: [t,0], [t,1], [t+1,0], [t+1,1]."""
    n = z.shape[axis] - 1
    take = lambda lo, phase: lax.index_in_dim(lax.slice_in_dim(z, lo, lo + n, axis=axis), phase, axis + 1, False)
    return take(0, 0), take(0, 1), take(1, 0), take(1, 1)


def _phase_view(x, value):
    """``x`` (B, H, W, C), even H and W, padded by 1 with ``value`` and seen as
    (B, H/2+1, 2, W/2+1, 2, C): padded row 2t+r is [t, r]."""
    b, h, w, c = x.shape
    return _pad(x, ((1, 1), (1, 1)), value).reshape(b, h // 2 + 1, 2, w // 2 + 1, 2, c)


def _unphase_view(z, x_shape):
    """Adjoint of :func:`_phase_view`: the (B, H/2+1, 2, W/2+1, 2, C) array as the padded
    image, its border cropped."""
    b, h, w, c = x_shape
    return _crop(z.reshape(b, h + 2, w + 2, c), ((1, 1), (1, 1)), (h, w))


def _untile_halves(d0, d1, d2, d3, axis):
    """Adjoint of :func:`_tile_halves`: overlap-add the four tile rows back to (.., n+1, 2, ..).
    ``d3=None`` stands for zeros (a max pool's windows use only the first three)."""
    cfg = lambda lo, hi: [(0, 0, 0)] * axis + [(lo, hi, 0)] + [(0, 0, 0)] * (d0.ndim - axis - 1)
    zero = jnp.zeros((), d0.dtype)
    phase0 = lax.pad(d0, zero, cfg(0, 1)) + lax.pad(d2, zero, cfg(1, 0))
    phase1 = lax.pad(d1, zero, cfg(0, 1))
    if d3 is not None:
        phase1 = phase1 + lax.pad(d3, zero, cfg(1, 0))
    return jnp.stack([phase0, phase1], axis + 1)


def _winograd_input(x):
    """``V = B^T d B`` of every tile: 16 matrices (B*H/2*W/2, C), entry (a, b) at 4a+b."""
    rows = _bt(*_tile_halves(_phase_view(x, 0), 1))  # each (b, h/2, w/2+1, 2, c)
    return [v.reshape(-1, x.shape[3]) for r in rows for v in _bt(*_tile_halves(r, 2))]


def _winograd_input_backward(dv, x_shape):
    """Adjoint of :func:`_winograd_input`: ``dd = B dV B^T`` per tile, overlap-added, cropped."""
    b, h, w, c = x_shape
    dv = [v.reshape(b, h // 2, w // 2, c) for v in dv]
    drows = [_untile_halves(*_b(*dv[4 * a : 4 * a + 4]), axis=2) for a in range(4)]
    return _unphase_view(_untile_halves(*_b(*drows), axis=1), x_shape)


def _winograd_filter(w):
    """``U = G g G^T`` of a (3, 3, cin, cout) kernel: 16 matrices (cin, cout), entry (a, b) at 4a+b."""
    g = jnp.asarray(_WINOGRAD_G, w.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, w, g)
    return [u[a, b] for a in range(4) for b in range(4)]


def _winograd_filter_backward(du):
    """Adjoint of :func:`_winograd_filter`: ``dg = G^T dU G``."""
    g = jnp.asarray(_WINOGRAD_G, du[0].dtype)
    du = jnp.stack(du).reshape(4, 4, *du[0].shape)
    return jnp.einsum("ai,abco,bj->ijco", g, du, g)


def _winograd_output(m, x_shape):
    """``Y = A^T M A`` of every tile, the 2x2 tiles interleaved back to (B, H, W, cout)."""
    b, h, w, _ = x_shape
    m = [e.reshape(b, h // 2, w // 2, -1) for e in m]
    cols = [_at(*m[4 * a : 4 * a + 4]) for a in range(4)]  # cols[a][q]
    y = [_at(*(cols[a][q] for a in range(4))) for q in range(2)]  # y[q][p]
    return jnp.stack([jnp.stack([y[0][p], y[1][p]], 3) for p in range(2)], 2).reshape(b, h, w, -1)


def _winograd_output_backward(dy):
    """Adjoint of :func:`_winograd_output`: ``dM = A dY A^T`` per tile, 16 matrices (tiles, cout)."""
    b, h, w, cout = dy.shape
    dy = dy.reshape(b, h // 2, 2, w // 2, 2, cout)
    t = [_a(dy[:, :, p, :, 0], dy[:, :, p, :, 1]) for p in range(2)]  # t[p][b]
    dm = [_a(t[0][e], t[1][e]) for e in range(4)]  # dm[b][a]
    return [dm[e][a].reshape(-1, cout) for a in range(4) for e in range(4)]


def _winograd_conv(x, w):
    # 16 separate GEMMs rather than one batched dot_general: XLA:CPU runs them faster and
    # no stacked (16, tiles, C) copy is made.
    v, u = _winograd_input(x), _winograd_filter(w)
    return _winograd_output([jnp.dot(vi, ui) for vi, ui in zip(v, u)], x.shape)


def _winograd_conv_backward(x, w, dy):
    v, u = _winograd_input(x), _winograd_filter(w)
    dm = _winograd_output_backward(dy)
    dw = _winograd_filter_backward([jnp.dot(vi.T, dmi) for vi, dmi in zip(v, dm)])
    dx = _winograd_input_backward([jnp.dot(dmi, ui.T) for dmi, ui in zip(dm, u)], x.shape)
    return dw, dx


# ----------------------------------------------------------------------------- conv2d


def conv2d_init(
    key, in_channels, out_channels, kernel_size=3, *, scheme="kaiming", bias=True, dtype=jnp.float32
):
    """Parameters ``{"w": (kh, kw, cin, cout), "b": (cout,)}`` of a 2-D convolution.

    ``fan_in = kh*kw*cin``; ``scheme`` and ``bias`` as in :func:`jaxnets.layers.init_weights`.
    """
    kh, kw = _pair("conv2d_init", "kernel_size", kernel_size)
    return init_weights(
        key, (kh, kw, in_channels, out_channels), kh * kw * in_channels,
        scheme=scheme, bias=bias, dtype=dtype, layer="conv2d_init",
    )


def _conv_geometry(layer, params, x, stride, padding):
    """Validate and return (k_hw, s_hw, pads, out_hw)."""
    w = params["w"]
    check_ndim(layer, "kernel w", w, 4)
    check_ndim(layer, "input", x, 4)
    check_dim(layer, "input", x, 3, w.shape[2], "channels")
    if "b" in params:
        check_ndim(layer, "bias b", params["b"], 1)
        check_dim(layer, "bias b", params["b"], 0, w.shape[3], "entries")
    k_hw, s_hw = w.shape[:2], _check_stride(layer, stride)
    in_hw = x.shape[1:3]
    pads = _resolve_padding(layer, padding, in_hw, k_hw, s_hw)
    out_hw = _out_size(layer, "kernel", in_hw, k_hw, s_hw, pads, x.shape)
    return k_hw, s_hw, pads, out_hw


def _patches(x, k_hw, s_hw, pads, out_hw):
    """im2col: (B, Ho, Wo, kh*kw*cin), channel fastest, then kw, then kh (matches HWIO)."""
    xp = _pad(x, pads, 0)
    if k_hw == (1, 1) and s_hw == (1, 1):
        return xp
    pieces = _slices(xp, k_hw, s_hw, out_hw)
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def _xla_dims():
    return lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def conv2d(params, x, *, stride=1, padding="SAME"):
    """y = conv(x, W) + b: ``y[n,p,q,o] = b[o] + sum_{i,j,c} xp[n, p*s+i, q*s+j, c] W[i,j,c,o]``.

    ``x`` is NHWC, ``W`` HWIO, ``xp`` is ``x`` zero-padded by ``padding`` ("SAME" as in
    lax/TensorFlow: output size ceil(n/stride); "VALID"; an int; or
    ``((top, bottom), (left, right))``). ``stride``: an int or a pair. Cache: ``x``.
    Implementation per :func:`get_conv_impl` (Winograd F(2x2,3x3) or im2col + GEMM on CPU,
    native conv elsewhere).
    """
    k_hw, s_hw, pads, out_hw = _conv_geometry("conv2d", params, x, stride, padding)
    w = params["w"]
    method = _conv_method(w.shape, x.shape, s_hw, pads)
    if method == "winograd":
        y = _winograd_conv(x, w)
    elif method == "gemm":
        cols = _patches(x, k_hw, s_hw, pads, out_hw)
        y = jnp.dot(cols, w.reshape(-1, w.shape[3]))
    else:
        y = lax.conv_general_dilated(x, w, s_hw, pads, dimension_numbers=_xla_dims())
    return (y + params["b"] if "b" in params else y), x


def conv2d_backward(params, cache, dy, *, stride=1, padding="SAME"):
    """Gradients of :func:`conv2d` (same ``stride``/``padding``). Returns ``(dparams, dx)``.

    With ``X = im2col(xp)`` of shape (B*Ho*Wo, kh*kw*cin) and ``W`` reshaped to
    (kh*kw*cin, cout), ``dy`` reshaped to (B*Ho*Wo, cout):

    * ``db = sum_{n,p,q} dy``
    * ``dW = X^T dy``
    * ``dx = crop(col2im(dy W^T))`` where ``col2im`` is the adjoint of im2col: every column
      block (i, j) is zero-filled back to its strided window of ``xp`` (``lax.pad`` with
      interior padding ``stride-1``) and the ``kh*kw`` results are summed.

    ``"winograd"`` (where it applies, see the module docstring): with ``V = B^T d B`` the
    transformed input tiles, ``U = G g G^T`` the transformed kernel and ``M = V U`` (the 16
    tile positions (a, b) each a GEMM over channels) so that ``y = A^T M A``, the backward is
    the adjoint of each linear stage: ``dM = A dy A^T``; ``dU = V^T dM`` and
    ``dW = G^T dU G``; ``dV = dM U^T`` and ``dx`` = the tiles ``B dV B^T`` overlap-added
    back into the padded image (tiles overlap by 2 rows and columns), cropped.

    The ``"xla"`` implementation computes the same two quantities as convolutions:
    ``dW[i,j,c,o] = sum_{n,p,q} xp[n,p*s+i,q*s+j,c] dy[n,p,q,o]`` (x correlated with ``dy``
    dilated by ``s``, batch as the contracted feature axis) and
    ``dx = conv(dilate_s(dy), flip(W)^T)`` with padding ``(k-1-lo, k-1-hi+extra)``,
    ``extra`` = input rows the forward windows never reached (a transposed convolution).
    """
    x = cache
    k_hw, s_hw, pads, out_hw = _conv_geometry("conv2d_backward", params, x, stride, padding)
    w = params["w"]
    cout = w.shape[3]
    check_ndim("conv2d_backward", "dy", dy, 4)
    if dy.shape != (x.shape[0], *out_hw, cout):
        raise ValueError(
            f"conv2d_backward: dy has shape {tuple(dy.shape)}, but the layer's output has "
            f"shape {(x.shape[0], *out_hw, cout)}"
        )
    in_hw = x.shape[1:3]
    padded_hw = tuple(n + lo + hi for n, (lo, hi) in zip(in_hw, pads))
    method = _conv_method(w.shape, x.shape, s_hw, pads)
    if method == "winograd":
        dw, dx = _winograd_conv_backward(x, w, dy)
    elif method == "gemm":
        cols = _patches(x, k_hw, s_hw, pads, out_hw)
        kdim = cols.shape[-1]
        dy2 = dy.reshape(-1, cout)
        dw = jnp.dot(cols.reshape(-1, kdim).T, dy2).reshape(w.shape)
        dcols = jnp.dot(dy, w.reshape(kdim, cout).T)  # (B, Ho, Wo, kh*kw*cin)
        if k_hw == (1, 1) and s_hw == (1, 1):
            dxp = dcols
        else:
            cin = w.shape[2]
            dxp = None
            for n, (i, j) in enumerate((i, j) for i in range(k_hw[0]) for j in range(k_hw[1])):
                piece = dcols if kdim == cin else dcols[..., n * cin : (n + 1) * cin]
                term = _unslice(piece, i, j, s_hw, padded_hw)
                dxp = term if dxp is None else dxp + term
        dx = _crop(dxp, pads, in_hw)
    else:
        (kh, kw), (sh, sw) = k_hw, s_hw
        # Rows/cols of xp beyond the last window: excluded from dW, get zero in dx.
        extra = tuple(hp - (o - 1) * s - k for hp, o, s, k in zip(padded_hw, out_hw, s_hw, k_hw))
        dw = lax.conv_general_dilated(
            x,
            dy,
            window_strides=(1, 1),
            padding=[(lo, hi - e) for (lo, hi), e in zip(pads, extra)],
            rhs_dilation=s_hw,
            dimension_numbers=lax.conv_dimension_numbers(
                x.shape, dy.shape, ("CHWN", "IHWO", "HWNC")
            ),
        )
        dx = lax.conv_general_dilated(
            dy,
            w[::-1, ::-1],
            window_strides=(1, 1),
            padding=[
                (k - 1 - lo, k - 1 - hi + e) for k, (lo, hi), e in zip((kh, kw), pads, extra)
            ],
            lhs_dilation=(sh, sw),
            dimension_numbers=lax.conv_dimension_numbers(
                dy.shape, w.shape, ("NHWC", "HWOI", "NHWC")
            ),
        )
    grads = {"w": dw}
    if "b" in params:
        grads["b"] = dy.sum(axis=(0, 1, 2))
    return grads, dx


# ----------------------------------------------------------------------------- pooling


def _pool_geometry(layer, x, window, stride, padding):
    check_ndim(layer, "input", x, 4)
    k_hw = _pair(layer, "window", window)
    if min(k_hw) < 1:
        raise ValueError(f"{layer}: window must be >= 1, got {window!r}")
    s_hw = _check_stride(layer, stride)
    in_hw = x.shape[1:3]
    pads = _resolve_padding(layer, padding, in_hw, k_hw, s_hw)
    for k, (lo, hi) in zip(k_hw, pads):
        if lo >= k or hi >= k:
            raise ValueError(
                f"{layer}: padding {pads} must be smaller than the window {k_hw} "
                "(a window could lie entirely in the padding)"
            )
    out_hw = _out_size(layer, "window", in_hw, k_hw, s_hw, pads, x.shape)
    return k_hw, s_hw, pads, out_hw


def _check_pool_dy(layer, x, dy, out_hw):
    check_ndim(layer, "dy", dy, 4)
    want = (x.shape[0], *out_hw, x.shape[3])
    if dy.shape != want:
        raise ValueError(
            f"{layer}: dy has shape {tuple(dy.shape)}, but the pool's output has shape {want}"
        )


def max_pool(x, *, window=3, stride=2, padding=1):
    """``y[n,p,q,c] = max_{i,j} xp[n, p*s+i, q*s+j, c]``, ``xp`` = x padded with -inf.

    ``window``/``stride``: int or pair; ``padding`` as in :func:`conv2d` (each side must be
    smaller than the window). Written as a chain ``m = where(m >= s_k, m, s_k)`` over the
    window slices ``s_k`` in row-major window order, so ``jax.grad`` routes each output's
    gradient to the first maximal position, like :func:`max_pool_backward`.
    Cache: ``(x, y)``; for a phased pool (:func:`_pool_phased`) ``(x, k)``, ``k`` the first
    window position with ``s_k == y`` (int8; 9 where there is none, i.e. ``y`` is NaN).
    """
    k_hw, s_hw, pads, out_hw = _pool_geometry("max_pool", x, window, stride, padding)
    phased = _pool_phased(x.shape, k_hw, s_hw, pads)
    pieces = _phased_windows(x) if phased else _slices(_pad(x, pads, -jnp.inf), k_hw, s_hw, out_hw)
    y = pieces[0]
    for piece in pieces[1:]:
        y = jnp.where(y >= piece, y, piece)
    if not phased:
        return y, (x, y)
    first = jnp.full(y.shape, len(pieces), jnp.int8)
    for n in reversed(range(len(pieces))):
        first = jnp.where(pieces[n] == y, jnp.int8(n), first)
    return y, (x, _stored(first))


def max_pool_backward(cache, dy, *, window=3, stride=2, padding=1):
    """``dx = crop(sum_k unslice_k(dy * M_k))`` with ``M_k = [s_k == y] * prod_{l<k} [s_l != y]``.

    ``s_k`` is the k-th strided window slice of the -inf-padded input (row-major window
    order), so ``M_k`` marks, for every output, only the *first* position attaining the
    max; ``unslice_k`` is the adjoint of that strided slice (``lax.pad`` with interior
    padding ``stride-1``) and ``crop`` drops the padding. Overlapping windows add up. For
    a phased pool ``M_k = [k == first]`` with ``first`` from the cache, and ``unslice_k``
    is the adjoint of :func:`_phased_windows`'s window k.
    """
    x, kept = cache  # kept: y, or the first maximal positions of a phased pool
    k_hw, s_hw, pads, out_hw = _pool_geometry("max_pool_backward", x, window, stride, padding)
    _check_pool_dy("max_pool_backward", x, dy, out_hw)
    zero = jnp.zeros((), dy.dtype)
    if _pool_phased(x.shape, k_hw, s_hw, pads):
        return _phased_windows_backward([jnp.where(kept == k, dy, zero) for k in range(9)], x.shape)
    y = kept
    xp = _pad(x, pads, -jnp.inf)
    padded_hw = xp.shape[1:3]
    pieces = _slices(xp, k_hw, s_hw, out_hw)
    remaining = dy  # gradient not yet routed: dy until the first maximal position, then 0
    dxp = None
    for n, piece in enumerate(pieces):
        i, j = divmod(n, k_hw[1])
        hit = piece == y
        term = _unslice(jnp.where(hit, remaining, zero), i, j, s_hw, padded_hw)
        if n + 1 < len(pieces):
            remaining = jnp.where(hit, zero, remaining)
        dxp = term if dxp is None else dxp + term
    return _crop(dxp, pads, x.shape[1:3])


def _pool_phased(x_shape, k_hw, s_hw, pads):
    """Whether a max pool is *phased*: the 3x3, stride-2, pad-1 pool of an even-sized image
    under the CPU convolutions (``"winograd"``/``"gemm"``; GPU/TPU keep the strided one).

    Its windows are unit-stride slices of the image seen as (B, H/2+1, 2, W/2+1, 2, C)
    (:func:`_phased_windows`), and the forward stores the first maximal positions, which
    the backward routes by. The strided backward recomputes the max and the select chains
    inside XLA:CPU's fusion for each of the 9 (interior-padded) window terms; in the
    course ConvNet's manual step this one is 8-15% faster (same-process A/B).
    """
    h, w = x_shape[1:3]
    return (get_conv_impl() != "xla" and k_hw == (3, 3) and s_hw == (2, 2) and pads == ((1, 1), (1, 1))
            and h % 2 == 0 and w % 2 == 0)


def _stored(a):
    """``a``, computed where it is made and stored rather than recomputed by each consumer.

    XLA:CPU fuses cheap elementwise producers into their consumers (it drops
    ``optimization_barrier``), so the max pool's 9 window positions were recomputed, chain
    and all, for each of the backward's 9 terms. A conditional is a fusion boundary XLA
    keeps; both branches return ``a`` (``a + 0`` in one, which keeps XLA from removing a
    conditional with identical branches), so the predicate does not matter.
    """
    if a.size == 0:
        return a
    return lax.cond(a.reshape(-1)[0] < 0, lambda v: v + 0, lambda v: v, a)


def _phased_windows(x):
    """The 9 windows of the -inf-padded (B, H, W, C) image, row-major, each (B, H/2, W/2, C):
    window rows of output p are padded rows 2p, 2p+1, 2p+2, i.e. the first three of
    :func:`_tile_halves` of :func:`_phase_view`."""
    return [col for row in _tile_halves(_phase_view(x, -jnp.inf), 1)[:3] for col in _tile_halves(row, 2)[:3]]


def _phased_windows_backward(dwindows, x_shape):
    """Adjoint of :func:`_phased_windows`: the 9 windows overlap-added back, cropped."""
    drows = [_untile_halves(*dwindows[3 * i : 3 * i + 3], None, axis=2) for i in range(3)]
    return _unphase_view(_untile_halves(*drows, None, axis=1), x_shape)


def avg_pool(x, *, window=3, stride=2, padding=1):
    """``y[n,p,q,c] = (1/(kh*kw)) sum_{i,j} xp[n, p*s+i, q*s+j, c]``, ``xp`` = x zero-padded.

    The padding counts as zeros in the average (PyTorch ``count_include_pad=True``).
    Arguments as in :func:`max_pool`. Cache: ``x`` (only its shape is used).
    """
    k_hw, s_hw, pads, out_hw = _pool_geometry("avg_pool", x, window, stride, padding)
    pieces = _slices(_pad(x, pads, 0), k_hw, s_hw, out_hw)
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return total * jnp.asarray(1.0 / (k_hw[0] * k_hw[1]), x.dtype), x


def avg_pool_backward(cache, dy, *, window=3, stride=2, padding=1):
    """``dx = crop(sum_k unslice_k(dy / (kh*kw)))``: every window position gets an equal share.

    ``unslice_k`` is the adjoint of the k-th strided window slice (``lax.pad`` with interior
    padding ``stride-1``); ``crop`` drops the padding.
    """
    x = cache
    k_hw, s_hw, pads, out_hw = _pool_geometry("avg_pool_backward", x, window, stride, padding)
    _check_pool_dy("avg_pool_backward", x, dy, out_hw)
    padded_hw = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads))
    share = dy * jnp.asarray(1.0 / (k_hw[0] * k_hw[1]), dy.dtype)
    dxp = None
    for n in range(k_hw[0] * k_hw[1]):
        i, j = divmod(n, k_hw[1])
        term = _unslice(share, i, j, s_hw, padded_hw)
        dxp = term if dxp is None else dxp + term
    return _crop(dxp, pads, x.shape[1:3])


# ----------------------------------------------------------------------------- flatten


def flatten(x):
    """``y = x.reshape(B, -1)`` (row-major: H, then W, then C). Cache: ``x`` (for its shape)."""
    if x.ndim < 1:
        raise ValueError(f"flatten: input must have a batch axis, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1), x


def flatten_backward(cache, dy):
    """``dx = dy.reshape(x.shape)``."""
    x = cache
    check_ndim("flatten_backward", "dy", dy, 2)
    if dy.shape[0] * dy.shape[1] != x.size or dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"flatten_backward: dy has shape {tuple(dy.shape)}, but the input had shape "
            f"{tuple(x.shape)}"
        )
    return dy.reshape(x.shape)
