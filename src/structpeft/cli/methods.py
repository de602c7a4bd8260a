"""The fine-tuning methods of the CLI and how each one is applied to a model.

Every method goes through the same trainer; only the trainable parameters differ. PEFT methods (structpeft's
``surm`` / ``pmss`` and PEFT's own ``lora``, ``c3a``, ``lokr``, ``vera``) wrap the model with
``peft.get_peft_model`` and keep the classification head in ``modules_to_save``; ``head-only`` trains the head
alone; ``full`` trains everything.
"""

from __future__ import annotations

import math
from typing import Any

from ..operators import OPERATORS
from ..operators.dense import DenseOperator
from ._common import CliError

METHODS = ("surm", "pmss", "lora", "c3a", "lokr", "vera", "head-only", "full")
PEFT_METHODS = ("surm", "pmss", "lora", "c3a", "lokr", "vera")
# the registered structures, less the unstructured reference (a dense ΔW never fits a LoRA-sized budget)
STRUCTURES = tuple(name for name in OPERATORS if name != DenseOperator.structure)
# the structure options the CLI has flags for (--block-size ...); the two that set a layer's size
STRUCTURE_OPTIONS = ("block_size", "num_factors", "displacement_rank", "factor_shape")
SIZE_OPTIONS = ("block_size", "factor_shape")

# Default learning rates. Structured / core-only methods train few, "large-effect" parameters from ΔW = 0 and
# need a larger step than LoRA; C3A divides its output by in_features and needs ~1e-1 (PEFT's documentation);
# VeRA trains only scaling vectors. Generation (causal LMs) uses smaller values.
# Kronecker (SURM and LoKr) starts from L = 0 with R Kaiming-uniform (entries ~ 1/sqrt(fan-in)), so an Adam step
# of size lr on L moves ΔW = L ⊗ R by only about lr·|R|: it needs ~5x the lr of the other structures (measured
# on MiniLM + BBC: 84.5 % at 2e-3, 93.3 % at 1e-2).
DEFAULT_LR: dict[str, dict[str, float]] = {
    "classification": {
        "surm": 2e-3,
        "surm kronecker": 1e-2,
        "pmss": 2e-3,
        "lora": 1e-3,
        "c3a": 1e-1,
        "lokr": 1e-2,
        "vera": 1e-2,
        "head-only": 5e-3,
        "full": 5e-5,
    },
    "generation": {
        "surm": 1e-3,
        "surm kronecker": 5e-3,
        "pmss": 1e-3,
        "lora": 3e-4,
        "c3a": 5e-2,
        "lokr": 5e-3,
        "vera": 5e-3,
        "head-only": 5e-3,
        "full": 2e-5,
    },
}
# The classification head is newly initialised for every method, so its learning rate does not follow the
# method's: tying it to a small adapter lr (1e-3 for LoRA) left the head under-trained in short runs.
HEAD_LR = 5e-3
DEFAULT_R = {"lora": 8, "lokr": 8, "vera": 256}
DEFAULT_BUDGET = "lora-8"


def pmss_available() -> bool:
    import structpeft

    return hasattr(structpeft, "PmssConfig")


def check_method_args(args: Any) -> None:
    """Refuse options that do not apply to the chosen method (before anything is loaded)."""
    m = args.method
    if m == "pmss" and not pmss_available():
        raise CliError(
            "pmss is not available in this version; valid methods: " + ", ".join(x for x in METHODS if x != "pmss")
        )
    only = {
        "structure": ("surm",),
        "placement": ("surm",),
        "displacement_rank": ("surm",),
        "num_factors": ("surm",),
        "factor_shape": ("surm",),
        "block_size": ("surm", "c3a"),
        "budget": ("surm", "pmss", "c3a"),
        "r": ("lora", "lokr", "vera"),
        "alpha": ("surm", "pmss", "lora", "lokr"),
        "selection": ("pmss",),
        "target_modules": PEFT_METHODS,
        "dropout": ("surm", "lora", "vera", "pmss"),
    }
    for name, methods in only.items():
        if getattr(args, name, None) is not None and m not in methods:
            flag = "--" + name.replace("_", "-")
            raise CliError(f"{flag} does not apply to --method {m}; it is an option of: {', '.join(methods)}")
    if m == "surm":
        structure = args.structure or "circulant"
        own = OPERATORS[structure].option_names
        for name in STRUCTURE_OPTIONS:
            if getattr(args, name, None) is not None and name not in own:
                users = [s for s in STRUCTURES if name in OPERATORS[s].option_names]
                sized = " or ".join(f"--{o.replace('_', '-')}" for o in own if o in SIZE_OPTIONS)
                raise CliError(
                    f"--{name.replace('_', '-')} applies to --structure {' / '.join(users)} only, not "
                    f"{structure!r}" + (f" (use {sized} or --budget)" if sized and name in SIZE_OPTIONS else "")
                )
        if args.budget is not None and (args.block_size is not None or args.factor_shape is not None):
            raise CliError("--budget and --block-size/--factor-shape both set the layer size; give one of them")
    if m == "c3a" and args.budget is not None and args.block_size is not None:
        raise CliError("--budget and --block-size both set the C3A block size; give one of them")
    if args.budget is not None:
        from ..budget import parse_budget

        parse_budget(args.budget)  # ConfigError naming the valid forms
    for name in ("r", "block_size", "displacement_rank", "num_factors"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise CliError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise CliError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and abs(args.alpha) <= 1e6):
        raise CliError(f"--alpha must be a finite number in [-1e6, 1e6], got {args.alpha}")


