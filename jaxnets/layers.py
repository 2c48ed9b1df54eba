"""Dense layers, activations, normalisation, dropout and losses, each with a hand-written backward.

Conventions (shared with :mod:`jaxnets.conv`):

* Every layer is a pair of pure functions, ``foo`` and ``foo_backward``.
* ``foo(...) -> (y, cache)``: the output and what the backward needs. Callers that only
  want the output write ``y, _ = foo(...)``; under ``jax.jit`` an unused cache costs nothing.
* Layers with parameters take a params dict first: ``linear(params, x)`` and
  ``linear_backward(params, cache, dy) -> (dparams, dx)`` where ``dparams`` has exactly
  the structure of ``params``. Parameter-free layers: ``relu_backward(cache, dy) -> dx``.
  Static settings (slopes, rates, strides) are keyword arguments of both functions.
* Batch-first arrays; images are NHWC. No ``jax.grad``/``jax.vjp`` inside a backward: the
  math in each docstring is what the code computes.
* Bad shapes or names raise ``ValueError`` at trace time (see :mod:`jaxnets._checks`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np

from jaxnets import _init_fast
from jaxnets._checks import check_choice, check_dim, check_ndim

# ----------------------------------------------------------------------------- linear


INIT_SCHEMES = ("kaiming", "lecun", "pytorch", "course")


def init_weights(key, shape, fan_in, *, scheme="kaiming", bias=True, dtype=jnp.float32, layer="init_weights"):
    """``{"w": shape, "b": (shape[-1],)}`` for a layer whose units each see ``fan_in`` inputs.

    Schemes: ``"kaiming"`` w ~ N(0, 2/fan_in) (He et al., for ReLU-like units);
    ``"lecun"`` w ~ N(0, 1/fan_in) (used for the first layer, whose input is not a ReLU
    output); ``"pytorch"`` w, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (``torch.nn``'s
    Linear/Conv2d default); ``"course"`` w ~ N(0, 1e-4^2), the old course default. Biases
    are zero except for ``"pytorch"``. ``bias=False`` leaves out ``"b"``: for a layer
    followed by batch norm, whose mean subtraction cancels any bias (its gradient is
    exactly zero, and an optimizer like Adam would only amplify the rounding noise in it).
    """
    check_choice(layer, "init scheme", scheme, INIT_SCHEMES)
    uniform = scheme == "pytorch"
    if uniform:
        scale = 1.0 / math.sqrt(fan_in)
    else:
        scale = {"kaiming": math.sqrt(2.0 / fan_in), "lecun": math.sqrt(1.0 / fan_in), "course": 1e-4}[scheme]
    if _init_fast.deferring():  # inside a model's init: all its layers in one draw, same numbers
        return _init_fast.defer(key, tuple(shape), uniform, scale, bias, dtype)
    return _draw_weights(key, tuple(shape), uniform, scale, bias, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _draw_weights(key, shape, uniform, scale, bias, dtype):
    """With ``wkey, bkey = split(key)``: ``w = scale * normal(wkey, shape)`` and ``b = 0``,
    or (``uniform``) ``w ~ U(-scale, scale)`` from ``wkey`` and ``b`` likewise from ``bkey``
    (``jax.random.normal``/``uniform``'s numbers, see :func:`jaxnets._init_fast.normal`)."""
    # Jitted: XLA folds scale * sqrt(2) (inside jax.random.normal) into one constant, which
    # a model's one-draw init (jaxnets._init_fast) reproduces bit for bit.
    wkey, bkey = jax.random.split(key)
    if uniform:
        w = _init_fast.uniform(wkey, shape, dtype, -scale, scale)
        b = _init_fast.uniform(bkey, shape[-1:], dtype, -scale, scale)
    else:
        w = scale * _init_fast.normal(wkey, shape, dtype)
        b = jnp.zeros(shape[-1:], dtype)
    return {"w": w, "b": b} if bias else {"w": w}


def linear_init(key, fan_in, fan_out, *, scheme="kaiming", bias=True, dtype=jnp.float32):
    """Parameters ``{"w": (fan_in, fan_out), "b": (fan_out,)}``; see :func:`init_weights`."""
    return init_weights(key, (fan_in, fan_out), fan_in, scheme=scheme, bias=bias, dtype=dtype, layer="linear_init")


def linear(params, x):
    """y = x W + b for x of shape (B, fan_in) (no b when params has no ``"b"``). Cache: x."""
    check_ndim("linear", "input", x, 2)
    check_dim("linear", "input", x, 1, params["w"].shape[0], "features")
    y = x @ params["w"]
    return (y + params["b"] if "b" in params else y), x


def linear_backward(params, cache, dy):
    """dW = x^T dy,  db = sum_batch dy,  dx = dy W^T."""
    x = cache
    grads = {"w": x.T @ dy}
    if "b" in params:
        grads["b"] = dy.sum(axis=0)
    return grads, dy @ params["w"].T


# ------------------------------------------------------------------------ activations
# Each activation caches what its derivative is cheapest to compute from: the input x
# for piecewise/exponential units, the output y for tanh and sigmoid.


def relu(x):
    """y = max(x, 0). Cache: x."""
    return jnp.maximum(x, 0), x


def relu_backward(cache, dy):
    """dx = dy * [x > 0]."""
    return jnp.where(cache > 0, dy, 0)


def leaky_relu(x, *, negative_slope=0.01):
    """y = x if x > 0 else negative_slope * x. Cache: x."""
    return jnp.where(x > 0, x, negative_slope * x), x


def leaky_relu_backward(cache, dy, *, negative_slope=0.01):
    """dx = dy if x > 0 else negative_slope * dy."""
    return jnp.where(cache > 0, dy, negative_slope * dy)


def elu(x, *, alpha=1.0):
    """y = x if x > 0 else alpha * (exp(x) - 1). Cache: x."""
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0))), x


