"""CPU kernels behind :mod:`jaxnets.conv`: Winograd F(2x2, 3x3) and F(4x4, 3x3), and the phased max pool.

Nothing here is part of the course material: these are faster ways, on XLA:CPU, to compute
what the plain formulas in :mod:`jaxnets.conv` define. :func:`jaxnets.conv.conv_method`
and :func:`jaxnets.conv._pool_form` (the one place that chooses) send a layer here only
for the CPU implementations (``impl="winograd"``/``"gemm"``, or ``"auto"`` on a CPU
backend) and only for the geometries in :func:`winograd4_applies` / :func:`winograd_applies` /
:func:`phased_pool_applies`.

Both kernels see a pad-1 image of even height and width as the array
(B, H/2+1, 2, W/2+1, 2, C) (:func:`phase_view`): padded row 2t+r is [t, r], so the
overlapping windows of a 3x3 kernel or pool with 2x2 output tiles / stride 2 are
unit-stride slices (:func:`tile_halves`) instead of strided ones.

* Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2015): each 2x2 output tile from
  a 4x4 input tile with 16 products instead of 36, so the three GEMMs of a training step do
  2.25x fewer FLOPs; the tile transforms are additions. Measured on a 2-core CPU at batch
  128 it halves the time of forward and backward from 16x16x64 to 4x4x512; with 3 input
  channels or a 2x2 image (one tile) it is slower than im2col, hence the limits. Rounding
  differs from the direct sum by a few float32 ulps of the output's scale.
* The phased 3x3/2/1 max pool: the 9 windows as unit-stride slices of the phased view, and
  the first maximal position of each output stored by the forward (:func:`stored`) for the
  backward. Same numbers as the strided pool, bit for bit; in the course ConvNet's manual
  step 8-15% faster (same-process A/B).
"""

import jax.numpy as jnp
from jax import lax

# ------------------------------------------------------------------------ phased view


