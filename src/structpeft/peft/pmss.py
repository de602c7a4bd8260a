"""PMSS (Pretrained Matrices Skeleton Selection, Wang et al., COLING 2025) as a PEFT method.

ΔW = W[:, I] · U · W[J, :] for each targeted layer (see :mod:`structpeft.operators.skeleton`); I and J are
selected from the frozen pretrained weight by :func:`structpeft.selection.select_skeleton`, only U is trained.

Storage: the adapter file holds U and the indices I, J (int64; see :func:`_load_skeleton_indices` for why the
weights carry them too); ``adapter_config.json`` records, per layer, the shape, k_in, k_out, the
indices I and J, a checksum of the gathered factors W[:, I], W[J, :] (computed on their bf16 rounding, so the
same base model loaded in fp32 or bf16 passes) and a rounding-tolerant sketch of them (for an fp16 copy, whose
bf16 rounding differs in a few entries; see :func:`structpeft.selection.skeleton_sketch`). At load, C and R are
re-gathered from the base model and checked for every layer *before* the model is modified: a different base
model raises :class:`~structpeft.errors.BaseModelMismatchError`. File size: 4·k_in·k_out + 8·(k_in + k_out) bytes
per layer (fp32 U, int64 indices), e.g. 25 KB per MiniLM layer at LoRA r=8's budget, instead of
4·(out·k_in + k_out·in) for snapshotted factors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from peft.config import PeftConfig
from torch import nn

from ..errors import BaseModelMismatchError, ConfigError
from ..operators.dispatch import DEFAULT_COMPUTE_TOKENS
from ..operators.fused import _CACHES as _FUSED_CACHES
from ..operators.skeleton import SKELETON_INITS, SKELETON_SCALINGS, SkeletonOperator
from ..selection import (
    SELECTION_STRATEGIES,
    SKETCH_SIZE,
    select_skeleton,
    skeleton_checksum,
    skeleton_sketch,
    sketch_difference,
)
from .config import (
    COMPUTE_HELP,
    COMPUTE_TOKENS_HELP,
    FOLD_INFERENCE_HELP,
    KEEP_FOLDED_WEIGHT_HELP,
    MethodName,
    StructPeftConfigMixin,
    _check_compute,
    _check_number,
)
from .layer import StructuredLayer, base_bias, delta_shape, weight_2d
from .model import StructuredTuner, measure_compute

PMSS_PEFT_TYPE = MethodName("PMSS")
DEFAULT_BUDGET = "lora-8"


@dataclass
class PmssConfig(StructPeftConfigMixin, PeftConfig):
    """Configuration of PMSS: y = base(x) + alpha · W[:, I] · U · W[J, :] · x, only U (k_in × k_out) trained."""

    param_prefix: ClassVar[str] = "pmss_"

    target_modules: list[str] | set[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex, or 'all-linear' (the PiSSA / PMSS protocol). None: "
            "the preset for the model type (BERT: query, value; LLaMA: q_proj, v_proj)."
        },
    )
    exclude_modules: list[str] | set[str] | str | None = field(default=None, metadata={"help": "Modules NOT to adapt."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    selection: str = field(
        default="deim",
        metadata={"help": f"Skeleton selection strategy, one of {sorted(SELECTION_STRATEGIES)}."},
    )
    budget: str | int | None = field(
        default=DEFAULT_BUDGET,
        metadata={
            "help": "Trainable parameters per layer: 'lora-R' (as many as LoRA rank R, R·(in + out)) or an "
            "integer; k_in = k_out = floor(sqrt(budget)), capped below min(out, in). Ignored if k_in/k_out set."
        },
    )
    k_in: int | None = field(default=None, metadata={"help": "Number of selected columns |I| (with k_out)."})
    k_out: int | None = field(default=None, metadata={"help": "Number of selected rows |J| (with k_in)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random strategy and of randomised SVDs."})
    alpha: float = field(default=1.0, metadata={"help": "Scale s in W + s·ΔW."})
    dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapter input; 0 keeps the fast paths (base output reuse, folding)."},
    )
    compute: str = field(default="auto", metadata={"help": COMPUTE_HELP})
    compute_tokens: int = field(default=DEFAULT_COMPUTE_TOKENS, metadata={"help": COMPUTE_TOKENS_HELP})
    fold_inference: bool = field(default=False, metadata={"help": FOLD_INFERENCE_HELP})
    keep_folded_weight: bool = field(default=False, metadata={"help": KEEP_FOLDED_WEIGHT_HELP})
    init_weights: bool | str = field(
        default=True,
        metadata={
            "help": "True / 'zero': U = 0 (the paper; model unchanged). 'gaussian': U ~ N(0, 1e-4) (ablation). "
            "False / 'random': clearly non-zero U (tests)."
        },
    )
    skeleton_scaling: str = field(
        default="none",
        metadata={"help": "'none': raw columns / rows of W. 'unit': each selected column and row scaled to norm 1."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules (e.g. a classifier head) fully trained and saved."}
    )
    layer_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Filled in when the adapter is created: per layer its shape, k_in, k_out, the indices I "
            "(columns) and J (rows) and a checksum of the selected factors."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PMSS_PEFT_TYPE
        self.validate()

    def validate(self) -> None:
        """Check every field (see :meth:`SurmConfig.validate <structpeft.SurmConfig.validate>`): on construction
        and again by ``get_peft_model`` / ``add_adapter`` before the model is touched."""
        if self.selection not in SELECTION_STRATEGIES:
            from ..errors import UnknownStructureError

            raise UnknownStructureError(
                f"unknown selection strategy {self.selection!r}; valid: {', '.join(sorted(SELECTION_STRATEGIES))}"
            )
        self._validate_common()
        self._check_layer_options(required=("k_in", "k_out", "col_idx", "row_idx", "checksum"))
        for key, rec in (self.layer_options or {}).items():
            sketch = rec["options"].get("sketch")
            if sketch is not None and not (
                isinstance(sketch, list)
                and len(sketch) == SKETCH_SIZE + 1
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in sketch)
            ):
                raise ConfigError(
                    f"layer_options[{key!r}]['options']['sketch'] is invalid ({sketch!r}, expected null or a list of "
                    f"{SKETCH_SIZE + 1} finite numbers); get_peft_model writes it: use the saved adapter_config.json "
                    "unchanged, or a fresh config"
                )
        _check_number("alpha", self.alpha, low=-1e6, high=1e6)
        _check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _check_compute(self.compute, self.compute_tokens, self.fold_inference, self.keep_folded_weight)
        if (self.k_in is None) != (self.k_out is None):
            raise ConfigError(f"k_in={self.k_in!r}, k_out={self.k_out!r}: give both or neither")
        for name in ("k_in", "k_out"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 1")
        if self.k_in is None:
            if self.budget is None:
                raise ConfigError("budget=None and k_in/k_out unset: give budget (e.g. 'lora-8') or k_in and k_out")
        if self.budget is not None:
            self._normalise_budget()
        if self.skeleton_scaling not in SKELETON_SCALINGS:
            raise ConfigError(
                f"skeleton_scaling={self.skeleton_scaling!r} is invalid; valid: {', '.join(SKELETON_SCALINGS)}"
            )
        if not isinstance(self.init_weights, bool) and self.init_weights not in SKELETON_INITS:
            raise ConfigError(
                f"init_weights={self.init_weights!r} is invalid; valid: True, False, {', '.join(SKELETON_INITS)}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r} is invalid: expected an integer")

    def expected_tensors(self) -> dict[str, dict[str, tuple[tuple[int, ...], bool]]]:
        return {
            key: {
                "core": ((rec["options"]["k_in"], rec["options"]["k_out"]), True),
                # the indices (int64): in files saved since they are part of the state dict
                "col_idx": ((rec["options"]["k_in"],), False),
                "row_idx": ((rec["options"]["k_out"],), False),
            }
            for key, rec in self.layer_options.items()
        }

    def layer_k(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(k_in, k_out) for a layer: the explicit values, or the budget rule of :mod:`structpeft.budget`. (The
        config is valid here: :meth:`validate` ran on construction and again when the adapter is injected.)"""
        if self.k_in is not None and self.k_out is not None:
            return self.k_in, self.k_out
        assert self.budget is not None  # validate(): a budget, or both k_in and k_out
        from ..budget import budget_to_parameters, pmss_k_for_budget

        n_params = budget_to_parameters(self.budget, out_features, in_features)
        return pmss_k_for_budget(n_params, out_features, in_features)


