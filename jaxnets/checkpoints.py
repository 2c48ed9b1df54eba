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
        text = _first_line(e)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"checkpoint {path}: holds pickled Python objects, not a state dict (a whole "
                                  f"model saved with torch.save(model)? save model.state_dict() instead)") from None
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
            torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, str(tmp))
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
