"""PEFT configs of structpeft's methods.

``SurmConfig`` (SURM: ΔW is a structured matrix) — and, in :mod:`structpeft.peft.pmss`, ``PmssConfig`` —
are ``peft.PeftConfig`` dataclasses: every field has help text, values are validated in ``__post_init__`` with
errors that name the bad value and the valid choices, and ``layer_options`` records what was resolved for each
targeted module (its shape and structure options) so that a saved adapter is rebuilt exactly and loading it onto
a base model with other shapes is refused before anything is modified.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

from peft.config import PeftConfig

from ..errors import ConfigError
from ..operators import OPERATORS, get_operator_class
from ..operators.dispatch import DEFAULT_COMPUTE_TOKENS

if TYPE_CHECKING:
    from ..operators.kronecker import KroneckerOperator

    # the mixin is always combined with PeftConfig (``class SurmConfig(StructPeftConfigMixin, PeftConfig)``): typed as
    # its subclass, so that its ``super()`` calls resolve to PeftConfig's methods
    _MixinBase = PeftConfig
else:
    _MixinBase = object


class MethodName(str):
    """A method's ``peft_type``: a plain string (PEFT's ``PeftType`` enum cannot be extended from outside) that also
    answers ``.value`` as the enum's members do, for the PEFT code paths that format ``peft_type.value`` (e.g. the
    "not compatible with PeftMixedModel" error)."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str(self)


SURM_PEFT_TYPE = MethodName("SURM")

# structure -> the structure-specific config fields it uses (the others must stay None), from the registry: each
# operator class names its options; every option is a SurmConfig field of the same name (a test checks it)
SURM_STRUCTURE_FIELDS: dict[str, tuple[str, ...]] = {name: cls.option_names for name, cls in OPERATORS.items()}
STRUCTURE_OPTION_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(f for fs in SURM_STRUCTURE_FIELDS.values() for f in fs))
PLACEMENTS = ("lora", "adapter")
# fields a resumed run may set differently from its checkpoint (StructPeftConfigMixin.for_resume): where it trains
# is checked against the record when the model is built, the compute settings are per process, and the initial
# values are replaced by the checkpoint's
_RESUME_FREE_FIELDS = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "layer_options",
    "compute",
    "compute_tokens",
    "fold_inference",
    "keep_folded_weight",
    "init_weights",
)


def _json_default(value: Any) -> Any:
    """``json.dumps``'s fallback for config values: a set as PEFT writes it (target_modules: a list), else TypeError."""
    if isinstance(value, set):
        return sorted(value, key=str)
    raise TypeError(f"{value!r} ({type(value).__name__})")