def phase_view(x, value):
    """``x`` (B, H, W, C), even H and W, padded by 1 with ``value`` and seen as
    (B, H/2+1, 2, W/2+1, 2, C): padded row 2t+r is [t, r]."""
    b, h, w, c = x.shape
    cfg = ((0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0))
    return lax.pad(x, jnp.asarray(value, x.dtype), cfg).reshape(b, h // 2 + 1, 2, w // 2 + 1, 2, c)


def unphase_view(z, x_shape):
    """Adjoint of :func:`phase_view`: the (B, H/2+1, 2, W/2+1, 2, C) array as the padded
    image, its border cropped."""
    b, h, w, c = x_shape
    return z.reshape(b, h + 2, w + 2, c)[:, 1 : 1 + h, 1 : 1 + w, :]


def tile_halves(z, axis):
    """The four tile rows along ``axis`` of a (.., n+1, 2, ..) phased array: [t,0], [t,1], [t+1,0], [t+1,1]."""
    n = z.shape[axis] - 1
    take = lambda lo, phase: lax.index_in_dim(lax.slice_in_dim(z, lo, lo + n, axis=axis), phase, axis + 1, False)
    return take(0, 0), take(0, 1), take(1, 0), take(1, 1)


def untile_halves(d0, d1, d2, d3, axis):
    """Adjoint of :func:`tile_halves`: overlap-add the four tile rows back to (.., n+1, 2, ..).
    ``d3=None`` stands for zeros (a max pool's windows use only the first three)."""
    cfg = lambda lo, hi: [(0, 0, 0)] * axis + [(lo, hi, 0)] + [(0, 0, 0)] * (d0.ndim - axis - 1)
    zero = jnp.zeros((), d0.dtype)
    phase0 = lax.pad(d0, zero, cfg(0, 1)) + lax.pad(d2, zero, cfg(1, 0))
    phase1 = lax.pad(d1, zero, cfg(0, 1))
    if d3 is not None:
        phase1 = phase1 + lax.pad(d3, zero, cfg(1, 0))
    return jnp.stack([phase0, phase1], axis + 1)


# --------------------------------------------------------------------------- winograd
# F(2x2, 3x3): for a 4x4 input tile d and a 3x3 kernel g, the 2x2 output tile is
# Y = A^T [(G g G^T) * (B^T d B)] A with the matrices below (points 0, 1, -1, inf). Tile t
# of a pad-1 image covers padded rows 2t..2t+3, i.e. the phased rows [t, 0], [t, 1],
# [t+1, 0], [t+1, 1], so the transforms are fused elementwise ops on unit-stride slices.

WINOGRAD_MIN_CHANNELS = 16
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_applies(w_shape, x_shape, s_hw, pads):
    """3x3, stride 1, pad 1, even H and W >= 4, at least :data:`WINOGRAD_MIN_CHANNELS` inputs."""
    h, w = x_shape[1:3]
    return (tuple(w_shape[:2]) == (3, 3) and s_hw == (1, 1) and pads == ((1, 1), (1, 1))
            and h % 2 == 0 and w % 2 == 0 and min(h, w) >= 4 and w_shape[2] >= WINOGRAD_MIN_CHANNELS)


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


def _winograd_input(x):
    """``V = B^T d B`` of every tile: 16 matrices (B*H/2*W/2, C), entry (a, b) at 4a+b."""
    rows = _bt(*tile_halves(phase_view(x, 0), 1))  # each (b, h/2, w/2+1, 2, c)
    return [v.reshape(-1, x.shape[3]) for r in rows for v in _bt(*tile_halves(r, 2))]


def _winograd_input_backward(dv, x_shape):
    """Adjoint of :func:`_winograd_input`: ``dd = B dV B^T`` per tile, overlap-added, cropped."""
    b, h, w, c = x_shape
    dv = [v.reshape(b, h // 2, w // 2, c) for v in dv]
    drows = [untile_halves(*_b(*dv[4 * a : 4 * a + 4]), axis=2) for a in range(4)]
    return unphase_view(untile_halves(*_b(*drows), axis=1), x_shape)


def filter_transform(w, g_rows):
    """``U = G g G^T`` of a (3, 3, cin, cout) kernel for the (n, 3) matrix ``G`` given by its
    rows: n*n matrices (cin, cout), entry (a, b) at n*a+b (n = 4 for F(2x2), 6 for F(4x4))."""
    g = jnp.asarray(g_rows, w.dtype)
    u = jnp.einsum("ai,bj,ij...->ab...", g, g, w)
    return [u[a, b] for a in range(len(g_rows)) for b in range(len(g_rows))]


def filter_transform_backward(du, g_rows):
    """Adjoint of :func:`filter_transform`: ``dg = G^T dU G``."""
    n = len(g_rows)
    g = jnp.asarray(g_rows, du[0].dtype)
    return jnp.einsum("ai,bj,ab...->ij...", g, g, jnp.stack(du).reshape(n, n, *du[0].shape))


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


def winograd_conv(x, w):
    """The pad-1, stride-1 3x3 convolution of ``x`` with ``w`` (no bias), by F(2x2, 3x3)."""
    # 16 separate GEMMs rather than one batched dot_general: XLA:CPU runs them faster and
    # no stacked (16, tiles, C) copy is made.
    v, u = _winograd_input(x), filter_transform(w, _G)
    return _winograd_output([jnp.dot(vi, ui) for vi, ui in zip(v, u)], x.shape)


def winograd_conv_backward(x, w, dy):
    """``(dw, dx)`` of :func:`winograd_conv`, the adjoint of each linear stage: ``dM = A dy A^T``;
    ``dU = V^T dM`` and ``dW = G^T dU G``; ``dV = dM U^T`` and ``dx`` = the tiles
    ``B dV B^T`` overlap-added back into the padded image, cropped."""
    v, u = _winograd_input(x), filter_transform(w, _G)
    dm = _winograd_output_backward(dy)
    dw = filter_transform_backward([jnp.dot(vi.T, dmi) for vi, dmi in zip(v, dm)], _G)
    dx = _winograd_input_backward([jnp.dot(dmi, ui.T) for dmi, ui in zip(dm, u)], x.shape)
    return dw, dx


# ------------------------------------------------------------------ phased max pool


def phased_pool_applies(x_shape, k_hw, s_hw, pads):
    """The 3x3, stride-2, pad-1 pool of an image of even height and width.

    The strided backward recomputes the max and the select chains inside XLA:CPU's fusion
    for each of the 9 (interior-padded) window terms; the phased one routes by the stored
    positions instead.
    """
    h, w = x_shape[1:3]
    return k_hw == (3, 3) and s_hw == (2, 2) and pads == ((1, 1), (1, 1)) and h % 2 == 0 and w % 2 == 0


def phased_windows(x):
    """The 9 windows of the -inf-padded (B, H, W, C) image, row-major, each (B, H/2, W/2, C):
    window rows of output p are padded rows 2p, 2p+1, 2p+2, i.e. the first three of
    :func:`tile_halves` of :func:`phase_view`."""
    return [col for row in tile_halves(phase_view(x, -jnp.inf), 1)[:3] for col in tile_halves(row, 2)[:3]]


def first_positions(hits):
    """The first ``k`` with ``hits[k]`` true, as int8 (``len(hits)`` where none is), stored
    for the backward (see :func:`stored`)."""
    first = jnp.full(hits[0].shape, len(hits), jnp.int8)
    for n in reversed(range(len(hits))):
        first = jnp.where(hits[n], jnp.int8(n), first)
    return stored(first)


def phased_max_pool_backward(first, dy, x_shape):
    """``dx``: each output's ``dy`` to window position ``first``, the 9 windows overlap-added
    back (the adjoint of :func:`phased_windows`), cropped."""
    zero = jnp.zeros((), dy.dtype)
    dwindows = [jnp.where(first == k, dy, zero) for k in range(9)]
    drows = [untile_halves(*dwindows[3 * i : 3 * i + 3], None, axis=2) for i in range(3)]
    return unphase_view(untile_halves(*drows, None, axis=1), x_shape)


def stored(a):
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


# ------------------------------------------------------------- winograd F(4x4, 3x3)
# For a 6x6 input tile d and a 3x3 kernel g, the 4x4 output tile is
# Y = A^T [(G g G^T) * (B^T d B)] A with Lavin & Gray's matrices (points 0, 1, -1, 2, -2,
# inf); 36 products per 16 outputs instead of 144 (4x fewer). H and W need not be
# multiples of 4: the image is zero-padded to whole tiles and the output cropped. As for
# F(2x2), the pad-1 image is seen phased, (B, th+1, 4, tw+1, 4, C), so that the six rows of
# every tile are unit-stride slices and the transforms fuse; 36 separate GEMMs.
# Same-process A/B, forward + backward at batch 128 on 2 cores (benchmarks/winograd_ab.py):
# F(4x4) / F(2x2) / im2col 248 / 331 / 549 ms at 32x32x64->64, 119 / 156 / 292 at
# 8x8x256->256, 127 / - / 187 at 7x7x256->256, but 123 / 83 / 154 at 6x6 and 208 / 178 /
# 248 at 4x4 (one tile, mostly padding): hence the 7-pixel limit.
# Chosen only by conv2d's impl="winograd4" (opt-in: see jaxnets.conv for why).

WINOGRAD4_MIN_SIZE = 7


def winograd4_applies(w_shape, x_shape, s_hw, pads):
    """3x3, stride 1, pad 1, H and W >= :data:`WINOGRAD4_MIN_SIZE` (any parity), at least
    :data:`WINOGRAD_MIN_CHANNELS` inputs."""
    return (tuple(w_shape[:2]) == (3, 3) and s_hw == (1, 1) and pads == ((1, 1), (1, 1))
            and min(x_shape[1:3]) >= WINOGRAD4_MIN_SIZE and w_shape[2] >= WINOGRAD_MIN_CHANNELS)

_BT4 = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G4 = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
       (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT4 = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


def _tiles4(x_shape):
    """Tile counts (th, tw) of a (B, H, W, C) image: ceil(H/4), ceil(W/4)."""
    return -(-x_shape[1] // 4), -(-x_shape[2] // 4)


def _lincomb(rows, terms):
    """``[sum_i rows[a][i] * terms[i] for a]``, skipping zero coefficients (fused adds)."""
    out = []
    for row in rows:
        acc = None
        for c, t in zip(row, terms):
            if c == 0:
                continue
            term = t if c == 1 else (-t if c == -1 else t * jnp.asarray(c, t.dtype))
            acc = term if acc is None else acc + term
        out.append(acc if acc is not None else jnp.zeros_like(terms[0]))
    return out


def _transpose(rows):
    return tuple(zip(*rows))


def _phase_view4(x):
    """``x`` (B, H, W, C) padded by 1 on top/left and with zeros to 4(th+1) rows and 4(tw+1)
    columns, seen as (B, th+1, 4, tw+1, 4, C): padded row 4t+r is [t, r]."""
    b, h, w, c = x.shape
    th, tw = _tiles4(x.shape)
    cfg = ((0, 0, 0), (1, 4 * th + 3 - h, 0), (1, 4 * tw + 3 - w, 0), (0, 0, 0))
    return lax.pad(x, jnp.zeros((), x.dtype), cfg).reshape(b, th + 1, 4, tw + 1, 4, c)


def _tile6(z, axis):
    """The six tile rows along ``axis`` of a (.., n+1, 4, ..) phased array: tile t covers
    padded rows 4t..4t+5, i.e. [t, 0..3], [t+1, 0], [t+1, 1] (unit-stride slices)."""
    n = z.shape[axis] - 1
    take = lambda lo, phase: lax.index_in_dim(lax.slice_in_dim(z, lo, lo + n, axis=axis), phase, axis + 1, False)
    return [take(k // 4, k % 4) for k in range(6)]


def _untile6(d, axis):
    """Adjoint of :func:`_tile6`: overlap-add the six tile rows back to (.., n+1, 4, ..)."""
    cfg = lambda lo, hi: [(0, 0, 0)] * axis + [(lo, hi, 0)] + [(0, 0, 0)] * (d[0].ndim - axis - 1)
    zero = jnp.zeros((), d[0].dtype)
    phases = [lax.pad(d[p], zero, cfg(0, 1)) for p in range(4)]
    for p in range(2):
        phases[p] = phases[p] + lax.pad(d[4 + p], zero, cfg(1, 0))
    return jnp.stack(phases, axis + 1)


def _f4_input(x):
    """``V = B^T d B`` of every 6x6 tile of the pad-1 image (zero-padded to whole tiles):
    36 matrices (B*th*tw, C), entry (a, b) at 6a+b. The transforms are fused elementwise
    sums of unit-stride slices of :func:`_phase_view4`."""
    rows = _lincomb(_BT4, _tile6(_phase_view4(x), 1))  # each (B, th, tw+1, 4, C)
    return [v.reshape(-1, x.shape[3]) for r in rows for v in _lincomb(_BT4, _tile6(r, 2))]


def _f4_input_backward(dv, x_shape):
    """Adjoint of :func:`_f4_input`: ``dd = B dV B^T`` per tile, overlap-added, cropped."""
    b, h, w, c = x_shape
    th, tw = _tiles4(x_shape)
    dv = [v.reshape(b, th, tw, c) for v in dv]
    bt_adj = _transpose(_BT4)
    drows = [_untile6(_lincomb(bt_adj, dv[6 * a : 6 * a + 6]), axis=2) for a in range(6)]
    dz = _untile6(_lincomb(bt_adj, drows), axis=1)
    return dz.reshape(b, 4 * th + 4, 4 * tw + 4, c)[:, 1 : 1 + h, 1 : 1 + w, :]


def _f4_output(m, x_shape):
    """``Y = A^T M A`` of every tile, the 4x4 tiles interleaved and cropped to (B, H, W, cout)."""
    b, h, w, _ = x_shape
    th, tw = _tiles4(x_shape)
    m = [e.reshape(b, th, tw, -1) for e in m]
    cols = [_lincomb(_AT4, m[6 * a : 6 * a + 6]) for a in range(6)]  # cols[a][q]
    y = [_lincomb(_AT4, [cols[a][q] for a in range(6)]) for q in range(4)]  # y[q][p]
    y = jnp.stack([jnp.stack([y[q][p] for q in range(4)], 3) for p in range(4)], 2)
    return y.reshape(b, 4 * th, 4 * tw, -1)[:, :h, :w]


def _f4_output_backward(dy):
    """Adjoint of :func:`_f4_output`: ``dM = A dY A^T`` per tile (dy zero-padded to whole
    tiles), 36 matrices (B*th*tw, cout)."""
    b, h, w, o = dy.shape
    th, tw = _tiles4(dy.shape)
    dy = jnp.pad(dy, ((0, 0), (0, 4 * th - h), (0, 4 * tw - w), (0, 0))).reshape(b, th, 4, tw, 4, o)
    at_adj = _transpose(_AT4)
    t = [_lincomb(at_adj, [dy[:, :, p, :, q] for q in range(4)]) for p in range(4)]  # t[p][b]
    dm = [_lincomb(at_adj, [t[p][e] for p in range(4)]) for e in range(6)]  # dm[b][a]
    return [dm[e][a].reshape(-1, o) for a in range(6) for e in range(6)]


def winograd4_conv(x, w):
    """The pad-1, stride-1 3x3 convolution of ``x`` with ``w`` (no bias), by F(4x4, 3x3):
    36 GEMMs (tiles, cin) x (cin, cout), one per tile position."""
    v, u = _f4_input(x), filter_transform(w, _G4)
    return _f4_output([jnp.dot(vi, ui) for vi, ui in zip(v, u)], x.shape)


def winograd4_conv_backward(x, w, dy):
    """``(dw, dx)`` of :func:`winograd4_conv`, the adjoint of each linear stage: ``dM = A dy A^T``
    (dy zero-padded to whole tiles); ``dU = V^T dM`` per position and ``dW = G^T dU G``;
    ``dV = dM U^T`` and ``dx`` = the tiles ``B dV B^T`` overlap-added, cropped."""
    v, u = _f4_input(x), filter_transform(w, _G4)
    dm = _f4_output_backward(dy)
    dw = filter_transform_backward([jnp.dot(vi.T, dmi) for vi, dmi in zip(v, dm)], _G4)
    dx = _f4_input_backward([jnp.dot(dmi, ui.T) for dmi, ui in zip(dm, u)], x.shape)
    return dw, dx
