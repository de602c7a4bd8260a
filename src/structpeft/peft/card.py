"""The model card (``README.md``) of a saved structpeft adapter.

``PeftModel.save_pretrained`` writes PEFT's generic card (library, tags, base model) into the save folder, then the
adapter's config; structpeft's configs add, when they are saved (:meth:`StructPeftConfigMixin.save_pretrained`),
a section that says what the adapter is: method, structure (SURM) or selection (PMSS), the number of trainable
parameters it stores, the base model and the targeted modules. The section sits between two HTML comments and is
replaced, never duplicated, when the folder is saved again. Folders of non-default adapters (``save_dir/<name>/``),
where PEFT writes no card, get a short card of their own.

The parameter count is read from the header of ``adapter_model.safetensors`` (written just before the config), so
it is exactly what the file holds: the structured tensors, plus ``modules_to_save`` copies if any. A config saved
alone (no weights file) counts the tensors its ``layer_options`` imply.
"""

from __future__ import annotations

import os
from typing import Any

CARD_NAME = "README.md"
SECTION_START = "<!-- structpeft:start -->"
SECTION_END = "<!-- structpeft:end -->"
METHOD_NAMES = {
    "SURM": "SURM (Structured Unrestricted-Rank Matrices, Sehanobish et al., NeurIPS 2024)",
    "PMSS": "PMSS (Pretrained Matrices Skeleton Selection, Wang et al., COLING 2025)",
}


def parameter_counts(folder: str, config: Any) -> tuple[int, int, str]:
    """(structured parameters, other saved parameters, source) of the adapter in ``folder``: read from the
    safetensors header if the weights file exists, else from the config's ``layer_options`` (source "config")."""
    weights = os.path.join(folder, "adapter_model.safetensors")
    marker = "." + config.param_prefix
    if os.path.exists(weights):
        from safetensors import safe_open

        structured = other = 0
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                if not f.get_slice(key).get_dtype().startswith(("F", "BF")):
                    continue  # integer tensors are indices (PMSS's I and J), not parameters
                numel = 1
                for size in f.get_slice(key).get_shape():
                    numel *= size
                if marker in key:
                    structured += numel
                else:
                    other += numel
        return structured, other, "file"
    structured = 0
    for params in config.expected_tensors().values():
        for shape, required in params.values():
            if required:
                numel = 1
                for size in shape:
                    numel *= size
                structured += numel
    return structured, 0, "config"


def _structure_line(config: Any) -> str:
    if config.peft_type == "PMSS":
        ks = sorted({(rec["options"]["k_in"], rec["options"]["k_out"]) for rec in config.layer_options.values()})
        sizes = ", ".join(f"{a}×{b}" for a, b in ks) or "not resolved yet"
        return (
            f"skeleton ΔW = W[:, I]·U·W[J, :] (C, R selected from the frozen weight by `{config.selection}`, "
            f"skeleton_scaling `{config.skeleton_scaling}`); core U of size k_in×k_out: {sizes}"
        )
    options = ", ".join(f"{k}={v}" for k, v in config.structure_options().items())
    text = f"`{config.structure}`" + (f" ({options})" if options else "")
    if config.budget is not None:
        text += f", budget {config.budget!r} per layer"
    if config.placement == "adapter":
        text += f"; placement `adapter` ({config.adapter_form}, activation `{config.activation}`"
        text += f", bottleneck {config.bottleneck})" if config.adapter_form == "bottleneck" else ")"
    else:
        text += "; placement `lora` (ΔW added to the targeted weight)"
    return text


def card_section(folder: str, config: Any) -> str:
    """The structpeft section of the card, between ``SECTION_START`` and ``SECTION_END``."""
    structured, other, source = parameter_counts(folder, config)
    total = structured + other
    counted = "stored in `adapter_model.safetensors`" if source == "file" else "implied by `adapter_config.json`"
    params = f"{total:,} ({counted}: {structured:,} structured"
    params += f", {other:,} in `modules_to_save`)" if other else ")"
    targets = sorted(config.layer_options)
    shown = ", ".join(f"`{t}`" for t in targets[:6]) + (f", … ({len(targets) - 6} more)" if len(targets) > 6 else "")
    base = config.base_model_name_or_path or "not recorded (the base model had no name_or_path)"
    rows = [
        ("Method", METHOD_NAMES.get(config.peft_type, config.peft_type)),
        ("Structure", _structure_line(config)),
        ("Trainable parameters", params),
        ("Base model", base if base.startswith("not recorded") else f"`{base}`"),
        ("Targeted modules", f"{len(targets)}: {shown}" if targets else "none recorded"),
        ("Scale alpha", str(config.alpha)),
    ]
    lines = [
        SECTION_START,
        "## structpeft adapter",
        "",
        "| | |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "Load it with `import structpeft` (registers the method with PEFT), then "
        "`peft.PeftModel.from_pretrained(base_model, path)`.",
        SECTION_END,
    ]
    return "\n".join(lines)


def write_model_card(folder: str, config: Any) -> str:
    """Create or update ``folder/README.md`` with the structpeft section and metadata; returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(folder, CARD_NAME)
    section = card_section(folder, config)
    method = str(config.peft_type)
    if os.path.exists(path):
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n# {method} adapter (structpeft)\n")
    card.data["library_name"] = card.data.get("library_name") or "peft"
    tags = set(card.data.get("tags") or [])
    tags |= {"structpeft", method.lower()}
    if method == "SURM":
        tags.add(f"structure:{config.structure}")
    card.data["tags"] = sorted(tags)
    if config.base_model_name_or_path and not card.data.get("base_model"):
        card.data["base_model"] = config.base_model_name_or_path
    text = card.text
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(SECTION_END) :]
    else:  # after the title line (the first H1), else at the top
        lines = text.split("\n")
        title = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
        at = 0 if title is None else title + 1
        text = "\n".join([*lines[:at], "", section, "", *lines[at:]])
    card.text = text
    card.save(path)
    return path