def _checksum(w2d: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> str:
    return skeleton_checksum(w2d.detach().to(torch.bfloat16), cols, rows)


def _selection_record(w2d: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    """What ``layer_options`` records of a selection: the indices, the checksum and the sketch of W₀'s factors."""
    return {
        "col_idx": cols.tolist(),
        "row_idx": rows.tolist(),
        "checksum": _checksum(w2d, cols, rows),
        "sketch": skeleton_sketch(w2d, cols, rows),
    }


# the sketches of the same weights rounded to fp16 or bf16 differ by about 1e-3 of the factors' norm (at most
# 2^-9 = 2e-3 per entry for bf16), those of other weights by about 1: see selection.skeleton_sketch
SKETCH_TOLERANCE = 1e-2


def _same_factors(w2d: torch.Tensor, options: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``w2d``'s skeleton factors are the recorded ones: the exact checksum of their bf16 rounding, else
    (a copy rounded to another precision, e.g. fp16, whose bf16 rounding can differ in a few entries) the sketch
    within :data:`SKETCH_TOLERANCE`. Returns the verdict and what was compared, for the error message."""
    cols, rows = torch.tensor(options["col_idx"]), torch.tensor(options["row_idx"])
    found = _checksum(w2d, cols, rows)
    if found == options["checksum"]:
        return True, ""
    what = f"checksum {found} here, {options['checksum']} recorded"
    recorded = options.get("sketch")
    if recorded is None:  # an adapter saved before sketches were recorded, or non-finite factors
        return False, what
    sketch = skeleton_sketch(w2d, cols, rows)
    diff = math.inf if sketch is None else sketch_difference(sketch, recorded)
    what += f"; the factors differ by {diff:.3g} of their norm, more than rounding ({SKETCH_TOLERANCE:g})"
    return diff <= SKETCH_TOLERANCE, what


class PmssLayer(StructuredLayer):
    """PMSS's containers: ``pmss_op[name]`` (a :class:`SkeletonOperator`), ``pmss_scaling``, ``pmss_dropout``."""

    adapter_layer_names = ("pmss_op",)
    other_param_names = ("pmss_scaling", "pmss_dropout")
    op_attr = "pmss_op"
    scaling_attr = "pmss_scaling"
    dropout_attr = "pmss_dropout"

    def _row_bias(self) -> torch.Tensor | None:
        """The bias whose entries b[J] the gather path subtracts from the base output (Linear / Conv1D only)."""
        return base_bias(self.get_base_layer()) if self.kind in ("linear", "conv1d") else None

    def _build_operator(self, adapter_name: str, config: PmssConfig, options: dict[str, Any]) -> SkeletonOperator:
        op = SkeletonOperator(  # C = W₀[:, I], R = W₀[J, :] from the unmerged W₀ (another adapter may be merged)
            self.unmerged_weight_2d(), options["col_idx"], options["row_idx"], config.skeleton_scaling, self._row_bias()
        )
        op.reset_parameters(config.init_weights)
        op.compute_mode = self._recorded_compute(config).get("delta", "fast")
        op.fold_inference = config.fold_inference
        op.keep_folded_weight = config.keep_folded_weight
        return op

    def unmerge(self) -> None:
        """Unmerge, then check that the selected columns / rows of W are back to the gathered factors."""
        names = list(self.merged_adapters)
        super().unmerge()
        w2d = weight_2d(self.get_base_layer())
        for name in names:
            op = cast(SkeletonOperator, self.operators[name])  # PMSS's operators
            if op.skeleton_scaling != "none":
                continue
            drift = (w2d[:, op.col_idx].float() - op.cols.float()).abs().max().item()
            scale = op.cols.abs().max().item() or 1.0
            if drift > 1e-3 * scale:
                warnings.warn(
                    f"after unmerging adapter {name!r} from {self.module_path}, W[:, I] differs from the factor "
                    f"gathered at creation by {drift:.3g} (max abs): the base weight drifted (merged in low "
                    "precision, or changed while merged)",
                    stacklevel=2,
                )


def _load_skeleton_indices(
    layer: PmssLayer, state_dict: dict[str, Any], prefix: str, _metadata: Any, _strict: bool, *_: Any
) -> None:
    """Before a state dict is loaded into a PMSS layer: where it brings other indices I, J for an adapter (one
    saved where the selection came out differently, loaded with ``load_adapter`` under an existing name or with
    ``load_state_dict``), gather C, R from this layer's unmerged W₀ at those indices, so that the loaded U is used
    with the rows and columns it was trained with; where it brings none (files saved before the indices were),
    the current ones are kept, quietly."""
    from ..errors import MergeError, StateDictError

    for name, module in layer.operators.items():
        op = cast(SkeletonOperator, module)
        keys = {attr: f"{prefix}pmss_op.{name}.{attr}" for attr in ("col_idx", "row_idx")}
        current = {"col_idx": op.col_idx, "row_idx": op.row_idx}
        if not any(k in state_dict for k in keys.values()):
            state_dict.update({k: current[attr].clone() for attr, k in keys.items()})
            continue
        given = {}
        for attr, key in keys.items():
            t = state_dict.get(key, current[attr])
            n = op.in_features if attr == "col_idx" else op.out_features
            ok = isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and t.dtype != torch.bool
            ok = ok and t.numel() == current[attr].numel() and (t.numel() == 0 or 0 <= int(t.min()) <= int(t.max()) < n)
            if not ok:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise StateDictError(
                    f"{key}: expected {current[attr].numel()} integer indices in [0, {n}) (the adapter's "
                    f"{'columns I' if attr == 'col_idx' else 'rows J'}), got {shape}"
                )
            given[attr] = t.to(device=current[attr].device, dtype=torch.long)
            state_dict[key] = given[attr]
        if all(torch.equal(given[a], current[a]) for a in given):
            continue
        if name in layer.merged_adapters:
            raise MergeError(
                f"adapter {name!r} on {layer.module_path or 'this layer'} is merged; the state dict selects other "
                "columns / rows: unmerge_adapter() before loading it"
            )
        op.regather(layer.unmerged_weight_2d(), given["col_idx"], given["row_idx"], layer._row_bias())
        _FUSED_CACHES.pop(layer, None)  # its folded W + s·ΔW was built from the old C and R


class PmssWrapper(nn.Module, PmssLayer):
    """The module that replaces a targeted Linear / Conv1D / Conv2d for PMSS."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: PmssConfig,
        module_path: str = "",
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        PmssLayer.__init__(self, base_layer, module_path=module_path)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, options=options or {})
        self._register_load_state_dict_pre_hook(_load_skeleton_indices, with_module=True)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return PmssLayer.forward(self, x, *args, **kwargs)

    def __repr__(self) -> str:
        return "pmss." + nn.Module.__repr__(self)


class PmssModel(StructuredTuner):
    """PMSS tuner (see :class:`PmssConfig`)."""

    prefix: str = "pmss_"
    tuner_layer_cls = PmssLayer
    wrapper_cls = PmssWrapper

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """As the base class; first, where a loaded state dict re-gathered a layer's skeleton at other indices
        (see :func:`_load_skeleton_indices`), the config's record of that layer is brought up to date (indices,
        checksum, sketch of the unmerged W₀), so the ``adapter_config.json`` written next matches the weights."""
        for module in model.modules():
            if isinstance(module, PmssLayer) and adapter_name in module.operators:
                rec = (config.layer_options or {}).get(module.module_path)
                op = cast(SkeletonOperator, module.operators[adapter_name])
                if rec is None or (
                    rec["options"]["col_idx"] == op.col_idx.tolist()
                    and rec["options"]["row_idx"] == op.row_idx.tolist()
                ):
                    continue
                selection = _selection_record(module.unmerged_weight_2d(), op.col_idx.cpu(), op.row_idx.cpu())
                rec["options"] = {**rec["options"], **selection}
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        # per module, the selection (or the verified recorded one) of this injection: _prepare_model's validation
        # and _create_and_replace share it, so nothing is selected or checksummed twice
        self._selection_cache: dict[str, dict[str, Any]] = {}
        super()._prepare_model(peft_config, model)

    def resolve_layer(
        self, config: PmssConfig, key: str, base: nn.Module, record: bool = True, weight: torch.Tensor | None = None
    ) -> dict[str, Any]:
        shape = delta_shape(base)
        # the skeleton and its checksum are of the pretrained W₀, also where another adapter is merged into W
        w2d = weight if weight is not None else weight_2d(base)
        rec = self.check_recorded_shape(config, key, shape)
        cached = self._selection_cache.get(key)
        if rec is not None:
            options = rec["options"]
            if cached is not options:
                same, what = _same_factors(w2d, options)
                if not same:
                    raise BaseModelMismatchError(
                        f"module {key!r}: the selected columns / rows of this base model's weight differ from the "
                        f"ones the PMSS adapter was created on ({what}); load it onto the base model it was "
                        "trained on"
                    )
                self._selection_cache[key] = options
            return options
        if cached is None:
            k_in, k_out = config.layer_k(*shape)
            cols, rows = select_skeleton(w2d, k_in, k_out, config.selection, seed=config.seed)
            cached = {"k_in": k_in, "k_out": k_out, **_selection_record(w2d, cols, rows)}
            self._selection_cache[key] = cached
        if record:
            compute = {"delta": self._choose_compute(config, shape, cached, base)}
            config.layer_options[key] = {"shape": list(shape), "options": cached, "compute": compute}
        return cached

    @staticmethod
    def _choose_compute(config: PmssConfig, shape: tuple[int, int], options: dict[str, Any], base: nn.Module) -> str:
        """The configured compute mode, or for 'auto' the measured one (see :mod:`structpeft.operators.dispatch`;
        timed on a random weight of the layer's shape with the layer's k_in, k_out, cached per shape)."""
        if config.compute != "auto":
            return config.compute
        from ..operators.dispatch import choose_compute_for

        out_features, in_features = shape
        k_in, k_out = options["k_in"], options["k_out"]

        def make() -> SkeletonOperator:
            w = torch.randn(out_features, in_features) * in_features**-0.5
            op = SkeletonOperator(w, torch.arange(k_in), torch.arange(k_out))
            op.reset_parameters(False)
            return op

        key = ("skeleton", out_features, in_features, k_in, k_out)
        tokens = config.compute_tokens
        keep = config.keep_folded_weight
        return measure_compute(
            base, lambda d: choose_compute_for(key, make, *shape, device=d, tokens=tokens, keep=keep)
        )