def _check_number(name: str, value: Any, *, low: float, high: float, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name}={value!r} is invalid: expected a finite number in [{low}, {high}{bracket}")


def _check_target_modules(value: Any, name: str = "target_modules") -> None:
    if value is None:
        return
    if isinstance(value, str):  # a regex (full match), or PEFT's 'all-linear'
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{name}={value!r} is not a valid regular expression ({err})") from None
        return
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        if not value:
            raise ConfigError(f"{name}={value!r} is empty: give module names, a regex string, or 'all-linear'")
        return
    raise ConfigError(f"{name}={value!r} is invalid: expected a list of module names, a regex string, or None")


COMPUTE_HELP = (
    "'auto': per layer, time once the structured product ('fast'; PMSS: W[J, :]x read from the base output), a "
    "materialised ΔW folded into the base weight ('dense': one matmul with W + alpha·ΔW, the adapter's gradient "
    "through it) and the same fold with the adapter's gradient computed through the structure ('hybrid', "
    "ΔW-placed layers), and use the fastest (recorded in layer_options, so a loaded adapter uses the same); "
    "'fast' / 'dense' / 'hybrid' force one."
)


COMPUTE_TOKENS_HELP = (
    "compute='auto': the number of rows (tokens: batch × sequence length of a training batch) each layer's two "
    "paths are timed on; the faster path can change with it. Default 2048."
)


FOLD_INFERENCE_HELP = (
    "True: in inference (no gradient through the adapter), also layers that train with the structured product "
    "(compute 'fast') run one matmul with W + alpha·ΔW, built once and cached until a weight changes: the base "
    "layer's speed for one extra weight copy per such layer (what 'dense' layers always do). False (default): "
    "they keep the structured product and its memory."
)


KEEP_FOLDED_WEIGHT_HELP = (
    "Training of layers with compute 'dense' / 'hybrid' (the fold W + alpha·ΔW in one matmul): True builds W + "
    "alpha·ΔW (and, for 'dense', ΔW with its autograd graph) once per step, in the forward, and keeps it for the "
    "backward: one (out × in) matrix per such layer held between forward and backward (Toeplitz / LDR 'dense': "
    "their factor stacks too, about one more per factor), for one ΔW build less per step. False (default): only the "
    "layer input is kept and the fold is built again in the backward. The results are the same bit for bit."
)


def _check_compute(
    value: Any, tokens: Any = DEFAULT_COMPUTE_TOKENS, fold_inference: Any = False, keep_folded_weight: Any = False
) -> None:
    from ..operators.dispatch import COMPUTE_MODES

    if value not in COMPUTE_MODES:
        raise ConfigError(f"compute={value!r} is invalid; valid: {', '.join(COMPUTE_MODES)}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"compute_tokens={tokens!r} is invalid: expected an integer >= 1 (batch × sequence length)")
    if not isinstance(fold_inference, bool):
        raise ConfigError(f"fold_inference={fold_inference!r} is invalid: expected True or False")
    if not isinstance(keep_folded_weight, bool):
        raise ConfigError(f"keep_folded_weight={keep_folded_weight!r} is invalid: expected True or False")


class StructPeftConfigMixin(_MixinBase):
    """Shared behaviour of structpeft configs: adapter-file validation on ``from_pretrained``."""

    param_prefix: ClassVar[str] = ""
    if TYPE_CHECKING:  # fields of both configs (dataclass fields there) that the shared checks read and normalise
        target_modules: list[str] | set[str] | str | None
        exclude_modules: list[str] | set[str] | str | None
        layers_to_transform: list[int] | int | None
        layers_pattern: list[str] | str | None
        modules_to_save: list[str] | None
        budget: str | int | None
        compute: str
        layer_options: dict[str, dict[str, Any]]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load the config; for a local adapter folder also validate ``adapter_model.safetensors`` first.

        The file check happens here because PEFT reads the config before it touches the model: a truncated,
        foreign or non-finite weights file is refused with :class:`~structpeft.errors.AdapterFileError` while the
        base model is still unmodified.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = str(pretrained_model_name_or_path)
        if subfolder:
            folder = os.path.join(folder, subfolder)
        if not isinstance(config, cls):  # PEFT builds the class its peft_type names (e.g. a LoRA folder: LoraConfig)
            from ..errors import AdapterFileError

            found = getattr(config, "peft_type", None)
            found = getattr(found, "value", found)
            wanted = cls.__name__.removesuffix("Config").upper()
            raise AdapterFileError(
                f"{folder} holds a {found} adapter (adapter_config.json), not a {wanted} one; load it with its own "
                "config class, or with PeftModel.from_pretrained"
            )
        if os.path.isdir(folder):
            from .io import validate_adapter_folder

            validate_adapter_folder(folder, config)
        return config

    def for_resume(self, checkpoint: str | os.PathLike[str]) -> Any:
        """A copy of this config that rebuilds the layers as ``checkpoint`` (an adapter folder or a ``Trainer``
        checkpoint, holding ``adapter_config.json``) recorded them: its ``layer_options`` (each targeted module's
        resolved options and, for ``compute="auto"``, the path that was timed and chosen then).

        Resuming loads only the weights into the model you built (``Trainer`` calls ``load_adapter`` under the
        existing adapter name, which does not read the checkpoint's config), so ``compute="auto"`` would time the
        paths again in the new process and may pick another one: training then continues with other rounding than
        an uninterrupted run. ``get_peft_model(base, config.for_resume(ckpt))`` keeps the recorded paths; a forced
        ``compute`` ("fast" / "dense" / "hybrid") still applies to every layer. The fields that decide the
        layers (structure, budget, sizes, selection, ...) must equal the checkpoint's, else :class:`ConfigError`
        naming them; the target modules are checked against the record when the model is built. This config is
        not modified."""
        import copy
        from dataclasses import fields

        folder = os.fspath(checkpoint)
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise ConfigError(
                f"checkpoint={folder!r} holds no adapter_config.json; expected a folder written by save_pretrained "
                "or a Trainer checkpoint-N folder"
            )
        saved = type(self).from_pretrained(folder)  # AdapterFileError for another method or a broken weights file
        skip = {f.name for f in fields(PeftConfig)} | set(_RESUME_FREE_FIELDS)

        def plain(config: Any) -> dict[str, Any]:
            values = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in skip}
            return json.loads(json.dumps(values, default=_json_default))

        mine, theirs = plain(self), plain(saved)
        differ = [name for name in mine if mine[name] != theirs.get(name)]
        if differ:
            listed = "; ".join(f"{n}={mine[n]!r} here, {theirs.get(n)!r} in the checkpoint" for n in differ)
            raise ConfigError(
                f"{folder} was trained with another adapter ({listed}); resume with the checkpoint's values, or start "
                "a fresh run"
            )
        resumed = copy.deepcopy(self)
        resumed.layer_options = copy.deepcopy(saved.layer_options)
        if self.compute != "auto":  # forced: as get_peft_model applies it, to every operator of every layer
            for rec in resumed.layer_options.values():
                rec["compute"] = {role: self.compute for role in rec.get("compute") or self._operator_roles(rec)}
        return resumed

    def _operator_roles(self, record: dict[str, Any]) -> tuple[str, ...]:
        """The operator roles of a ``layer_options`` record (one ΔW: "delta")."""
        return ("delta",)

    def _validate_common(self) -> None:
        """The checks both methods share: the target / exclude module selectors (lists become sets, as PEFT keeps
        them), a regex selector must compile, and PEFT's own selector fields must have their documented types."""
        _check_target_modules(self.target_modules)
        _check_target_modules(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        lt = self.layers_to_transform
        ints = isinstance(lt, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in lt)
        if lt is not None and not ints and (isinstance(lt, bool) or not isinstance(lt, int)):
            raise ConfigError(f"layers_to_transform={lt!r} is invalid: expected a layer index, a list of them, or None")
        lp = self.layers_pattern
        if (
            lp is not None
            and not isinstance(lp, str)
            and not (isinstance(lp, (list, tuple)) and lp and all(isinstance(x, str) for x in lp))
        ):
            raise ConfigError(
                f"layers_pattern={lp!r} is invalid: expected a name (e.g. 'layers'), a list of them, or None"
            )
        ms = self.modules_to_save
        if ms is not None and not (isinstance(ms, (list, tuple, set)) and all(isinstance(x, str) for x in ms)):
            raise ConfigError(f"modules_to_save={ms!r} is invalid: expected a list of module names or None")

    def _check_layer_options(self, required: tuple[str, ...] = ()) -> None:
        """``layer_options`` (written by ``get_peft_model``, read back from adapter_config.json) has its documented
        form: {module path: {"shape": [out, in], "options": {...} (holding ``required``), "compute": {role: mode}}}.
        An edited or foreign file is refused here, naming the entry, instead of failing while the model is built."""
        from ..operators.dispatch import COMPUTE_MODES

        records = self.layer_options
        if not isinstance(records, dict):
            raise ConfigError(
                f"layer_options={records!r} is invalid: expected {{module path: record}} as get_peft_model writes it"
            )
        for key, rec in records.items():
            problem = None
            if not isinstance(key, str) or not isinstance(rec, dict):
                problem = "expected a module path mapped to {'shape': [out, in], 'options': {...}}"
            elif not (
                isinstance(rec.get("shape"), (list, tuple))
                and len(rec["shape"]) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in rec["shape"])
            ):
                problem = f"shape={rec.get('shape')!r}, expected [out, in] (two integers >= 1)"
            elif not isinstance(rec.get("options"), dict):
                problem = f"options={rec.get('options')!r}, expected a dict"
            elif missing := [name for name in required if name not in rec["options"]]:
                problem = f"options lack {missing}"
            elif "compute" in rec and not (
                isinstance(rec["compute"], dict)
                and all(v in COMPUTE_MODES and v != "auto" for v in rec["compute"].values())
            ):
                valid = ", ".join(m for m in COMPUTE_MODES if m != "auto")
                problem = f"compute={rec['compute']!r}, expected {{role: one of {valid}}}"
            if problem is not None:
                raise ConfigError(
                    f"layer_options[{key!r}] is invalid ({problem}); get_peft_model writes it: use the saved "
                    "adapter_config.json unchanged, or a fresh config"
                )

    def _normalise_budget(self) -> None:
        """Check ``budget`` and store an integer one as a plain int (a numpy integer is accepted but cannot be
        written to adapter_config.json)."""
        from ..budget import ParameterBudget, parse_budget

        if self.budget is None:
            return
        parsed = parse_budget(self.budget)
        if not isinstance(self.budget, str):
            # a ParameterBudget as its string form ('lora-8' / '5000'), JSON-writable like the others
            self.budget = str(parsed) if isinstance(self.budget, ParameterBudget) else operator.index(self.budget)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save ``adapter_config.json`` as PEFT does, then write / update the folder's model card (``README.md``)
        with the method, structure, parameter count and base model (see :mod:`structpeft.peft.card`).

        ``PeftModel.save_pretrained`` calls this on the main process only, after writing the weights file. A value
        that JSON cannot hold (set on the config after it was used) is a :class:`ConfigError` before the file is
        opened, so an existing ``adapter_config.json`` is not truncated."""
        try:
            json.dumps(self.to_dict(), default=_json_default)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"the config cannot be written to adapter_config.json: {err} is not a JSON value; set the field to a "
                "plain int / float / str / list"
            ) from None
        super().save_pretrained(save_directory, **kwargs)
        from .card import write_model_card

        write_model_card(str(save_directory), self)

    def expected_tensors(self) -> dict[str, dict[str, tuple[tuple[int, ...], bool]]]:
        """Per recorded layer: {parameter name under the adapter container: (shape, required)}."""
        raise NotImplementedError


@dataclass
class SurmConfig(StructPeftConfigMixin, PeftConfig):
    """Configuration of SURM (Structured Unrestricted-Rank Matrices, Sehanobish et al., NeurIPS 2024).

    Each targeted layer computes ``y = base(x) + alpha · ΔW · dropout(x)`` where ΔW (out × in) is the structured
    matrix named by ``structure`` (see :mod:`structpeft.operators`). ΔW = 0 at initialisation.
    """

    param_prefix: ClassVar[str] = "surm_"

    structure: str = field(
        default="circulant",
        metadata={"help": f"Structure of ΔW, one of {sorted(OPERATORS)}."},
    )
    target_modules: list[str] | set[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or a regex (full match) of the layers to adapt, or 'all-linear'. "
            "None uses the preset for the model type (BERT: query, value; LLaMA: q_proj, v_proj; GPT-2: c_attn)."
        },
    )
    exclude_modules: list[str] | set[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of layers NOT to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (needs a layer pattern)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers', 'h') for layers_to_transform."},
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "Scale s in W + s·ΔW (the same convention for every structure; no division by a rank)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input, in [0, 1)."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the paper's init with ΔW = 0 (the model is unchanged). False: random non-zero ΔW "
            "(for tests and ablations only)."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "circulant / toeplitz / ldr: side b of the square blocks tiling ΔW (ceil(out/b)·ceil(in/b) "
            "blocks, padded and cropped). None: one block of side max(out, in). Larger b: fewer parameters."
        },
    )
    num_factors: int | None = field(
        default=None,
        metadata={"help": "toeplitz: number of Toeplitz factors multiplied in each block (default 2, the paper's)."},
    )
    displacement_rank: int | None = field(
        default=None,
        metadata={"help": "ldr: displacement rank r >= 1, the number of circulant × skew-circulant terms (default 1)."},
    )
    factor_shape: list[int] | None = field(
        default=None,
        metadata={
            "help": "kronecker: shape (o1, i1) of the first factor L of ΔW = L ⊗ R; None picks the most balanced "
            "factorisation (about sqrt(out) × sqrt(in))."
        },
    )
    budget: str | int | None = field(
        default=None,
        metadata={
            "help": "Choose each layer's size option (block size or factor shape) to use at most this many "
            "trainable parameters per layer: 'lora-R' (as many as LoRA rank R: R·(in + out)) or an integer. "
            "Exclusive with block_size / factor_shape."
        },
    )
    compute: str = field(default="auto", metadata={"help": COMPUTE_HELP})
    compute_tokens: int = field(default=DEFAULT_COMPUTE_TOKENS, metadata={"help": COMPUTE_TOKENS_HELP})
    fold_inference: bool = field(default=False, metadata={"help": FOLD_INFERENCE_HELP})
    keep_folded_weight: bool = field(default=False, metadata={"help": KEEP_FOLDED_WEIGHT_HELP})
    placement: str = field(
        default="lora",
        metadata={
            "help": "'lora': ΔW is added to the targeted layer's weight (SURM-LoRA). 'adapter': a structured "
            "adapter is applied to the layer's output, h + s·act(S·h) + bias (SURM-Adapter)."
        },
    )
    activation: str = field(
        default="identity",
        metadata={
            "help": "adapter placement: activation act, one of identity, gelu, relu, silu, tanh. Only identity "
            "can be merged. relu with the zero init never trains S (relu'(0) = 0)."
        },
    )
    adapter_form: str = field(
        default="square",
        metadata={
            "help": "adapter placement: 'square' (one n × n structured S, the paper's circulant adapter) or "
            "'bottleneck' (S_up · act(S_down · h) with S_down: bottleneck × n)."
        },
    )
    bottleneck: int | None = field(
        default=None,
        metadata={"help": "adapter_form='bottleneck': the inner width m (required there, < n)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules (e.g. a classifier head) that are fully trained and saved with the adapter."},
    )
    layer_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Filled in when the adapter is created: per targeted module, its (out, in) shape and the "
            "resolved structure options. Loading uses these and refuses a base model whose shapes differ."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SURM_PEFT_TYPE
        self.validate()

    def validate(self) -> None:
        """Check every field (:class:`ConfigError` naming the bad value and the valid choices). Run on construction
        and again by ``get_peft_model`` / ``add_adapter`` before the model is touched, so values set on the config
        after construction (PEFT's documented pattern) are checked too."""
        get_operator_class(self.structure)  # UnknownStructureError naming the valid structures
        self._validate_common()
        self._check_layer_options()
        for key, rec in self.layer_options.items():  # SURM: {operator role: that operator's options}
            if not all(isinstance(role, str) and isinstance(o, dict) for role, o in rec["options"].items()):
                raise ConfigError(
                    f"layer_options[{key!r}] is invalid (options={rec['options']!r}, expected {{operator role: "
                    "options dict}}); get_peft_model writes it: use the saved adapter_config.json unchanged, or a "
                    "fresh config"
                )
        _check_number("alpha", self.alpha, low=-1e6, high=1e6)
        _check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights={self.init_weights!r} is invalid: expected True or False")
        self._check_placement()
        _check_compute(self.compute, self.compute_tokens, self.fold_inference, self.keep_folded_weight)
        used = SURM_STRUCTURE_FIELDS[self.structure]
        for name in STRUCTURE_OPTION_FIELDS:
            if getattr(self, name) is not None and name not in used:
                users = [s for s, f in SURM_STRUCTURE_FIELDS.items() if name in f]
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} does not apply to structure {self.structure!r} "
                    f"(it is an option of {', '.join(users)}); options of {self.structure!r}: {', '.join(used)}"
                )
        if self.budget is not None:
            self._normalise_budget()
            for name in ("block_size", "factor_shape"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"budget={self.budget!r} and {name}={getattr(self, name)!r} both set the layer size; "
                        "give one of them"
                    )
        # validates block_size / num_factors / displacement_rank / factor_shape values on a probe shape
        probe = self.structure_options()
        if "factor_shape" in probe and probe["factor_shape"] is not None:
            fs = probe["factor_shape"]
            if not isinstance(fs, (list, tuple)) or len(fs) != 2:
                raise ConfigError(f"factor_shape={fs!r} is invalid: expected a pair [o1, i1] or None")
            kronecker = cast("type[KroneckerOperator]", get_operator_class(self.structure))  # factor_shape's structure
            kronecker.resolve_factor_shape(max(fs[0], 1), max(fs[1], 1), fs)
        else:
            get_operator_class(self.structure).num_parameters(8, 8, **probe)

    def _check_placement(self) -> None:
        from .adapter import ACTIVATIONS, ADAPTER_FORMS

        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement={self.placement!r} is invalid; valid: {', '.join(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} is invalid; valid: {', '.join(ACTIVATIONS)}")
        if self.adapter_form not in ADAPTER_FORMS:
            raise ConfigError(f"adapter_form={self.adapter_form!r} is invalid; valid: {', '.join(ADAPTER_FORMS)}")
        if self.placement == "lora":
            for name, default in (
                ("activation", "identity"),
                ("adapter_form", "square"),
                ("bottleneck", None),
            ):
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{name}={getattr(self, name)!r} applies to placement='adapter' only (placement is 'lora')"
                    )
            return
        if self.adapter_form == "bottleneck":
            if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
                raise ConfigError(
                    f"bottleneck={self.bottleneck!r} is invalid: adapter_form='bottleneck' needs an integer width >= 1"
                )
        elif self.bottleneck is not None:
            raise ConfigError(
                f"bottleneck={self.bottleneck!r} needs adapter_form='bottleneck' (adapter_form is 'square', "
                "which has no inner width)"
            )

    def expected_tensors(self) -> dict[str, dict[str, tuple[tuple[int, ...], bool]]]:
        import torch

        from .surm_layer import build_surm_module

        expected = {}
        for key, rec in self.layer_options.items():
            out_features, in_features = rec["shape"]
            with torch.device("meta"):
                module = build_surm_module(self, rec["options"], out_features, in_features, with_bias=True)
            # the adapter block's bias exists only when the base layer has one: optional here
            expected[key] = {
                name: (tuple(p.shape), not (self.placement == "adapter" and name == "bias"))
                for name, p in module.named_parameters()
            }
        return expected

    def _operator_roles(self, record: dict[str, Any]) -> tuple[str, ...]:
        """SURM records options per operator role ("delta"; "op"; "down" / "up")."""
        return tuple(record["options"])

    def structure_options(self) -> dict[str, Any]:
        """The structure-specific options the user set (block size etc.), without the resolved per-layer ones."""
        return {
            name: getattr(self, name)
            for name in SURM_STRUCTURE_FIELDS[self.structure]
            if getattr(self, name) is not None
        }