def resolve_hparams(args: Any, task: str) -> dict[str, Any]:
    """The method's resolved hyper-parameters (recorded in run_config.json)."""
    m = args.method
    hp: dict[str, Any] = {"method": m}
    per_structure = f"surm {getattr(args, 'structure', None)}"
    key = per_structure if m == "surm" and per_structure in DEFAULT_LR[task] else m
    lr = args.lr if args.lr is not None else DEFAULT_LR[task][key]
    hp["lr"] = lr
    hp["head_lr"] = args.head_lr if args.head_lr is not None else HEAD_LR
    if m == "surm":
        hp["structure"] = args.structure or "circulant"
        hp["placement"] = getattr(args, "placement", None) or "lora"
        hp["block_size"] = args.block_size
        hp["factor_shape"] = list(args.factor_shape) if args.factor_shape else None
        hp["num_factors"] = args.num_factors
        hp["displacement_rank"] = args.displacement_rank
        sized = args.block_size is not None or args.factor_shape is not None or hp["placement"] == "adapter"
        hp["budget"] = args.budget if args.budget is not None else (None if sized else DEFAULT_BUDGET)
        hp["alpha"] = args.alpha if args.alpha is not None else 1.0
        hp["dropout"] = args.dropout or 0.0
    elif m == "pmss":
        hp["budget"] = args.budget or DEFAULT_BUDGET
        hp["selection"] = args.selection or "deim"
        hp["alpha"] = args.alpha
        hp["dropout"] = args.dropout
        hp["seed"] = args.seed
    elif m == "lora":
        hp["r"] = args.r or DEFAULT_R["lora"]
        hp["alpha"] = args.alpha if args.alpha is not None else 2 * hp["r"]
        hp["dropout"] = args.dropout or 0.0
    elif m == "lokr":
        hp["r"] = args.r or DEFAULT_R["lokr"]
        hp["alpha"] = args.alpha if args.alpha is not None else hp["r"]
    elif m == "vera":
        hp["r"] = args.r or DEFAULT_R["vera"]
        hp["dropout"] = args.dropout or 0.0
    elif m == "c3a":
        hp["block_size"] = args.block_size
        hp["budget"] = args.budget if args.budget is not None else (None if args.block_size else DEFAULT_BUDGET)
    return hp


def _linear_shapes(model: Any, targets: list[str]) -> dict[str, tuple[int, int]]:
    from torch import nn

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def c3a_block_size(model: Any, targets: list[str], budget: Any) -> int:
    """The C3A block size for a parameter budget: the smallest common divisor b of every targeted layer's in
    and out size whose parameter count (in·out/b per layer) stays within the budget (else the largest
    divisor)."""
    from ..budget import budget_to_parameters

    shapes = _linear_shapes(model, targets)
    if not shapes:
        return 0  # let PEFT report that the target modules matched nothing
    g = 0
    for o, i in shapes.values():
        g = math.gcd(g, math.gcd(o, i))
    divisors = [d for d in range(1, g + 1) if g % d == 0]
    need = 0.0
    for o, i in shapes.values():
        n_params = budget_to_parameters(budget, o, i)
        assert n_params is not None  # resolve_hparams sets a budget whenever the block size is not given
        need = max(need, o * i / n_params)
    fitting = [d for d in divisors if d >= need]
    return fitting[0] if fitting else divisors[-1]


