"""Convolution, pooling and flatten layers, each with a hand-written backward.

Conventions are those of :mod:`jaxnets.layers`: ``foo(...) -> (y, cache)`` and
``foo_backward(...)``; images are NHWC, convolution kernels HWIO ``(kh, kw, cin, cout)``;
static settings (stride, padding, window, ``impl``) are keyword arguments of both
functions; bad shapes raise ``ValueError`` at trace time.

Implementations of the convolution: the ``impl`` keyword
---------------------------------------------------------
``conv2d``/``conv2d_backward`` and ``max_pool``/``max_pool_backward`` take a static
``impl``: ``"auto"`` (the default), ``"winograd"``, ``"winograd4"``, ``"gemm"`` or ``"xla"``. It is an
argument, never a global setting, and :func:`resolve_impl` is the one place where
``"auto"`` looks at the backend: ``"winograd"`` on CPU, ``"xla"`` on GPU/TPU.

* ``"gemm"``: im2col + one matrix product. The patches are built from ``kh*kw`` strided
  slices of the padded input concatenated on the channel axis, giving a
  ``(B*Ho*Wo, kh*kw*cin)`` matrix that is multiplied by the kernel reshaped to
  ``(kh*kw*cin, cout)``. The backward is two more GEMMs plus ``col2im`` (the adjoint of the
  strided slices: ``lax.pad`` with interior padding, summed). 1x1 convolutions are a plain
  GEMM. Kernel positions whose windows lie wholly in the padding (a 3x3 pad-1 kernel on a
  1x1 image: all but the centre) are left out of the patches (:func:`live_taps`). XLA:CPU runs ``lax.conv_general_dilated`` through a slow generic kernel, so this
  is several times faster there, both with the hand-written backward and under
  ``jax.grad`` (autodiff of slices/concat/dot is again slices/pads/dots).
* ``"winograd"``: ``"gemm"``, except that the 3x3, stride-1, pad-1 convolutions of a VGG
  (even H and W >= 4, cin >= 16) run Winograd's F(2x2, 3x3), 2.25x fewer multiplications
  (:mod:`jaxnets._cpu_conv`; rounding differs from the direct sum by a few ulps).
* ``"winograd4"`` (opt-in): ``"winograd"``, except that images of at least 7x7 (any
  parity: tiles are zero-padded) run F(4x4, 3x3), 4x fewer multiplications; in a
  same-process A/B of each shape (``python -m benchmarks.winograd_ab``) it is 1.3x faster
  than F(2x2) from 8x8 to 64x64 and slower at 4x4 and 6x6, hence the split. Its rounding
  error is ~1e-6 of the output's scale (F(2x2): ~1e-7; its points +-2 weigh a tile up to
  8x); in float32 the course ConvNet's manual and autodiff gradients then differ by up to
  ~6e-3 relative at batch 4 (BN amplifies it), which is why it is not the default.
* ``"xla"``: ``lax.conv_general_dilated`` and, for the backward, the two convolutions
  that are its transposes. This is what cuDNN / the TPU compiler are good at.

Which of these computed a forward is recorded in its cache (:class:`ConvCache`,
:class:`MaxPoolCache`), and a backward given an ``impl`` that would compute it otherwise
raises ``ValueError`` instead of mixing the two: pass a backward the ``impl`` of its forward.

Pooling
-------
Both pools are written as a reduction over the ``window*window`` strided slices of the
padded input (dense ops only, no ``reduce_window``/scatter). Measured on a 2-core CPU,
3x3/2/1 max pool of (128, 32, 32, 64): forward ~24 ms slices vs ~18 ms ``reduce_window``,
but ``jax.grad`` ~54 ms slices vs ~250 ms ``reduce_window`` (``select_and_scatter``), so
the slices formulation wins for training.
``max_pool`` pads with ``-inf`` and propagates NaN (a window holding a NaN gives NaN, as
in PyTorch and ``lax.reduce_window``). The gradient of each output goes to the *first*
maximal position of its window in scan order (row-major over the window), a NaN counting
as maximal; the forward is a chain of ``where(m >= s or m is NaN, m, s)`` so that
``jax.grad`` of the forward routes ties and NaNs the same way as :func:`max_pool_backward`.
Under the CPU implementations the course's 3x3/2/1 pool of an even-sized image is
*phased* (:mod:`jaxnets._cpu_conv`): unit-stride window slices, and the first maximal
positions stored by the forward for the backward (same numbers).
``avg_pool`` pads with zeros and always divides by ``window*window`` (PyTorch's
``count_include_pad=True``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnets import _cpu_conv
from jaxnets._checks import check_choice, check_dim, check_ndim
from jaxnets.layers import init_weights

CONV_IMPLS = ("auto", "winograd", "winograd4", "gemm", "xla")


def resolve_impl(impl, *, layer="resolve_impl"):
    """The implementation ``impl`` names on this backend: ``"winograd"``, ``"winograd4"``, ``"gemm"`` or ``"xla"``.

    ``"auto"`` is ``"winograd"`` when ``jax.default_backend() == "cpu"`` and ``"xla"``
    otherwise; the others name themselves. Read at trace time, like every static argument.
    """
    check_choice(layer, "conv implementation (impl)", impl, CONV_IMPLS)
    if impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv_method(layer, impl, w_shape, x_shape, s_hw, pads):
    """What computes this convolution: ``"winograd4"`` (F(4x4, 3x3), only for ``impl="winograd4"``)
    or ``"winograd"`` (F(2x2, 3x3)) where one applies, else ``"gemm"``, for the CPU
    implementations; ``"xla"`` for ``"xla"``."""
    impl = resolve_impl(impl, layer=layer)
    if impl == "winograd4" and _cpu_conv.winograd4_applies(w_shape, x_shape, s_hw, pads):
        return "winograd4"
    if impl in ("winograd", "winograd4"):
        return "winograd" if _cpu_conv.winograd_applies(w_shape, x_shape, s_hw, pads) else "gemm"
    return impl


def _pool_form(layer, impl, x_shape, k_hw, s_hw, pads):
    """What a max pool's cache keeps for the backward: ``"first_max"`` (the first maximal
    window positions, the phased CPU pool) or ``"output"`` (``y``, the strided pool)."""
    if resolve_impl(impl, layer=layer) != "xla" and _cpu_conv.phased_pool_applies(x_shape, k_hw, s_hw, pads):
        return "first_max"
    return "output"


def _static_fields(*names):
    """Register a frozen dataclass as a pytree whose fields ``names`` are static metadata
    (they pass through ``jax.jit`` as part of the structure, not as arrays)."""

    def register(cls):
        fields = [f.name for f in dataclasses.fields(cls)]
        return jax.tree_util.register_dataclass(
            cls, data_fields=[f for f in fields if f not in names], meta_fields=list(names))

    return register


@_static_fields("method")
@dataclasses.dataclass(frozen=True)
class ConvCache:
    """What :func:`conv2d_backward` needs: the input ``x``, and the ``method`` that computed
    the forward (``"winograd"``, ``"gemm"`` or ``"xla"``)."""

    x: jax.Array
    method: str


@_static_fields("form")
@dataclasses.dataclass(frozen=True)
class MaxPoolCache:
    """What :func:`max_pool_backward` needs: the input ``x`` and ``kept``, which ``form`` says:
    ``"output"``: the pool's output ``y``; ``"first_max"``: for every output, the index
    (int8, row-major in the window) of the first maximal window position."""

    x: jax.Array
    kept: jax.Array
    form: str


def _check_cache(layer, cache, cls, producer):
    if not isinstance(cache, cls):
        raise ValueError(
            f"{layer}: cache must be the {cls.__name__} that {producer} returned, got {type(cache).__name__}"
        )


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


def _slices(xp, k_hw, s_hw, out_hw, taps=None):
    """The ``kh*kw`` strided windows of ``xp`` (B, Hp, Wp, C), each (B, Ho, Wo, C), row-major;
    only those of the kernel positions ``taps`` ((i, j) pairs) when given."""
    (kh, kw), (sh, sw), (ho, wo) = k_hw, s_hw, out_hw
    b, _, _, c = xp.shape
    taps = [(i, j) for i in range(kh) for j in range(kw)] if taps is None else taps
    return [
        lax.slice(
            xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1)
        )
        for i, j in taps
    ]


def live_taps(k_hw, s_hw, pads, in_hw, out_hw):
    """The kernel positions (i, j), row-major, whose window reads the image for some output.

    Kernel row ``i`` reads padded rows ``p*s + i``, i.e. image rows ``p*s + i - top`` for
    ``p < Ho``; when none of them lies in ``[0, H)`` that row multiplies only padding zeros.
    This happens when the image is smaller than the kernel's reach: a 3x3 pad-1 conv of a 1x1
    image reads only through its centre, a 3x3/2 pad-1 conv of a 2x2 image only through its
    bottom-right 2x2 (ResNet-18's layer4 on 32x32 inputs with the ImageNet stem). The im2col
    GEMM skips the other positions: same sum, fewer products.
    """
    def rows(k, s, lo, n, out):
        return [i for i in range(k) if any(0 <= p * s + i - lo < n for p in range(out))]

    live_i = rows(k_hw[0], s_hw[0], pads[0][0], in_hw[0], out_hw[0])
    live_j = rows(k_hw[1], s_hw[1], pads[1][0], in_hw[1], out_hw[1])
    return [(i, j) for i in live_i for j in live_j]


def _tap_rows(w, taps):
    """The rows of the (kh*kw*cin, cout) GEMM kernel that the positions ``taps`` multiply."""
    kh, kw, cin, cout = w.shape
    if len(taps) == kh * kw:
        return w.reshape(-1, cout)
    return jnp.concatenate([w[i, j] for i, j in taps], axis=0)


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


def _patches(x, k_hw, s_hw, pads, out_hw, taps=None):
    """im2col: (B, Ho, Wo, kh*kw*cin), channel fastest, then kw, then kh (matches HWIO);
    only the kernel positions ``taps`` when given ((B, Ho, Wo, len(taps)*cin))."""
    xp = _pad(x, pads, 0)
    if k_hw == (1, 1) and s_hw == (1, 1):
        return xp
    pieces = _slices(xp, k_hw, s_hw, out_hw, taps)
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def _xla_dims():
    return lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def conv2d(params, x, *, stride=1, padding="SAME", impl="auto"):
    """y = conv(x, W) + b: ``y[n,p,q,o] = b[o] + sum_{i,j,c} xp[n, p*s+i, q*s+j, c] W[i,j,c,o]``.

    ``x`` is NHWC, ``W`` HWIO, ``xp`` is ``x`` zero-padded by ``padding`` ("SAME" as in
    lax/TensorFlow: output size ceil(n/stride); "VALID"; an int; or
    ``((top, bottom), (left, right))``). ``stride``: an int or a pair. ``impl``: see the
    module docstring (``"auto"``: Winograd F(2x2,3x3) or im2col + GEMM on CPU, native conv
    elsewhere). Cache: :class:`ConvCache` (``x`` and the method that ran).
    """
    k_hw, s_hw, pads, out_hw = _conv_geometry("conv2d", params, x, stride, padding)
    w = params["w"]
    method = conv_method("conv2d", impl, w.shape, x.shape, s_hw, pads)
    if method == "winograd4":
        y = _cpu_conv.winograd4_conv(x, w)
    elif method == "winograd":
        y = _cpu_conv.winograd_conv(x, w)
    elif method == "gemm":
        taps = live_taps(k_hw, s_hw, pads, x.shape[1:3], out_hw)
        y = jnp.dot(_patches(x, k_hw, s_hw, pads, out_hw, taps), _tap_rows(w, taps))
    else:
        y = lax.conv_general_dilated(x, w, s_hw, pads, dimension_numbers=_xla_dims())
    return (y + params["b"] if "b" in params else y), ConvCache(x, method)


def conv2d_backward(params, cache, dy, *, stride=1, padding="SAME", impl="auto"):
    """Gradients of :func:`conv2d` (same ``stride``/``padding``/``impl``). Returns ``(dparams, dx)``.

    With ``X = im2col(xp)`` of shape (B*Ho*Wo, kh*kw*cin) and ``W`` reshaped to
    (kh*kw*cin, cout), ``dy`` reshaped to (B*Ho*Wo, cout):

    * ``db = sum_{n,p,q} dy``
    * ``dW = X^T dy``
    * ``dx = crop(col2im(dy W^T))`` where ``col2im`` is the adjoint of im2col: every column
      block (i, j) is zero-filled back to its strided window of ``xp`` (``lax.pad`` with
      interior padding ``stride-1``) and the ``kh*kw`` results are summed. The kernel
      positions im2col leaves out (:func:`live_taps`: they read only padding) get ``dW = 0``.

    ``"winograd"``/``"winograd4"`` (where they apply, see the module docstring): with
    ``V = B^T d B`` the transformed input tiles, ``U = G g G^T`` the transformed kernel and
    ``M = V U`` (the 16 or 36 tile positions (a, b) each a GEMM over channels) so that
    ``y = A^T M A``, the backward is the adjoint of each linear stage: ``dM = A dy A^T``,
    ``dU = V^T dM``, ``dW = G^T dU G``, ``dV = dM U^T``, ``dx`` = ``B dV B^T`` overlap-added
    (:func:`jaxnets._cpu_conv.winograd_conv_backward`, ``winograd4_conv_backward``).

    The ``"xla"`` implementation computes the same two quantities as convolutions:
    ``dW[i,j,c,o] = sum_{n,p,q} xp[n,p*s+i,q*s+j,c] dy[n,p,q,o]`` (x correlated with ``dy``
    dilated by ``s``, batch as the contracted feature axis) and
    ``dx = conv(dilate_s(dy), flip(W)^T)`` with padding ``(k-1-lo, k-1-hi+extra)``,
    ``extra`` = input rows the forward windows never reached (a transposed convolution).
    """
    _check_cache("conv2d_backward", cache, ConvCache, "conv2d")
    x = cache.x
    k_hw, s_hw, pads, out_hw = _conv_geometry("conv2d_backward", params, x, stride, padding)
    w = params["w"]
    method = conv_method("conv2d_backward", impl, w.shape, x.shape, s_hw, pads)
    if method != cache.method:
        raise ValueError(
            f"conv2d_backward: impl={impl!r} computes this convolution by {method!r}, but the forward "
            f"ran {cache.method!r}; give conv2d_backward the impl that conv2d had"
        )
    cout = w.shape[3]
    check_ndim("conv2d_backward", "dy", dy, 4)
    if dy.shape != (x.shape[0], *out_hw, cout):
        raise ValueError(
            f"conv2d_backward: dy has shape {tuple(dy.shape)}, but the layer's output has "
            f"shape {(x.shape[0], *out_hw, cout)}"
        )
    in_hw = x.shape[1:3]
    padded_hw = tuple(n + lo + hi for n, (lo, hi) in zip(in_hw, pads))
    if method == "winograd4":
        dw, dx = _cpu_conv.winograd4_conv_backward(x, w, dy)
    elif method == "winograd":
        dw, dx = _cpu_conv.winograd_conv_backward(x, w, dy)
    elif method == "gemm":
        taps = live_taps(k_hw, s_hw, pads, in_hw, out_hw)
        cols = _patches(x, k_hw, s_hw, pads, out_hw, taps)
        kdim, cin = cols.shape[-1], w.shape[2]
        dy2 = dy.reshape(-1, cout)
        dw_rows = jnp.dot(cols.reshape(-1, kdim).T, dy2).reshape(len(taps), cin, cout)
        if len(taps) == k_hw[0] * k_hw[1]:
            dw = dw_rows.reshape(w.shape)
        else:  # the positions that read only padding get a zero gradient
            zero, at = jnp.zeros((cin, cout), dw_rows.dtype), {tap: n for n, tap in enumerate(taps)}
            dw = jnp.stack([dw_rows[at[(i, j)]] if (i, j) in at else zero
                            for i in range(k_hw[0]) for j in range(k_hw[1])]).reshape(w.shape)
        dcols = jnp.dot(dy, _tap_rows(w, taps).T)  # (B, Ho, Wo, len(taps)*cin)
        if k_hw == (1, 1) and s_hw == (1, 1):
            dxp = dcols
        else:
            dxp = None
            for n, (i, j) in enumerate(taps):
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


def _is_max(piece, y):
    """Where window slice ``piece`` attains its output ``y``: ``piece == y``, or ``piece`` is
    NaN (a NaN is the maximum of its window)."""
    return (piece == y) | jnp.isnan(piece)


def max_pool(x, *, window=3, stride=2, padding=1, impl="auto"):
    """``y[n,p,q,c] = max_{i,j} xp[n, p*s+i, q*s+j, c]``, ``xp`` = x padded with -inf; NaN if
    the window holds a NaN (as PyTorch and ``lax.reduce_window``).

    ``window``/``stride``: int or pair; ``padding`` as in :func:`conv2d` (each side must be
    smaller than the window); ``impl`` as in :func:`conv2d` (the CPU ones take a phased
    3x3/2/1 pool, see the module docstring). Written as a chain
    ``m = where(m >= s_k or isnan(m), m, s_k)`` over the window slices ``s_k`` in row-major
    window order: ``m`` keeps the first maximum (or the first NaN), and ``jax.grad`` routes
    each output's gradient to that position, like :func:`max_pool_backward`.
    Cache: :class:`MaxPoolCache`.
    """
    k_hw, s_hw, pads, out_hw = _pool_geometry("max_pool", x, window, stride, padding)
    form = _pool_form("max_pool", impl, x.shape, k_hw, s_hw, pads)
    if form == "first_max":
        pieces = _cpu_conv.phased_windows(x)
    else:
        pieces = _slices(_pad(x, pads, -jnp.inf), k_hw, s_hw, out_hw)
    y = pieces[0]
    for piece in pieces[1:]:
        y = jnp.where((y >= piece) | jnp.isnan(y), y, piece)
    if form == "first_max":
        return y, MaxPoolCache(x, _cpu_conv.first_positions([_is_max(p, y) for p in pieces]), form)
    return y, MaxPoolCache(x, y, form)


def max_pool_backward(cache, dy, *, window=3, stride=2, padding=1, impl="auto"):
    """``dx = crop(sum_k unslice_k(dy * M_k))`` with ``M_k = [s_k is max] * prod_{l<k} [s_l is not max]``.

    ``s_k`` is the k-th strided window slice of the -inf-padded input (row-major window
    order) and "is max" means ``s_k == y`` or ``s_k`` is NaN, so ``M_k`` marks, for every
    output, only the *first* position attaining the max (the first NaN of a NaN window);
    ``unslice_k`` is the adjoint of that strided slice (``lax.pad`` with interior padding
    ``stride-1``) and ``crop`` drops the padding. Overlapping windows add up. A phased pool
    (cache form ``"first_max"``) routes by the positions its forward stored. ``impl`` must
    be the forward's (else ``ValueError``).
    """
    _check_cache("max_pool_backward", cache, MaxPoolCache, "max_pool")
    x = cache.x
    k_hw, s_hw, pads, out_hw = _pool_geometry("max_pool_backward", x, window, stride, padding)
    _check_pool_dy("max_pool_backward", x, dy, out_hw)
    form = _pool_form("max_pool_backward", impl, x.shape, k_hw, s_hw, pads)
    if form != cache.form:
        raise ValueError(
            f"max_pool_backward: the cache holds the {cache.form!r} form of the pool's result, but "
            f"impl={impl!r} takes the backward of the {form!r} form here; give max_pool_backward the "
            f"impl that max_pool had"
        )
    if form == "first_max":
        return _cpu_conv.phased_max_pool_backward(cache.kept, dy, x.shape)
    y = cache.kept
    xp = _pad(x, pads, -jnp.inf)
    padded_hw = xp.shape[1:3]
    pieces = _slices(xp, k_hw, s_hw, out_hw)
    zero = jnp.zeros((), dy.dtype)
    remaining = dy  # gradient not yet routed: dy until the first maximal position, then 0
    dxp = None
    for n, piece in enumerate(pieces):
        i, j = divmod(n, k_hw[1])
        hit = _is_max(piece, y)
        term = _unslice(jnp.where(hit, remaining, zero), i, j, s_hw, padded_hw)
        if n + 1 < len(pieces):
            remaining = jnp.where(hit, zero, remaining)
        dxp = term if dxp is None else dxp + term
    return _crop(dxp, pads, x.shape[1:3])


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


# ------------------------------------------------------------- depthwise convolution
# (for EfficientNet-Lite / MobileNet blocks)
#
# A depthwise convolution does kh*kw multiplies per output value, against a dense one's
# kh*kw*cin: it is memory-bound, and XLA:CPU's grouped convolution
# (feature_group_count=C) runs it through a slow generic loop. Written as a sum of kh*kw
# strided slices times a per-channel weight, XLA fuses the whole sum into one pass over
# the input, and the backward likewise (see benchmarks/depthwise.py for the figures).


def depthwise_conv2d_init(key, channels, kernel_size=3, *, scheme="kaiming", dtype=jnp.float32):
    """Parameters ``{"w": (kh, kw, C)}`` of a depthwise convolution (no bias: it is always
    followed by batch norm here). ``fan_in = kh*kw`` (each output sees one channel)."""
    kh, kw = _pair("depthwise_conv2d_init", "kernel_size", kernel_size)
    return init_weights(key, (kh, kw, channels), kh * kw, scheme=scheme, bias=False, dtype=dtype,
                        layer="depthwise_conv2d_init")


def _depthwise_geometry(layer, params, x, stride, padding):
    w = params["w"]
    check_ndim(layer, "kernel w", w, 3)
    check_ndim(layer, "input", x, 4)
    check_dim(layer, "input", x, 3, w.shape[2], "channels")
    k_hw, s_hw = w.shape[:2], _check_stride(layer, stride)
    in_hw = x.shape[1:3]
    pads = _resolve_padding(layer, padding, in_hw, k_hw, s_hw)
    out_hw = _out_size(layer, "kernel", in_hw, k_hw, s_hw, pads, x.shape)
    return k_hw, s_hw, pads, out_hw


def depthwise_conv2d(params, x, *, stride=1, padding="SAME"):
    """``y[n,p,q,c] = sum_{i,j} xp[n, p*s+i, q*s+j, c] W[i,j,c]`` (one filter per channel,
    PyTorch's ``groups=C`` convolution with its ``(C, 1, kh, kw)`` weight as ``W[i,j,c]``).

    ``xp`` is ``x`` zero-padded by ``padding``: "SAME" is TensorFlow's (output ceil(n/s),
    the odd pixel of padding at the bottom/right, e.g. (0, 1) for 3x3/2 on an even size),
    "VALID", an int or ``((top, bottom), (left, right))``. Computed as the sum of the
    ``kh*kw`` strided windows of ``xp``, each times its weight row. Cache: ``x``.
    """
    k_hw, s_hw, pads, out_hw = _depthwise_geometry("depthwise_conv2d", params, x, stride, padding)
    w = params["w"]
    y = None
    for n, piece in enumerate(_slices(_pad(x, pads, 0), k_hw, s_hw, out_hw)):
        term = piece * w[n // k_hw[1], n % k_hw[1]]
        y = term if y is None else y + term
    return y, x


#: The depthwise weight gradient runs over the batch in about this many chunks (see
#: :func:`_depthwise_weight_gradient`).
DEPTHWISE_DW_CHUNKS = 16


def depthwise_batch_chunk(batch):
    """Images per chunk of :func:`_depthwise_weight_gradient`: the largest divisor of
    ``batch`` that is at most ``batch // DEPTHWISE_DW_CHUNKS`` (at least 1)."""
    return max(g for g in range(1, max(1, batch // DEPTHWISE_DW_CHUNKS) + 1) if batch % g == 0)


def _depthwise_weight_gradient(x, dy, k_hw, s_hw, pads, out_hw):
    """``dW[i*kw+j, c] = sum_{n,p,q} xp[n, p*s+i, q*s+j, c] dy[n,p,q,c]``, (kh*kw, C).

    The ``kh*kw`` sums each read all of ``x`` and ``dy``, and XLA:CPU runs them as separate
    reductions, so over the whole batch every one streams both arrays from memory (the 5x5
    layers of EfficientNet-Lite0: 25 passes). A ``lax.scan`` over chunks of
    :func:`depthwise_batch_chunk` images accumulates the sums chunk by chunk, so the
    ``kh*kw`` reductions of a chunk read it from cache: 3-6x faster on Lite0's shapes at
    batch 32 (benchmarks/depthwise.py); about 16 chunks was best or near it on all of them.
    """
    b, c = x.shape[0], x.shape[3]
    g = depthwise_batch_chunk(b)

    def sums(xc, dyc):
        pieces = _slices(_pad(xc, pads, 0), k_hw, s_hw, out_hw)
        return jnp.stack([jnp.sum(piece * dyc, axis=(0, 1, 2)) for piece in pieces])

    if g == b:
        return sums(x, dy)
    chunks = (x.reshape(b // g, g, *x.shape[1:]), dy.reshape(b // g, g, *dy.shape[1:]))
    total, _ = lax.scan(lambda acc, xd: (acc + sums(*xd), None), jnp.zeros((k_hw[0] * k_hw[1], c), dy.dtype), chunks)
    return total


def depthwise_conv2d_backward(params, cache, dy, *, stride=1, padding="SAME"):
    """Gradients of :func:`depthwise_conv2d` (same ``stride``/``padding``); ``(dparams, dx)``.

    * ``dW[i,j,c] = sum_{n,p,q} xp[n, p*s+i, q*s+j, c] dy[n,p,q,c]`` (each window slice
      times ``dy``, summed over batch and space, chunk by chunk of the batch: see
      :func:`_depthwise_weight_gradient`);
    * ``dxp[n,a,b,c] = sum_{i,j} dy[n, (a-i)/s, (b-j)/s, c] W[i,j,c]`` over the (i, j)
      where ``(a-i)/s`` and ``(b-j)/s`` are whole output positions: a transposed
      convolution, computed as the stride-1 correlation of ``d`` (``dy`` with ``s-1`` zeros
      between its entries and ``k-1`` around them) with the flipped kernel,
      ``dxp[a,b] = sum_{i,j} d[a+k-1-i, b+k-1-j] W[i,j]``; ``dx = crop(dxp)``.
    """
    x = cache
    k_hw, s_hw, pads, out_hw = _depthwise_geometry("depthwise_conv2d_backward", params, x, stride, padding)
    w = params["w"]
    check_ndim("depthwise_conv2d_backward", "dy", dy, 4)
    if dy.shape != (x.shape[0], *out_hw, x.shape[3]):
        raise ValueError(f"depthwise_conv2d_backward: dy has shape {tuple(dy.shape)}, but the layer's output "
                         f"has shape {(x.shape[0], *out_hw, x.shape[3])}")
    (kh, kw), in_hw = k_hw, x.shape[1:3]
    padded_hw = tuple(n + lo + hi for n, (lo, hi) in zip(in_hw, pads))
    dw = _depthwise_weight_gradient(x, dy, k_hw, s_hw, pads, out_hw).reshape(w.shape)
    # Rows/cols of xp beyond the last window get no gradient: pad d's far side by that many more.
    extra = [hp - (o - 1) * s - k for hp, o, s, k in zip(padded_hw, out_hw, s_hw, k_hw)]
    cfg = ((0, 0, 0), (kh - 1, kh - 1 + extra[0], s_hw[0] - 1), (kw - 1, kw - 1 + extra[1], s_hw[1] - 1), (0, 0, 0))
    d = lax.pad(dy, jnp.zeros((), dy.dtype), cfg)
    dxp = None
    for i in range(kh):
        for j in range(kw):
            piece = lax.slice_in_dim(lax.slice_in_dim(d, kh - 1 - i, kh - 1 - i + padded_hw[0], axis=1),
                                     kw - 1 - j, kw - 1 - j + padded_hw[1], axis=2)
            term = piece * w[i, j]
            dxp = term if dxp is None else dxp + term
    return {"w": dw}, _crop(dxp, pads, in_hw)


# ------------------------------------------------------------- global average pool


def global_avg_pool(x):
    """``y[n,c] = (1/(H W)) sum_{h,w} x[n,h,w,c]``: (B, H, W, C) -> (B, C). Cache: ``x`` (its shape)."""
    check_ndim("global_avg_pool", "input", x, 4)
    return jnp.mean(x, axis=(1, 2)), x


def global_avg_pool_backward(cache, dy):
    """``dx[n,h,w,c] = dy[n,c] / (H W)`` (every position an equal share)."""
    x = cache
    if dy.shape != (x.shape[0], x.shape[3]):
        raise ValueError(f"global_avg_pool_backward: dy has shape {tuple(dy.shape)}, but the layer's output "
                         f"has shape {(x.shape[0], x.shape[3])}")
    scale = jnp.asarray(1.0 / (x.shape[1] * x.shape[2]), dy.dtype)
    return jnp.broadcast_to((dy * scale)[:, None, None, :], x.shape)


# ----------------------------------------------------------------- bilinear resize


def resize_matrix(n_in, n_out):
    """The (n_out, n_in) matrix ``A`` of 1-D linear interpolation with half-pixel centres
    (``jax.image.resize(..., "bilinear")`` and PyTorch's ``align_corners=False`` when
    upsampling): output ``o`` reads the input at ``(o + 0.5) n_in / n_out - 0.5``, clamped to
    the edge, from its two neighbours. Built in numpy (a constant of the trace)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    a = np.zeros((n_out, n_in))
    np.add.at(a, (np.arange(n_out), lo), 1 - frac)
    np.add.at(a, (np.arange(n_out), hi), frac)
    return a


def resize_bilinear(x, *, size):
    """Bilinear resize of NHWC images to ``size`` (an int or (H', W')), separably:
    ``y[n,:,:,c] = A_h x[n,:,:,c] A_w^T`` with :func:`resize_matrix`'s ``A_h`` (H', H) and
    ``A_w`` (W', W). For upsampling (how CIFAR-10 reaches an ImageNet network), this equals
    ``jax.image.resize(x, ..., "bilinear")``. Cache: ``x`` (its shape)."""
    check_ndim("resize_bilinear", "input", x, 4)
    oh, ow = _pair("resize_bilinear", "size", size)
    ah = jnp.asarray(resize_matrix(x.shape[1], oh), x.dtype)
    aw = jnp.asarray(resize_matrix(x.shape[2], ow), x.dtype)
    return jnp.einsum("ph,nhwc,qw->npqc", ah, x, aw), x


def resize_bilinear_backward(cache, dy, *, size):
    """The adjoint of a linear map: ``dx[n,:,:,c] = A_h^T dy[n,:,:,c] A_w``."""
    x = cache
    oh, ow = _pair("resize_bilinear_backward", "size", size)
    if dy.shape != (x.shape[0], oh, ow, x.shape[3]):
        raise ValueError(f"resize_bilinear_backward: dy has shape {tuple(dy.shape)}, but the layer's output "
                         f"has shape {(x.shape[0], oh, ow, x.shape[3])}")
    ah = jnp.asarray(resize_matrix(x.shape[1], oh), dy.dtype)
    aw = jnp.asarray(resize_matrix(x.shape[2], ow), dy.dtype)
    return jnp.einsum("ph,npqc,qw->nhwc", ah, dy, aw)

# ------------------------------------------------- data-dependent init for airbench (issue 24)


def whitening_filters(images, *, patch=2, eps=5e-4):
    """Frozen patch-whitening kernels (HWIO, ``(patch, patch, C, 2 * patch * patch * C)``) from
    training images (N, H, W, C), as airbench's first layer (Jordan 2024, arXiv 2404.00498).

    With p the flattened ``patch x patch x C`` windows (stride 1, no padding, order (kh, kw, C))
    and S = mean(p p^T) their *uncentred* covariance, S = V diag(lambda) V^T: filter k is
    v_k / sqrt(lambda_k + eps), largest lambda first, followed by the same filters negated (so
    a ReLU-like activation after it loses nothing). Computed in float64 with numpy: it is a
    one-off init, and small eigenvalues need the precision. Pass training images only.
    """
    import numpy as np  # local: this module is otherwise numpy-free (and another branch edits its header)

    x = np.asarray(images, np.float64)
    if x.ndim != 4:
        raise ValueError(f"whitening_filters: expected training images (N, H, W, C), got shape {x.shape}")
    n, h, w, c = x.shape
    if h < patch or w < patch or n < 1:
        raise ValueError(f"whitening_filters: images of shape {x.shape[1:]} are smaller than the {patch}x{patch} patch")
    cols = [x[:, i:h - patch + 1 + i, j:w - patch + 1 + j, :] for i in range(patch) for j in range(patch)]
    p = np.concatenate(cols, axis=-1).reshape(-1, patch * patch * c)
    cov = p.T @ p / p.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigenvalues)[::-1]
    filters = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    filters = np.concatenate([filters, -filters], axis=1)
    return filters.reshape(patch, patch, c, 2 * patch * patch * c)


def dirac_(w):
    """Dirac (identity) init of an HWIO kernel on its first ``cin`` output filters, as
    ``torch.nn.init.dirac_(w[:cin])``: filter i < min(cin, cout) becomes the identity on
    input channel i (1 at the kernel's centre, 0 elsewhere); the other filters are kept."""
    kh, kw, cin, cout = w.shape
    k = min(cin, cout)
    eye = jnp.zeros((kh, kw, cin, k), w.dtype).at[kh // 2, kw // 2, jnp.arange(k), jnp.arange(k)].set(1)
    return w.at[..., :k].set(eye)
