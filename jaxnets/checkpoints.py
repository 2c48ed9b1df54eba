"""Reading and writing other libraries' checkpoints: PyTorch ``.pth`` state dicts and
``.safetensors`` files, as flat ``{name: numpy array}`` tables.

A family's converter (a table of names, e.g. torchvision's ``layer2.0.conv1.weight`` ->
jaxnets' ``layer2.0.conv1.w``) works on these tables; this module only reads and writes
them, and refuses, in one line naming the file, what is not a state dict.

* ``.safetensors`` is read with ``safetensors.numpy`` (no PyTorch needed).
* ``.pth``/``.pt``/``.bin`` is read with ``torch.load(..., weights_only=True)``: only
  tensors and plain containers are unpickled, never code, so a file holding a whole
  pickled ``nn.Module`` is refused (save its ``state_dict()`` instead). PyTorch is an
  optional extra; without it the error says which one to install.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
TORCH_EXTRA = "pip install 'jaxnets[torch]'"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it must be (the message names the file)."""


def read_state_dict(path) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` or PyTorch state-dict file, by name, as numpy arrays
    (``num_batches_tracked`` counters included, as stored)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise CheckpointError(f"checkpoint {path}: expected a .safetensors or PyTorch state dict "
                          f"({', '.join(TORCH_SUFFIXES)}) file")


def _read_safetensors(path):
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise CheckpointError(f"checkpoint {path}: reading .safetensors needs the safetensors package "
                              f"(pip install safetensors)") from None
    try:
        return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
        raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({_first_line(e)})") from None


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"checkpoint {path}: reading a PyTorch file needs PyTorch ({TORCH_EXTRA}), "
                              f"or give the same tensors as a .safetensors file") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        global_name = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if global_name:  # weights_only refused to unpickle a class: a pickled object, not tensors
            raise CheckpointError(f"checkpoint {path}: holds pickled Python objects ({global_name.group(1)}), not a "
                                  f"state dict (a whole model saved with torch.save(model)? save "
                                  f"model.state_dict() instead)") from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
        text = detail.group(1).strip() if detail else _first_line(e)
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch file ({text})") from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(f"checkpoint {path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    out = {}
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[str(name)] = value.detach().cpu().numpy()
    return out


def write_state_dict(tensors: Mapping[str, np.ndarray], path) -> Path:
    """Write ``tensors`` to ``path`` (``.safetensors``, or a PyTorch ``.pth`` where torch is
    installed), through a temporary file renamed into place: an existing file is replaced
    only by a complete one."""
    path = Path(path)
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp))
        elif path.suffix in TORCH_SUFFIXES:
            try:
                import torch
            except ImportError:
                raise CheckpointError(f"checkpoint {path}: writing a PyTorch file needs PyTorch ({TORCH_EXTRA}); "
                                      f"write a .safetensors file instead") from None
            torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, str(tmp))
        else:
            raise CheckpointError(f"checkpoint {path}: the name must end in .safetensors or .pth")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ------------------------------------------------------- torch-named compositions
#
# A composition named like its PyTorch twin (ResNet's conv1, layer2.0.downsample.0, fc) maps
# leaf by leaf: the jaxnets path plus a suffix rule. The layouts differ only in convolution
# kernels (OIHW -> HWIO) and linear weights ((out, in) -> (in, out)).

#: jaxnets leaf name -> PyTorch tensor name, for params and for batch-norm state.
TORCH_PARAM_NAMES = {"w": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}
TORCH_STATE_NAMES = {"mean": "running_mean", "var": "running_var"}
#: PyTorch buffers with no jaxnets counterpart (BN's step counter): accepted when present,
#: written as 0 on export so that ``load_state_dict(strict=True)`` finds them.
TORCH_IGNORED = ("num_batches_tracked",)


def _dotted(path):
    import jax

    return jax.tree_util.keystr(path, simple=True, separator=".")


def _to_torch_layout(leaf_name, value):
    value = np.asarray(value)
    if leaf_name == "w" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf_name == "w" and value.ndim == 2:
        return value.T  # (in, out) -> (out, in)
    return value


def _from_torch_layout(leaf_name, value):
    if leaf_name == "w" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf_name == "w" and value.ndim == 2:
        return value.T
    return value


def _torch_names(tree, names):
    """``{torch name: (jaxnets path, leaf name)}`` for every leaf of a params or state tree."""
    import jax

    out = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dotted = _dotted(path)
        prefix, _, leaf = dotted.rpartition(".")
        out[f"{prefix}.{names[leaf]}" if prefix else names[leaf]] = (dotted, leaf)
    return out


def to_torch_state_dict(params, state) -> dict[str, np.ndarray]:
    """A composition's params and batch-norm state as PyTorch names and layouts (with a
    ``num_batches_tracked`` of 0 beside every batch norm's running statistics)."""
    out = {}
    for tree, names in ((params, TORCH_PARAM_NAMES), (state, TORCH_STATE_NAMES)):
        for torch_name, (dotted, leaf) in _torch_names(tree, names).items():
            out[torch_name] = np.ascontiguousarray(_to_torch_layout(leaf, _lookup(tree, dotted)))
            if leaf == "mean":
                out[torch_name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _lookup(tree, dotted):
    node = tree
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def from_torch_state_dict(model, tensors, *, source="checkpoint", head="fc", key=None, log=None):
    """``(params, state)`` of ``model`` (a :class:`jaxnets.network.Network` named like its
    PyTorch twin) from a PyTorch-named state dict ``tensors`` (:func:`read_state_dict`).

    Every tensor must be there with the shape the model expects; BN running statistics are
    taken as stored; ``num_batches_tracked`` is optional. When only the ``head`` (the final
    linear layer, ``fc``) differs in its class count, it is initialised fresh from ``key``
    (the model's own init) and ``log`` is told. Anything else (an unknown, missing or
    wrong-shaped tensor) is a :class:`CheckpointError` naming the first such tensor with
    both shapes (in PyTorch's layout), from ``source`` (the file).
    """
    import jax
    import jax.numpy as jnp

    shapes_params, shapes_state = jax.eval_shape(model.init, jax.random.key(0))
    want = {}
    for tree, names, kind in ((shapes_params, TORCH_PARAM_NAMES, "params"), (shapes_state, TORCH_STATE_NAMES, "state")):
        for torch_name, (dotted, leaf) in _torch_names(tree, names).items():
            shape = _to_torch_layout(leaf, np.empty(_lookup(tree, dotted).shape, np.uint8)).shape
            want[torch_name] = (kind, dotted, leaf, shape)
    what = type(model).__name__
    for name in tensors:
        if name not in want and name.rsplit(".", 1)[-1] not in TORCH_IGNORED:
            raise CheckpointError(f"{source}: tensor {name!r} {tuple(np.shape(tensors[name]))} is not part of "
                                  f"{what} (another architecture?)")
    missing = [n for n in want if n not in tensors]
    if missing:
        n = missing[0]
        raise CheckpointError(f"{source}: tensor {n!r} {want[n][3]} is missing ({len(missing)} missing in all)")
    replace_head = False
    for name, (kind, dotted, leaf, shape) in want.items():
        got = tuple(np.shape(tensors[name]))
        if got != tuple(shape):
            if dotted.split(".")[0] == head and got[:1] != shape[:1]:
                replace_head = True
                continue
            raise CheckpointError(f"{source}: tensor {name!r} has shape {got}, {what} expects {tuple(shape)}")
    fresh = model.init(jax.random.key(0) if key is None else key) if replace_head else None
    trees = {"params": jax.tree_util.tree_map(lambda s: s, shapes_params),
             "state": jax.tree_util.tree_map(lambda s: s, shapes_state)}
    values = {}
    for name, (kind, dotted, leaf, shape) in want.items():
        if replace_head and dotted.split(".")[0] == head:
            values[(kind, dotted)] = _lookup(fresh[0 if kind == "params" else 1], dotted)
        else:
            dtype = _lookup(trees[kind], dotted).dtype
            values[(kind, dotted)] = jnp.asarray(_from_torch_layout(leaf, np.asarray(tensors[name])), dtype)
    if replace_head and log is not None:
        log(f"{source}: the head {head!r} has {np.shape(tensors[head + '.weight'])[0]} classes, the model "
            f"{model.classes}: replaced by a fresh init")
    out = []
    for kind in ("params", "state"):
        leaves = jax.tree_util.tree_flatten_with_path(trees[kind])
        out.append(jax.tree_util.tree_unflatten(leaves[1], [values[(kind, _dotted(p))] for p, _ in leaves[0]]))
    return tuple(out)

