"""Trainable-parameter counts of SURM-Adapters (per structure), a dense bottleneck adapter and PEFT LoRA, with
the closed formulas they must equal. Shared by test_adapter_counts.py and the slow MiniLM test."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr", "dense")


def structure_params(structure: str, out_f: int, in_f: int, options: dict) -> int:
    """Parameters of one (out x in) structured operator with its resolved options (written from the docs)."""
    if structure == "dense":
        return out_f * in_f
    if structure == "kronecker":
        o1, i1 = options["factor_shape"]
        return o1 * i1 + math.ceil(out_f / o1) * math.ceil(in_f / i1)
    b = options["block_size"]
    blocks = math.ceil(out_f / b) * math.ceil(in_f / b)
    if structure == "circulant":
        return blocks * b
    if structure == "toeplitz":
        return options["num_factors"] * blocks * (2 * b - 1)
    if structure == "ldr":
        return 2 * options["displacement_rank"] * blocks * b
    raise AssertionError(structure)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Row:
    method: str
    trainable: int
    formula: int
    note: str


def adapter_row(
    make_base: Callable[[], nn.Module], targets: list[str], structure: str, bottleneck: int | None = None
) -> Row:
    """SURM-Adapter (square, or bottleneck of width m) on ``targets``: count and formula
    Σ_layers [P_S(n, n) or P_S(m, n) + P_S(n, m)] + n (adapter bias, when the layer has one)."""
    from peft import get_peft_model

    from structpeft import SurmConfig

    form = "square" if bottleneck is None else "bottleneck"
    cfg = SurmConfig(
        structure=structure, placement="adapter", adapter_form=form, bottleneck=bottleneck, target_modules=targets
    )
    base = make_base()
    model = get_peft_model(base, cfg)
    formula = 0
    notes = set()
    for path, rec in cfg.layer_options.items():
        n = rec["shape"][0]
        module = model.base_model.model.get_submodule(path).get_base_layer()
        opts = rec["options"]
        if form == "square":
            formula += structure_params(structure, n, n, opts["op"])
            notes.add(f"n={n} {opts['op']}" if opts["op"] else f"n={n}")
        else:
            m = bottleneck
            formula += structure_params(structure, m, n, opts["down"]) + structure_params(structure, n, m, opts["up"])
            notes.add(f"n={n} m={m}")
        formula += n if getattr(module, "bias", None) is not None else 0
    name = f"surm-adapter {structure}" + ("" if bottleneck is None else f" bottleneck m={bottleneck}")
    note = f"{len(cfg.layer_options)} layers; " + "; ".join(sorted(notes))
    return Row(name, trainable(model), formula, note)


def lora_row(make_base: Callable[[], nn.Module], targets: list[str], r: int = 8) -> Row:
    """PEFT LoRA rank r on ``targets``: Σ r·(in + out)."""
    from peft import LoraConfig, get_peft_model

    base = make_base()
    model = get_peft_model(base, LoraConfig(r=r, target_modules=targets))
    formula = 0
    count = 0
    for module in model.base_model.model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            base_layer = module.get_base_layer()
            formula += r * (base_layer.in_features + base_layer.out_features)
            count += 1
    return Row(f"peft lora r={r}", trainable(model), formula, f"{count} layers; targets {', '.join(targets)}")


def count_rows(
    make_base: Callable[[], nn.Module], targets: list[str], lora_targets: list[str], dense_bottleneck: int = 64
) -> list[Row]:
    rows = [adapter_row(make_base, targets, s) for s in STRUCTURES]
    rows.append(adapter_row(make_base, targets, "circulant", bottleneck=dense_bottleneck))
    rows.append(adapter_row(make_base, targets, "dense", bottleneck=dense_bottleneck))
    rows.append(lora_row(make_base, lora_targets))
    return rows


def format_rows(title: str, rows: list[Row]) -> str:
    width = max(len(r.method) for r in rows)
    lines = [title, f"{'method':<{width}}  {'trainable':>10}  {'formula':>10}  note"]
    lines += [f"{r.method:<{width}}  {r.trainable:>10,}  {r.formula:>10,}  {r.note}" for r in rows]
    return "\n".join(lines)