def elu_backward(cache, dy, *, alpha=1.0):
    """dx = dy if x > 0 else dy * alpha * exp(x)."""
    x = cache
    return jnp.where(x > 0, dy, dy * alpha * jnp.exp(jnp.minimum(x, 0)))


SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805


def selu(x):
    """y = scale * (x if x > 0 else alpha * (exp(x) - 1)), Klambauer et al.'s constants."""
    y, _ = elu(x, alpha=SELU_ALPHA)
    return SELU_SCALE * y, x


def selu_backward(cache, dy):
    """dx = scale * dy * (1 if x > 0 else alpha * exp(x))."""
    return SELU_SCALE * elu_backward(cache, dy, alpha=SELU_ALPHA)


def tanh(x):
    """y = tanh(x). Cache: y."""
    y = jnp.tanh(x)
    return y, y


def tanh_backward(cache, dy):
    """dx = dy * (1 - y^2)."""
    return dy * (1 - cache * cache)


def sigmoid(x):
    """y = 1 / (1 + exp(-x)). Cache: y."""
    y = jax.nn.sigmoid(x)
    return y, y


def sigmoid_backward(cache, dy):
    """dx = dy * y * (1 - y)."""
    return dy * cache * (1 - cache)


def relu6(x):
    """y = min(max(x, 0), 6) (MobileNet's and EfficientNet-Lite's unit). Cache: x."""
    return jnp.clip(x, 0, 6), x


def relu6_backward(cache, dy):
    """dx = dy * [0 < x < 6] (zero on both flat parts; at the kinks, as PyTorch's ReLU6)."""
    return jnp.where((cache > 0) & (cache < 6), dy, 0)


ACTIVATIONS = {
    "relu": (relu, relu_backward),
    "relu6": (relu6, relu6_backward),
    "leaky_relu": (leaky_relu, leaky_relu_backward),
    "elu": (elu, elu_backward),
    "selu": (selu, selu_backward),
    "tanh": (tanh, tanh_backward),
    "sigmoid": (sigmoid, sigmoid_backward),
}


def activation(name):
    """The ``(forward, backward)`` pair of the activation called ``name`` (default settings)."""
    check_choice("activation", "activation", name, tuple(ACTIVATIONS))
    return ACTIVATIONS[name]


