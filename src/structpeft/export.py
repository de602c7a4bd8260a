"""Export a structured adapter to a standard PEFT LoRA checkpoint (for LoRA-only serving stacks).

For every structured layer, ΔW_total (out × in', the sum of s·ΔW over the exported adapter, in the layer's own
(out, in') layout) is factorised by a truncated SVD, ΔW ≈ B·A with B = U_r·sqrt(S_r) (out × r) and
A = sqrt(S_r)·V_rᵀ (r × in'); r is ``rank`` or the smallest rank keeping ``energy`` of Σσ². The relative
Frobenius error ||ΔW − BA||_F / ||ΔW||_F of every layer is reported. The result is written as a plain PEFT LoRA
adapter (``lora_alpha = r`` per layer, so LoRA's scaling is 1); it loads with ``PeftModel.from_pretrained`` in a
process that never imports structpeft. Supported: SURM in LoRA placement, linear SURM-Adapters (ΔW = M·W₀) on
layers without an adapter bias, and PMSS, on Linear and Conv1D layers, and Conv2d with groups = 1.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ._staging import make_readable, staged_folder
from .errors import ConfigError, MergeError, UnsupportedLayerError
from .peft.layer import StructuredLayer, base_weight

if TYPE_CHECKING:
    from peft import PeftModel

    from .peft.config import SurmConfig
    from .peft.pmss import PmssConfig


@dataclass
class LayerExport:
    module: str
    shape: tuple[int, int]
    rank: int
    relative_error: float


def _factorise(
    delta: torch.Tensor, rank: int | None, energy: float | None, dtype: torch.dtype, eps: float
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """B (out × r), A (r × in) in ``dtype`` with B·A the best rank-r approximation of ``delta`` (float64), and
    the relative error ‖ΔW − B·A‖ / ‖ΔW‖ of the factors as stored. With ``energy``, singular values below ΔW's
    numerical-rank tolerance (s₀·max(out, in)·``eps``, ``eps`` of the precision ΔW was computed in) count as zero,
    so energy=1.0 keeps the numerical rank, not every noise direction."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rank is None:
        kept = torch.where(s > s[0] * max(delta.shape) * eps, s, torch.zeros_like(s)) if s.numel() else s
        cum = torch.cumsum(kept**2, 0) / (kept**2).sum().clamp_min(1e-300)
        threshold = torch.tensor(energy, dtype=cum.dtype) * (1 - 1e-12)  # cum's own rounding at energy=1.0
        rank = int(torch.searchsorted(cum, threshold).item()) + 1
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root).to(dtype)
    a = (root[:, None] * vh[:rank]).to(dtype)
    norm = torch.linalg.norm(delta)
    err = float(torch.linalg.norm(delta - b.double() @ a.double()) / norm) if norm > 0 else 0.0
    return b, a, rank, err