def apply_method(model: Any, hp: dict[str, Any], task: str, head: list[str], targets: list[str] | None) -> Any:
    """Return the model to train: a ``PeftModel`` for PEFT methods, the model itself for head-only / full."""
    m = hp["method"]
    if m == "full":
        model.requires_grad_(True)
        return model
    if m == "head-only":
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if any(name == h or name.startswith(h + ".") for h in head):
                p.requires_grad_(True)
        return model

    import peft

    import structpeft

    assert targets is not None
    # Classification: a plain PeftModel with the head in modules_to_save (PEFT's SEQ_CLS task type would add
    # both 'classifier' and 'score' whatever the model has). Generation: PEFT's causal-LM model class.
    common: dict[str, Any] = {"target_modules": list(targets)}
    if task == "generation":
        common["task_type"] = "CAUSAL_LM"
    if head:
        common["modules_to_save"] = list(head)
    config: peft.PeftConfig
    if m == "surm":
        config = structpeft.SurmConfig(
            structure=hp["structure"],
            block_size=hp["block_size"],
            factor_shape=hp["factor_shape"],
            num_factors=hp["num_factors"],
            displacement_rank=hp["displacement_rank"],
            budget=hp["budget"],
            alpha=hp["alpha"],
            dropout=hp["dropout"],
            placement=hp.get("placement", "lora"),
            compute_tokens=hp.get("compute_tokens", structpeft.SurmConfig.compute_tokens),
            **common,
        )
    elif m == "pmss":
        kwargs = {"budget": hp["budget"], "selection": hp["selection"]}
        for name in ("alpha", "dropout", "seed", "compute_tokens"):
            if hp.get(name) is not None and name in getattr(structpeft.PmssConfig, "__dataclass_fields__", {}):
                kwargs[name] = hp[name]
        config = structpeft.PmssConfig(**kwargs, **common)
    elif m == "lora":
        _check_rank(model, list(targets), hp["r"], m)
        config = peft.LoraConfig(r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=hp["dropout"], **common)
    elif m == "lokr":
        config = peft.LoKrConfig(r=hp["r"], alpha=hp["alpha"], **common)
    elif m == "vera":
        _check_rank(model, list(targets), hp["r"], m)
        config = peft.VeraConfig(r=hp["r"], vera_dropout=hp["dropout"], **common)
    elif m == "c3a":
        if hp["block_size"] is None:
            hp["block_size"] = c3a_block_size(model, list(targets), hp["budget"]) or 1
        _check_c3a_block(model, list(targets), hp["block_size"])
        config = peft.C3AConfig(block_size=hp["block_size"], **common)
    else:  # pragma: no cover - argparse choices
        raise CliError(f"unknown method {m!r}; valid methods: {', '.join(METHODS)}")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        # PEFT's own "Target modules ... not found" and similar messages
        raise CliError(f"--method {m}: {exc}") from None


def _check_rank(model: Any, targets: list[str], r: int, method: str) -> None:
    """Refuse a LoRA / VeRA rank above a targeted layer's full rank min(out, in): such a rank adds parameters
    (r·(in + out) per layer for LoRA) without adding rank, and a huge one fails inside torch's allocator. VeRA's
    default (256, PEFT's too) is allowed on any model: its r sizes the shared frozen projections."""
    shapes = _linear_shapes(model, targets)
    if not shapes:
        return  # let PEFT report that the target modules matched nothing
    name, (o, i) = min(shapes.items(), key=lambda kv: min(kv[1]))
    limit = max(min(o, i), DEFAULT_R["vera"]) if method == "vera" else min(o, i)
    if r > limit:
        raise CliError(
            f"--r {r} exceeds the full rank {min(o, i)} of the targeted layer {name!r} ({o} x {i}); "
            f"--method {method} needs 1 <= --r <= {limit} (use --method full to train every weight)"
        )


def _check_c3a_block(model: Any, targets: list[str], b: int) -> None:
    shapes = _linear_shapes(model, targets)
    bad = {k: v for k, v in shapes.items() if v[0] % b or v[1] % b}
    if bad:
        g = 0
        for o, i in shapes.values():
            g = math.gcd(g, math.gcd(o, i))
        valid = [d for d in range(1, g + 1) if g % d == 0]
        key, shape = next(iter(bad.items()))
        raise CliError(
            f"--block-size {b} does not divide the shape {shape} of {key!r}; C3A needs a common divisor of "
            f"every targeted layer's sizes: one of {valid}"
        )