# --------------------------------------------------------------------- softmax, losses


def softmax(x):
    """y_i = exp(x_i - max x) / sum_j exp(x_j - max x) over the last axis. Cache: y."""
    y = jax.nn.softmax(x, axis=-1)
    return y, y


def softmax_backward(cache, dy):
    """dx = y * (dy - sum_j dy_j y_j)."""
    y = cache
    return y * (dy - jnp.sum(dy * y, axis=-1, keepdims=True))


def log_softmax(x):
    """y = x - logsumexp(x) over the last axis. Cache: softmax(x)."""
    y = jax.nn.log_softmax(x, axis=-1)
    return y, jnp.exp(y)


def log_softmax_backward(cache, dy):
    """dx = dy - softmax(x) * sum_j dy_j."""
    return dy - cache * jnp.sum(dy, axis=-1, keepdims=True)


def _targets(layer, logits, labels, label_smoothing):
    """Dense (B, C) target distributions from integer labels or soft/one-hot targets."""
    check_ndim(layer, "logits", logits, 2)
    batch, classes = logits.shape
    if jnp.issubdtype(labels.dtype, jnp.integer):
        check_ndim(layer, "integer labels", labels, 1)
        check_dim(layer, "integer labels", labels, 0, batch, "entries (batch size)")
        if not isinstance(labels, jax.core.Tracer):  # concrete labels: check their values
            values = np.asarray(labels)
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= classes:
                raise ValueError(
                    f"{layer}: labels must lie in [0, {classes}), got values in [{low}, {high}]"
                )
        targets = jax.nn.one_hot(labels, classes, dtype=logits.dtype)
    else:
        if labels.shape != logits.shape:
            raise ValueError(
                f"{layer}: soft targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        targets = labels.astype(logits.dtype)
    if isinstance(label_smoothing, jax.core.Tracer) or label_smoothing:  # traced: a swept value
        targets = (1 - label_smoothing) * targets + label_smoothing / classes
    return targets


def cross_entropy(probs, labels, *, label_smoothing=0.0):
    """Mean over the batch of -sum_c t_c log p_c, on probabilities ``probs`` (B, C): the
    course's CrossEntropyModule, meant to follow :func:`softmax` as its own layer.

    Targets as in :func:`softmax_cross_entropy`. Cache: (p, targets). Not the trainer's
    loss: ``log p`` of a softmax that underflowed to 0 is -inf (a logit 104 below the
    largest, in float32), and the two backward passes in sequence divide by p and then
    multiply by it again; the fused :func:`softmax_cross_entropy` on logits computes
    log-softmax directly (finite for any logits) and its backward is ``p - t`` in one step.
    """
    targets = _targets("cross_entropy", probs, labels, label_smoothing)
    return -jnp.sum(targets * jnp.log(probs)) / probs.shape[0], (probs, targets)


def cross_entropy_backward(cache, dloss=1.0):
    """dp = -dloss * t / (B p). Composed with :func:`softmax_backward` it gives
    softmax_cross_entropy_backward's (p - t) / B, since sum_c t_c = 1."""
    probs, targets = cache
    return -dloss * targets / (probs * probs.shape[0])


def softmax_cross_entropy(logits, labels, *, label_smoothing=0.0):
    """Mean over the batch of -sum_c t_c log softmax(logits)_c: the softmax and the
    cross-entropy fused, the loss every model trains with (see :func:`cross_entropy` for
    why it is the default rather than the two separate layers).

    ``labels`` are integer class indices (B,) or target distributions (B, C) (one-hot or
    soft). With ``label_smoothing`` e, targets become (1 - e) t + e / C. Computed from
    log-softmax, so it stays finite for logits of any magnitude. Cache: (softmax, targets).
    """
    targets = _targets("softmax_cross_entropy", logits, labels, label_smoothing)
    logp = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.sum(targets * logp) / logits.shape[0]
    return loss, (jnp.exp(logp), targets)


def softmax_cross_entropy_backward(cache, dloss=1.0):
    """dlogits = dloss * (softmax(logits) - t) / B."""
    probs, targets = cache
    return dloss * (probs - targets) / probs.shape[0]


def l2_penalty(params, *, strength):
    """0.5 * strength * sum of w^2 over every leaf named ``"w"`` (weights, not biases/BN).

    Cache: params.
    """
    value = sum(jnp.sum(w * w) for _, w in _weight_leaves(params))
    return 0.5 * strength * value, params


def l2_penalty_backward(cache, dvalue=1.0, *, strength):
    """d/dw = dvalue * strength * w for weights; zero for every other leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: dvalue * strength * leaf if _is_weight(path) else jnp.zeros_like(leaf),
        cache,
    )


def _is_weight(path):
    last = path[-1] if path else None
    return isinstance(last, jax.tree_util.DictKey) and last.key == "w"


def _weight_leaves(params):
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(path, leaf) for path, leaf in flat if _is_weight(path)]


# -------------------------------------------------------------------------- dropout


def dropout(x, *, rate, key=None, train=True, axis_name=None):
    """Inverted dropout: y = x * m / (1 - rate), m ~ Bernoulli(1 - rate) drawn from ``key``.

    Exactly the identity when ``train`` is False or ``rate`` is 0. Cache: the scaled mask
    m / (1 - rate), or None for the identity.

    ``rate`` may be a traced scalar (a hyperparameter vmapped over a sweep): it is then
    taken to be in [0, 1) and a mask is always drawn (rate 0 keeps every unit, scale 1).

    ``axis_name`` (inside ``shard_map``, data parallel): ``x`` is this device's contiguous
    slice of a batch split evenly over that mesh axis, and every device has the same
    ``key``. The mask is then the whole batch's mask at the slice's rows, the same as a
    single device draws for the whole batch.
    """
    if not isinstance(rate, jax.core.Tracer):
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")
        if float(rate) == 0.0:
            return x, None
    if not train:
        return x, None
    if key is None:
        raise ValueError("dropout: training with rate > 0 needs a PRNG key (key=...)")
    offset = None
    if axis_name is not None:  # elements before this slice in the whole batch (mod 2^32, like the index)
        offset = jax.lax.axis_index(axis_name).astype(jnp.uint32) * jnp.uint32(math.prod(x.shape) % 2**32)
    keep = _keep_mask(key, x.shape, 1.0 - rate, offset)
    scale = jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(x.dtype)
    return x * scale, scale


def dropout_backward(cache, dy):
    """dx = dy * m / (1 - rate) (the identity in eval)."""
    return dy if cache is None else dy * cache


def _mix32(h):
    # The "lowbias32" integer finaliser (C. Wellons): full avalanche in 5 vector ops.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _keep_mask(key, shape, keep_prob, offset=None):
    """Bernoulli(keep_prob) mask: each position's index hashed, keyed by two words from ``key``.

    ``offset`` (uint32) is added to every index: the mask of a slice of a larger array at
    flat position ``offset`` equals that part of the larger array's mask.

    Measured on XLA:CPU (2 cores), a 128x2048 mask takes ~5.6 ms with
    ``jax.random.bernoulli`` (threefry) and ~0.3 ms this way; dropout's threefry calls were
    the largest part of an MLP train step. The two keyed rounds keep masks of different
    keys from being shifted copies of one another.
    """
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    if offset is not None:
        index = index + offset
    h = _mix32(_mix32(index + seeds[0]) ^ seeds[1])
    # Threshold on [0, 2^32); the largest float32 below 2^32 avoids an overflowing cast.
    threshold = jnp.minimum(jnp.asarray(keep_prob, jnp.float32) * 4294967296.0, 4294967040.0)
    return (h < threshold.astype(jnp.uint32)) | (keep_prob >= 1.0)


# -------------------------------------------------------------------- normalisation


def batch_norm_init(num_features, dtype=jnp.float32):
    """``params = {"gamma": 1, "beta": 0}`` and ``state = {"mean": 0, "var": 1}``, each (F,)."""
    params = {"gamma": jnp.ones((num_features,), dtype), "beta": jnp.zeros((num_features,), dtype)}
    state = {"mean": jnp.zeros((num_features,), dtype), "var": jnp.ones((num_features,), dtype)}
    return params, state


def batch_norm(params, state, x, *, train, momentum=0.1, eps=1e-5, axis_name=None):
    """Batch normalisation over every axis but the last (features/channels).

    Training: mu, var = batch mean and biased variance; xhat = (x - mu) / sqrt(var + eps);
    y = gamma * xhat + beta. The running statistics follow PyTorch:
    mean <- (1 - momentum) mean + momentum mu, var <- (1 - momentum) var + momentum
    var * n / (n - 1) (unbiased), n = elements per feature. Evaluation uses the running
    statistics and leaves them unchanged. ``axis_name`` (inside ``shard_map``/``pmap``)
    averages the statistics across devices (synchronised BN).

    Training needs n > 1 (for a conv, batch * H * W > 1 over all devices): with one value
    per feature, xhat = 0 and y = beta whatever x is, so it raises ``ValueError`` (as
    PyTorch does).

    Returns ``(y, cache, new_state)``; cache = (xhat, 1 / sqrt(var + eps)).
    """
    check_ndim("batch_norm", "input", x, (2, 4))
    check_dim("batch_norm", "input", x, -1, params["gamma"].shape[0], "features")
    axes = tuple(range(x.ndim - 1))
    if train:
        # Two passes (mean, then mean squared deviation): E[x^2] - E[x]^2 cancels badly
        # in float32 when |mean| >> std.
        count = x.size // x.shape[-1]
        if axis_name is not None:
            count = count * jax.lax.psum(1, axis_name)
        if count <= 1:
            raise ValueError(
                f"batch_norm: expected more than 1 value per channel when training, got input shape "
                f"{tuple(x.shape)} ({count} value per channel); use a larger batch or train=False"
            )
        mean = jnp.mean(x, axis=axes)
        if axis_name is not None:
            mean = jax.lax.pmean(mean, axis_name)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        if axis_name is not None:
            var = jax.lax.pmean(var, axis_name)
        unbiased = var * (count / (count - 1))
        new_state = {
            "mean": (1 - momentum) * state["mean"] + momentum * jax.lax.stop_gradient(mean),
            "var": (1 - momentum) * state["var"] + momentum * jax.lax.stop_gradient(unbiased),
        }
    else:
        mean, var, new_state = state["mean"], state["var"], state
    inv_std = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * inv_std
    return params["gamma"] * xhat + params["beta"], (xhat, inv_std), new_state


def batch_norm_backward(params, cache, dy, *, train, axis_name=None):
    """Gradients of batch norm; sums run over every axis but the last, n elements each.

    dgamma = sum(dy * xhat),  dbeta = sum(dy);
    training: dx = gamma * inv_std / n * (n dy - dbeta - xhat * dgamma)
    (the usual inv_std / n * (n g - sum(g) - xhat * sum(g xhat)) with g = gamma dy, whose two
    sums are gamma dbeta and gamma dgamma);
    evaluation (constant statistics): dx = gamma * inv_std * dy.
    With ``axis_name`` the two sums inside dx are taken over all devices too.
    """
    xhat, inv_std = cache
    axes = tuple(range(dy.ndim - 1))
    # Two reductions, not four: XLA:CPU re-reads dy and xhat once per reduction.
    dgamma = jnp.sum(dy * xhat, axis=axes)
    dbeta = jnp.sum(dy, axis=axes)
    if not train:
        return {"gamma": dgamma, "beta": dbeta}, dy * (params["gamma"] * inv_std)
    sum_dy, sum_dyx = dbeta, dgamma
    count = dy.size // dy.shape[-1]
    if axis_name is not None:
        sum_dy, sum_dyx = jax.lax.psum((sum_dy, sum_dyx), axis_name)
        count = count * jax.lax.psum(1, axis_name)
    dx = (params["gamma"] * inv_std / count) * (count * dy - sum_dy - xhat * sum_dyx)
    return {"gamma": dgamma, "beta": dbeta}, dx


def layer_norm_init(num_features, dtype=jnp.float32):
    """``{"gamma": 1, "beta": 0}``, each (F,)."""
    return {"gamma": jnp.ones((num_features,), dtype), "beta": jnp.zeros((num_features,), dtype)}


def layer_norm(params, x, *, eps=1e-5):
    """Per-sample normalisation over the last axis (F features), no running statistics.

    mu, var = mean and biased variance of each row; xhat = (x - mu) / sqrt(var + eps);
    y = gamma * xhat + beta. Cache: (xhat, 1 / sqrt(var + eps)).
    """
    check_dim("layer_norm", "input", x, -1, params["gamma"].shape[0], "features")
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(var + eps)
    xhat = (x - mean) * inv_std
    return params["gamma"] * xhat + params["beta"], (xhat, inv_std)


def layer_norm_backward(params, cache, dy):
    """With g = dy * gamma and sums over the F features of each row:
    dx = inv_std / F * (F g - sum(g) - xhat * sum(g * xhat));
    dgamma = sum over rows of dy * xhat, dbeta = sum over rows of dy.
    """
    xhat, inv_std = cache
    rows = tuple(range(dy.ndim - 1))
    g = dy * params["gamma"]
    features = dy.shape[-1]
    dx = inv_std / features * (
        features * g
        - jnp.sum(g, axis=-1, keepdims=True)
        - xhat * jnp.sum(g * xhat, axis=-1, keepdims=True)
    )
    return {"gamma": jnp.sum(dy * xhat, axis=rows), "beta": jnp.sum(dy, axis=rows)}, dx


# ----------------------------------------------------------- layers for airbench (issue 24)


def gelu(x):
    """y = x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2 the standard normal CDF
    (Hendrycks & Gimpel, 2016; the exact form, not the tanh approximation). Cache: x."""
    return x * 0.5 * (1 + jax.scipy.special.erf(x / math.sqrt(2))), x


def gelu_backward(cache, dy):
    """dx = dy * (Phi(x) + x * phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi) the normal density."""
    x = cache
    cdf = 0.5 * (1 + jax.scipy.special.erf(x / math.sqrt(2)))
    pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return dy * (cdf + x * pdf)


ACTIVATIONS["gelu"] = (gelu, gelu_backward)


def batch_norm_shift_init(num_features, dtype=jnp.float32):
    """``params = {"beta": 0}`` (the scale is frozen at 1) and ``state = {"mean": 0, "var": 1}``."""
    params, state = batch_norm_init(num_features, dtype)
    return {"beta": params["beta"]}, state


def batch_norm_shift(params, state, x, *, train, momentum=0.1, eps=1e-5, axis_name=None):
    """Batch norm with its scale frozen at 1: y = xhat + beta (:func:`batch_norm` with
    gamma = 1; airbench's ``weight=False``). Same statistics, running averages and cache."""
    full = {"gamma": jnp.ones_like(params["beta"]), "beta": params["beta"]}
    return batch_norm(full, state, x, train=train, momentum=momentum, eps=eps, axis_name=axis_name)


def batch_norm_shift_backward(params, cache, dy, *, train, axis_name=None):
    """:func:`batch_norm_backward` with gamma = 1: dbeta = sum(dy); training
    dx = inv_std / n * (n dy - sum(dy) - xhat * sum(dy xhat)); evaluation dx = inv_std * dy."""
    full = {"gamma": jnp.ones_like(params["beta"]), "beta": params["beta"]}
    grads, dx = batch_norm_backward(full, cache, dy, train=train, axis_name=axis_name)
    return {"beta": grads["beta"]}, dx


def scaled_linear(params, x, *, scale):
    """y = scale * (x W), no bias (airbench's head: a bias-free linear layer times 1/9). Cache: x."""
    check_ndim("scaled_linear", "input", x, 2)
    check_dim("scaled_linear", "input", x, 1, params["w"].shape[0], "features")
    return scale * (x @ params["w"]), x


def scaled_linear_backward(params, cache, dy, *, scale):
    """dW = scale * x^T dy,  dx = scale * dy W^T."""
    x = cache
    return {"w": scale * (x.T @ dy)}, scale * (dy @ params["w"].T)