def to_lora(
    model: PeftModel,
    output_dir: str,
    *,
    adapter_name: str = "default",
    rank: int | None = None,
    energy: float | None = None,
) -> list[LayerExport]:
    """Write ``model``'s structured adapter ``adapter_name`` as a PEFT LoRA adapter into ``output_dir``.

    Give exactly one of ``rank`` (a fixed rank per layer, capped at min(out, in')) or ``energy`` in (0, 1]
    (per-layer rank keeping that fraction of the squared singular values). Returns one :class:`LayerExport` per
    layer with its rank and relative error. ``modules_to_save`` weights (e.g. a classifier head) are copied.
    The folder is written atomically (a temporary folder renamed into place); ``output_dir`` must be new, empty or
    an earlier export (which is replaced): a folder holding anything else raises :class:`ConfigError` before any
    work, so that nothing is lost. A non-finite ΔW raises :class:`MergeError` naming the layer.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if (rank is None) == (energy is None):
        raise ConfigError(f"rank={rank!r}, energy={energy!r}: give exactly one of them")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank={rank!r} is invalid: expected an integer >= 1")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ConfigError(f"energy={energy!r} is invalid: expected a number in (0, 1]")
    if adapter_name not in model.peft_config:
        raise ConfigError(
            f"adapter_name={adapter_name!r} is not an adapter of this model; valid: {sorted(model.peft_config)}"
        )
    _check_output_dir(output_dir)
    config = model.peft_config[adapter_name]
    prefix = "base_model.model."
    tensors: dict[str, torch.Tensor] = {}
    reports: list[LayerExport] = []
    rank_pattern: dict[str, int] = {}
    for path, layer in cast(nn.Module, model.base_model.model).named_modules():
        if not isinstance(layer, StructuredLayer) or adapter_name not in layer.operators:
            continue
        if layer.is_adapter_placement(adapter_name):
            block = layer.operators[adapter_name]
            if getattr(block, "activation_name", "identity") != "identity":
                raise UnsupportedLayerError(
                    f"layer {path!r}: an adapter block with activation={block.activation_name!r} is non-linear and "
                    "cannot be expressed as LoRA (only activation='identity' can)"
                )
            if getattr(block, "bias", None) is not None:
                raise UnsupportedLayerError(
                    f"layer {path!r}: an adapter block with a bias cannot be expressed as LoRA (LoRA has no bias term)"
                )
        base = layer.get_base_layer()
        weight = base_weight(base)
        if layer.kind == "conv2d":
            conv = cast(nn.Conv2d, base)
            dilation, padding_mode = tuple(conv.dilation), conv.padding_mode
            if conv.groups != 1 or any(d != 1 for d in dilation) or padding_mode != "zeros":
                raise UnsupportedLayerError(
                    f"layer {path!r}: Conv2d with groups={conv.groups}, dilation={dilation}, "
                    f"padding_mode={padding_mode!r} has no LoRA equivalent (PEFT's LoRA Conv2d keeps kernel size, "
                    "stride and padding only: it needs groups=1, dilation 1 and padding_mode='zeros')"
                )
        with torch.no_grad():
            delta = layer.get_delta_weight(adapter_name, exact=True)
            if layer.kind == "conv1d":
                delta = delta.T
            delta = delta.reshape(delta.shape[0], -1)
            if not bool(torch.isfinite(delta).all()):
                raise MergeError(
                    f"layer {path!r}: adapter {adapter_name!r} gives a non-finite ΔW (NaN / inf in its parameters); "
                    "nothing was written"
                )
            # half-precision bases get float32 factors (PEFT keeps LoRA weights in float32 on such models by
            # default): rounding B and A to bf16 would add ~2e-3 of error to an otherwise exact export
            dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
            eps = torch.finfo(torch.promote_types(weight.dtype, torch.float32)).eps
            b, a, r, err = _factorise(delta, rank, energy, dtype, eps)
        if layer.kind == "conv2d":
            a = a.reshape(r, *weight.shape[1:])
            b = b.reshape(b.shape[0], r, 1, 1)
        tensors[f"{prefix}{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{path}.lora_B.weight"] = b.contiguous()
        rank_pattern[path] = r
        reports.append(LayerExport(path, (delta.shape[0], delta.shape[1]), r, err))
    if not reports:
        raise ConfigError(f"adapter {adapter_name!r} has no structured layers to export")
    # structured layers hold the adapter: its config is a structured method's
    structured = cast("SurmConfig | PmssConfig", config)
    for name, tensor in model.state_dict().items():  # modules_to_save copies, keyed as PEFT saves them
        marker = f".modules_to_save.{adapter_name}."
        if marker in name:
            tensors[name.replace(marker, ".")] = tensor.detach().clone().contiguous()
    max_rank = max(rank_pattern.values())
    lora = LoraConfig(
        r=max_rank,
        lora_alpha=max_rank,
        # an anchored regex: a list matches by suffix, so a top-level "proj" would also adapt "block.proj"
        target_modules="^(?:" + "|".join(re.escape(k) for k in sorted(rank_pattern)) + ")$",
        rank_pattern={f"^{k}$": v for k, v in rank_pattern.items()},
        alpha_pattern={f"^{k}$": v for k, v in rank_pattern.items()},
        modules_to_save=structured.modules_to_save,
        fan_in_fan_out=any(x.kind == "conv1d" for _, x in _layers(model, adapter_name)),
        base_model_name_or_path=structured.base_model_name_or_path,
        task_type=structured.task_type,
    )
    with staged_folder(Path(output_dir).absolute()) as tmp:  # replaces an earlier export only (_check_output_dir)
        lora.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        with open(tmp / REPORT_FILE, "w") as f:
            json.dump([r.__dict__ for r in reports], f, indent=1)
        make_readable(tmp)  # mkdtemp makes the folder 0o700, safetensors the weights file 0o600
    return reports


REPORT_FILE = "export_report.json"
# what an earlier export writes: a folder holding only these (or nothing) is replaced; anything else is kept
EXPORT_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", REPORT_FILE})


def _check_output_dir(output_dir: str) -> None:
    """``output_dir`` must be new, empty, or an earlier export (it is replaced as a whole, atomically): a folder
    with anything else, e.g. the structured adapter being exported, is refused before anything is computed."""
    if not os.path.exists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise ConfigError(f"output_dir={output_dir!r} exists and is not a folder; give a new or empty folder")
    names = set(os.listdir(output_dir))
    if names and not (REPORT_FILE in names and names <= EXPORT_FILES):
        raise ConfigError(
            f"output_dir={output_dir!r} is not empty and is not an earlier to_lora export (it holds "
            f"{sorted(names)[:6]}{' ...' if len(names) > 6 else ''}); give a new or empty folder, so that nothing "
            "in it is replaced"
        )


def _layers(model: PeftModel, adapter_name: str) -> list[tuple[str, StructuredLayer]]:
    return [
        (p, m)
        for p, m in cast(nn.Module, model.base_model.model).named_modules()
        if isinstance(m, StructuredLayer) and adapter_name in m.operators
    ]
