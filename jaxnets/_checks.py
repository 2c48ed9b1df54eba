"""Trace-time input validation shared by every layer.

Shapes are static under ``jax.jit``, so these checks run once per compilation and cost
nothing at run time. Each raises a one-line ``ValueError`` that names the layer and the
shapes involved, instead of letting broadcasting produce a silently wrong answer.
"""


def check_ndim(layer, name, x, ndims):
    """Raise unless ``x.ndim`` is one of ``ndims`` (an int or a tuple of ints)."""
    ndims = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if x.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{layer}: {name} must be {want}, got shape {tuple(x.shape)}")


def check_dim(layer, name, x, axis, size, what):
    """Raise unless ``x.shape[axis] == size``; ``what`` says where ``size`` comes from."""
    if x.shape[axis] != size:
        raise ValueError(
            f"{layer}: {name} has {x.shape[axis]} {what} (shape {tuple(x.shape)}), "
            f"but the layer expects {size}"
        )


def check_choice(layer, name, value, choices):
    """Raise unless ``value`` is one of ``choices``; lists the valid ones."""
    if value not in choices:
        raise ValueError(
            f"{layer}: unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}"
        )
