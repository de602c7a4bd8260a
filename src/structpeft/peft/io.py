"""Validation of saved adapter folders, before PEFT touches the model.

``validate_adapter_folder`` checks ``adapter_model.safetensors`` (PEFT's weights file): it must parse as
safetensors (a truncated or non-safetensors file is refused), hold this method's parameters (a file of another
method, e.g. LoRA's, is refused), cover every layer recorded in the config's ``layer_options``, and be finite.
Only safetensors is read; pickle-based ``adapter_model.bin`` files are refused.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import AdapterFileError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file; :class:`AdapterFileError` naming the file if it is truncated or not safetensors."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types (and OSError / ValueError)
        size = os.path.getsize(path)
        raise AdapterFileError(
            f"{path} ({size} bytes) is not a complete safetensors file ({type(err).__name__}: {err}); "
            "expected the adapter_model.safetensors written by save_pretrained"
        ) from None


def validate_adapter_folder(folder: str, config: Any) -> None:
    """Check the folder's weights file against ``config`` (see the module docstring); a folder holding only a
    config (``PeftConfig.save_pretrained``) passes."""
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(weights):
        if os.path.exists(os.path.join(folder, PICKLE_NAME)):
            raise AdapterFileError(f"{folder} holds only {PICKLE_NAME} (pickle); structpeft loads {WEIGHTS_NAME} only")
        return
    tensors = read_safetensors(weights)
    marker = "." + config.param_prefix
    ours = {k: v for k, v in tensors.items() if marker in k}
    if not ours:
        sample = ", ".join(sorted(tensors)[:3]) or "(no tensors)"
        raise AdapterFileError(
            f"{weights} holds no {config.param_prefix}* parameters (keys: {sample}); it was not written for "
            f"a {config.peft_type} adapter"
        )
    container = f"{config.param_prefix}op."
    seen: set[str] = set()
    for layer, params in config.expected_tensors().items():
        prefix = f"base_model.model.{layer}.{container}"
        for name, (shape, required) in params.items():
            key = prefix + name
            if key not in ours:
                if required:
                    raise AdapterFileError(
                        f"{weights} lacks {key!r} (shape {list(shape)}) that adapter_config.json implies for layer "
                        f"{layer!r}; the file was not saved with this config"
                    )
                continue
            if tuple(ours[key].shape) != shape:
                raise AdapterFileError(
                    f"{weights}: {key!r} has shape {list(ours[key].shape)} but adapter_config.json implies "
                    f"{list(shape)} (structure / size options differ); the file was not saved with this config"
                )
            recorded = config.layer_options[layer]["options"].get(name) if name.endswith("_idx") else None
            if recorded is not None and ours[key].tolist() != recorded:
                raise AdapterFileError(
                    f"{weights}: {key!r} holds other indices than adapter_config.json records for layer {layer!r}; "
                    "the file was not saved with this config"
                )
            seen.add(key)
    unexpected = sorted(set(ours) - seen)
    if unexpected:
        raise AdapterFileError(
            f"{weights} holds {len(unexpected)} {config.param_prefix}* tensor(s) that adapter_config.json does not "
            f"describe (first: {unexpected[0]!r}); the file was not saved with this config"
        )
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{weights}: tensor {key!r} contains NaN or inf values")
