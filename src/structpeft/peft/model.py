"""PEFT tuners (``BaseTuner`` subclasses) of structpeft's methods.

``StructuredTuner`` holds what every method shares: validation of every targeted module *before* the model is
modified (no match, unsupported type, shapes that differ from the ones recorded in a saved adapter, sizes that do
not fit), creation of the shared layer wrapper, and recording of the resolved per-layer options in the config.
A method subclass names its prefix, its layer class and how it resolves a layer's options.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    _maybe_include_all_linear_layers,
)
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.integrations import _skip_init_on_device
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..errors import (
    BaseModelMismatchError,
    ConfigError,
    MixedBatchError,
    ShapeError,
    StateDictError,
    TargetModulesError,
    UnsupportedLayerError,
)
from ..operators import get_operator_class
from .config import SurmConfig
from .layer import MIXED_BATCH_BASE, StructuredLayer, base_weight, delta_shape
from .surm_layer import SurmLayer, SurmWrapper

TARGET_PRESETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}
# SURM-Adapter: after the attention output projection and after the FFN output (Houlsby positions)
ADAPTER_PRESETS: dict[str, list[str]] = {
    "bert": ["attention.output.dense", "output.dense"],
    "roberta": ["attention.output.dense", "output.dense"],
    "distilbert": ["out_lin", "lin2"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "llama": ["o_proj", "down_proj"],
    "mistral": ["o_proj", "down_proj"],
    "qwen2": ["o_proj", "down_proj"],
    "gemma": ["o_proj", "down_proj"],
}


# attribute names under which wrappers hold a submodule while dropping the segment from their state-dict keys: FSDP1's
# FullyShardedDataParallel and torch's activation checkpoint / offload wrappers (torch.compile's "_orig_mod" stays in
# the keys, so it is not one of them)
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def state_dict_name(module_name: str) -> str:
    """``module_name`` as state-dict keys spell it: without the segments of wrappers that hide themselves there
    (``blocks.0._checkpoint_wrapped_module.fc1`` -> ``blocks.0.fc1``)."""
    return ".".join(part for part in module_name.split(".") if part not in WRAPPER_SEGMENTS)


@functools.cache
def _reserved_adapter_names() -> frozenset[str]:
    """Names of the parameters and sub-modules inside the operators and adapter blocks (computed once)."""
    from ..operators import OPERATORS

    names = {"ops", "op", "up", "down", "bias", "core", "act"}
    with torch.device("meta"):
        for cls in OPERATORS.values():
            names.update(name for name, _ in cls(4, 4).named_parameters())
    return frozenset(names)


def _describe_candidates(model: nn.Module, limit: int = 12) -> str:
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and not list(m.children())})
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def measure_compute(base: nn.Module, choose: Callable[[torch.device | str], str]) -> str:
    """Run a layer's compute-path timing, ``choose(device)`` (see :mod:`structpeft.operators.dispatch`), on the
    base weight's device (the CPU for a meta base). The timing runs a backward on real tensors: also under
    torch.no_grad / inference_mode, and under PEFT's low_cpu_mem_usage (which puts new parameters on meta)."""
    weight = base_weight(base)
    device = weight.device if weight.device.type != "meta" else "cpu"
    with _skip_init_on_device(), torch.inference_mode(False), torch.enable_grad():
        return choose(device)


class StructuredTuner(BaseTuner):
    """Shared tuner logic; subclasses set ``prefix``, ``tuner_layer_cls``, ``wrapper_cls``, ``resolve_layer``."""

    tuner_layer_cls: type[StructuredLayer]
    wrapper_cls: type[nn.Module]
    target_module_mapping = TARGET_PRESETS

    def target_presets(self, config: Any) -> dict[str, list[str]]:
        """model type -> default target_modules for this config."""
        return TARGET_PRESETS

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        """``target_modules=None``: the preset of the model type (:meth:`target_presets`). (The config was checked
        again by :meth:`inject_adapter`.)"""
        if peft_config.target_modules is None:
            presets = self.target_presets(peft_config)
            model_type = model_config.get("model_type")
            if model_type not in presets:
                raise TargetModulesError(
                    f"no target_modules preset for model type {model_type!r} (presets: "
                    f"{', '.join(sorted(presets))}); give target_modules"
                )
            peft_config.target_modules = set(presets[model_type])
        return peft_config

    # ------------------------------------------------------------------------------------ per-method hooks
    def resolve_layer(
        self, config: Any, key: str, base: nn.Module, record: bool = True, weight: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The resolved options for the module at ``key`` (recorded in ``config.layer_options[key]`` if ``record``).
        ``weight``: the unmerged base weight (out × in') where the module has merged adapters (methods whose options
        depend on W read it instead of the merged one), else None."""
        raise NotImplementedError

    @staticmethod
    def _unmerged_weight(module: nn.Module) -> torch.Tensor | None:
        """W₀ of a structured layer with merged adapters (see :meth:`StructuredLayer.unmerged_weight_2d`), else None."""
        if isinstance(module, StructuredLayer) and module.merged_adapters:
            return module.unmerged_weight_2d()
        return None

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: drop the adapter name after ``<prefix>op`` also for nested modules
        (an adapter block's ``ops.op.weight``), where PEFT's default only drops a second-to-last component."""
        container = f".{cls.prefix}op.{adapter_name}."
        if container in key:
            return key.replace(container, f".{cls.prefix}op.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """The entries of ``state_dict`` that belong to the adapter: everything under a tuner layer except its
        ``base_layer``, as PEFT selects them, with the layer names spelled as state-dict keys spell them.

        PEFT (0.21) names the layers by ``named_modules()``, which keeps the segments of nested wrappers
        (``_fsdp_wrapped_module`` of FSDP1 units below the root, ``_checkpoint_wrapped_module`` of
        ``apply_activation_checkpointing``) that the state dict drops, so it selected nothing and wrote an empty
        adapter there; :func:`state_dict_name` drops them. A non-empty ``state_dict`` of which nothing is selected
        raises :class:`~structpeft.StateDictError` instead of saving an empty adapter (an empty one is what
        other ranks get from a rank-0-only full state dict, and they save nothing)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # PEFT's own prefixes (named_modules() spelling), respelled as the state dict spells them
        prefixes = {state_dict_name(p) for p in _get_tuner_state_dict_key_prefixes(model)}
        selected.update(_filter_state_dict_by_key_prefixes(state_dict, prefixes))
        if state_dict and prefixes and not selected:
            sample = ", ".join(sorted(state_dict)[:3])
            raise StateDictError(
                f"the state dict to save ({len(state_dict)} entries, e.g. {sample}) holds none of adapter "
                f"{adapter_name!r}'s {cls.prefix}* tensors (e.g. under {min(prefixes)}); pass the whole model's "
                "state dict (under FSDP: torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                "options=StateDictOptions(full_state_dict=True))), or none"
            )
        return selected

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Check the config again (values set after construction; PEFT's own pre-checks would fail on bad ones
        with unrelated errors) and refuse adapter names that collide with names inside the adapter modules, then
        inject as PEFT does."""
        config = self.peft_config.get(adapter_name)
        if config is not None and hasattr(config, "validate"):
            config.validate()
        reserved = _reserved_adapter_names()
        if adapter_name in reserved:
            raise ConfigError(
                f"adapter name {adapter_name!r} is also the name of a tensor or module inside structpeft's adapter "
                f"modules ({', '.join(sorted(reserved))}); PEFT's key mapping would confuse them: choose another name"
            )
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    # ------------------------------------------------------------------------------- mixed-adapter batches
    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``model(..., adapter_names=[...])``: validate the names, then inject them into the forward of every
        structured layer and ``modules_to_save`` wrapper for the duration of the call (PEFT's LoRA protocol;
        with ``num_beams`` > 1 each name is repeated per beam, except in an encoder)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise MixedBatchError(
                "adapter_names (a mixed-adapter batch) is for inference only, but the model is in training mode: "
                "call model.eval() first"
            )
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise MixedBatchError(
                f"adapter_names={adapter_names!r} is invalid: expected a list with one adapter name (str) per example"
            )
        known = set()
        for _, layer in self.structured_layers():
            known |= set(layer.operators)
        unknown = sorted({n for n in adapter_names if n != MIXED_BATCH_BASE} - known)
        if unknown:
            raise MixedBatchError(
                f"adapter_names names adapter(s) {unknown} that this model does not hold; valid: "
                f"{', '.join(sorted(known))} and {MIXED_BATCH_BASE!r} (no adapter)"
            )
        names = list(adapter_names)
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            names = [n for n in names for _ in range(num_beams)]

        def inject(module: nn.Module, values: list[str]) -> None:
            def hook(_module: nn.Module, hook_args: tuple, hook_kwargs: dict) -> tuple[tuple, dict]:
                return hook_args, {**hook_kwargs, "adapter_names": values}

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

        handles: list[Any] = []
        try:
            for module in self.model.modules():
                if self._takes_adapter_names(module):
                    inject(module, names)
            encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
            if len(names) != len(adapter_names) and encoder is not None and encoder is not self.model:
                # the encoder runs once per input (not per beam): its hooks, registered last, override
                for module in encoder.modules():
                    if self._takes_adapter_names(module):
                        inject(module, list(adapter_names))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _takes_adapter_names(self, module: nn.Module) -> bool:
        """True for the modules whose forward takes ``adapter_names``: structured layers, ``modules_to_save``."""
        return isinstance(module, (self.tuner_layer_cls, AuxiliaryTrainingWrapper))

    # --------------------------------------------------------------------------------------- validation
    def _targets(self, config: Any, model: nn.Module) -> list[tuple[str, nn.Module]]:
        existing = [k for k, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        found = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(e + ".") for e in existing):
                continue
            if self._check_target_module_exists(config, key):
                found.append((key, module))
        return found

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        """Validate every target before anything is replaced (PEFT calls this before injecting)."""
        all_linear = peft_config.target_modules == INCLUDE_LINEAR_LAYERS_SHORTHAND
        _maybe_include_all_linear_layers(peft_config, model)
        # nn.MultiheadAttention reads out_proj.weight itself and never calls out_proj's forward: an adapter there
        # would have no effect. 'all-linear' skips those layers; naming one explicitly is an error (below).
        unreachable = {
            f"{name}.out_proj" if name else "out_proj"
            for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)
        }
        if all_linear and unreachable and not isinstance(peft_config.exclude_modules, str):
            peft_config.exclude_modules = set(peft_config.exclude_modules or ()) | unreachable
        targets = self._targets(peft_config, model)
        if not targets:
            raise TargetModulesError(self._no_match_message(peft_config, model))
        recorded = set(peft_config.layer_options)
        if recorded:
            found = {key for key, _ in targets}
            missing, extra = sorted(recorded - found), sorted(found - recorded)
            if missing or extra:
                raise BaseModelMismatchError(
                    "the model's targeted modules differ from the ones recorded in the config's layer_options "
                    f"(from the saved adapter, or from the model this config was first used with): "
                    f"recorded but not in this model: {missing[:5]}; in this model but not recorded: {extra[:5]}. "
                    "Load the adapter onto the base model it was trained on, or use a fresh config"
                )
        for key, module in targets:
            if key in unreachable:
                raise UnsupportedLayerError(
                    f"target module {key!r} is the output projection of an nn.MultiheadAttention, which reads its "
                    "weight directly and never calls its forward: an adapter there would have no effect; leave it "
                    "out (exclude_modules) or target other layers"
                )
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            try:
                delta_shape(base)
                self.resolve_layer(peft_config, key, base, record=False, weight=self._unmerged_weight(module))
            except BaseModelMismatchError:
                raise
            except (TypeError, ValueError) as err:  # name the module in size / type errors
                raise type(err)(f"target module {key!r}: {err}") from None

    def _no_match_message(self, config: Any, model: nn.Module) -> str:
        """Why no module was targeted: target_modules matched none, or the filters (layers_to_transform /
        layers_pattern, exclude_modules) removed every match, named with what they removed."""
        wanted = config.target_modules
        wanted = sorted(wanted) if isinstance(wanted, set) else wanted
        unfiltered = copy.copy(config)
        unfiltered.layers_to_transform, unfiltered.layers_pattern, unfiltered.exclude_modules = None, None, None
        matched = [key for key, _ in self._targets(unfiltered, model)]
        if not matched:
            return (
                f"target_modules={wanted!r} matched no module of the model; leaf module names in this model: "
                f"{_describe_candidates(model)}"
            )
        filters = ", ".join(
            f"{name}={getattr(config, name)!r}"
            for name in ("layers_to_transform", "layers_pattern", "exclude_modules")
            if getattr(config, name) is not None
        )
        return (
            f"target_modules={wanted!r} matched {len(matched)} module(s) (e.g. {matched[:3]}), but {filters} "
            "removed every one of them; check them against those paths"
        )

    @staticmethod
    def check_recorded_shape(config: Any, key: str, shape: tuple[int, int]) -> dict[str, Any] | None:
        rec = config.layer_options.get(key)
        if rec is None:
            return None
        if tuple(rec["shape"]) != tuple(shape):
            raise BaseModelMismatchError(
                f"module {key!r} has ΔW shape {tuple(shape)} in this base model but the config's layer_options "
                f"record shape {tuple(rec['shape'])} (from the saved adapter, or from the model this config was "
                "first used with): load the adapter onto the base model it was trained on, or use a fresh config"
            )
        return rec

    # --------------------------------------------------------------------------------------------- creation
    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        options = self.resolve_layer(peft_config, current_key, base, record=True, weight=self._unmerged_weight(target))
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, options=options)
            return
        new_module = self.wrapper_cls(target, adapter_name, peft_config, module_path=current_key, options=options)
        new_module.train(target.training)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def structured_layers(self) -> list[tuple[str, StructuredLayer]]:
        """(module path, layer) of every structured layer in the model."""
        return [(k, m) for k, m in self.model.named_modules() if isinstance(m, self.tuner_layer_cls)]

    def _check_mergeable(self, adapter_names: list[str] | None, safe_merge: bool = False) -> None:
        """MergeError, before any layer changes, if one of the adapters to merge cannot be merged into some layer
        (a non-linear adapter block, an adapter block on a grouped Conv2d) or, with ``safe_merge``, would make some
        layer's weights non-finite (so a NaN in the last layer does not leave the first ones merged)."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for _, layer in self.structured_layers():
            for name in names:
                if name in layer.operators:
                    layer.check_mergeable(name)
        if safe_merge:
            for _, layer in self.structured_layers():
                new = [n for n in names if n in layer.operators and n not in layer.merged_adapters]
                if new:
                    with torch.no_grad():
                        layer.check_finite_merge(new)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(  # type: ignore[override]  # PEFT annotates -> None but returns self.model
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._check_mergeable(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(  # type: ignore[return-value]  # PEFT: -> None, returns the model
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )


class SurmModel(StructuredTuner):
    """SURM tuner: ΔW of each targeted layer is a structured matrix (see :class:`SurmConfig`)."""

    prefix: str = "surm_"
    tuner_layer_cls = SurmLayer
    wrapper_cls = SurmWrapper

    def target_presets(self, config: SurmConfig) -> dict[str, list[str]]:
        """LoRA placement: the projections (``TARGET_PRESETS``); adapter placement: the Houlsby positions."""
        return ADAPTER_PRESETS if config.placement == "adapter" else TARGET_PRESETS

    def resolve_layer(
        self, config: SurmConfig, key: str, base: nn.Module, record: bool = True, weight: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """{operator role: resolved options}: role "delta" (placement='lora'), "op" (square adapter) or
        "down" / "up" (bottleneck adapter). (SURM's options depend on W's shape only, not on ``weight``.)"""
        shape = delta_shape(base)
        rec = self.check_recorded_shape(config, key, shape)
        if rec is not None:
            options = {role: dict(opts) for role, opts in rec["options"].items()}
        else:
            out_features = shape[0]
            if config.placement == "lora":
                roles = {"delta": shape}
            elif config.adapter_form == "square":
                roles = {"op": (out_features, out_features)}
            else:
                m = config.bottleneck
                if m is None:  # checked by __post_init__: set to None on the config afterwards
                    raise ConfigError(
                        "bottleneck=None is invalid: adapter_form='bottleneck' needs an integer width >= 1"
                    )
                if m >= out_features:
                    raise ShapeError(
                        f"bottleneck={m} must be smaller than the width n={out_features} of module {key!r}"
                    )
                roles = {"down": (m, out_features), "up": (out_features, m)}
            n_params = None
            if config.budget is not None:  # per targeted module, shared by its operators (and adapter bias)
                from ..budget import budget_to_parameters

                total = budget_to_parameters(config.budget, *shape)
                if config.placement == "adapter" and getattr(base, "bias", None) is not None:
                    if total <= out_features:
                        raise ConfigError(
                            f"budget={config.budget!r} gives module {key!r} {total} parameters, and its adapter "
                            f"block's bias alone takes {out_features} (the width of its output): give a budget of "
                            f"more than {out_features} parameters"
                        )
                    total -= out_features
                n_params = total // len(roles)
            options = {role: self._resolve_operator(config, s, n_params) for role, s in roles.items()}
        if record:
            if rec is not None:
                compute = rec.get("compute", {})
            else:
                compute = {role: self._choose_compute(config, roles[role], options[role], base, role) for role in roles}
            config.layer_options[key] = {"shape": list(shape), "options": options, "compute": compute}
        return options

    @staticmethod
    def _choose_compute(
        config: SurmConfig, shape: tuple[int, int], options: dict[str, Any], base: nn.Module, role: str
    ) -> str:
        if config.compute != "auto":
            return config.compute
        from ..operators.dispatch import auto_paths, choose_compute

        cls = get_operator_class(config.structure)
        tokens = config.compute_tokens
        # only a ΔW-placed operator folds into the base weight (an adapter block's act on the layer output)
        paths = auto_paths(cls, folds=role == "delta")
        return measure_compute(
            base,
            lambda d: choose_compute(
                cls, *shape, options, device=d, tokens=tokens, paths=paths, keep=config.keep_folded_weight
            ),
        )

    @staticmethod
    def _resolve_operator(config: SurmConfig, shape: tuple[int, int], n_params: int | None) -> dict[str, Any]:
        cls = get_operator_class(config.structure)
        options = config.structure_options()
        if n_params is not None:
            options = cls.options_for_budget(*shape, n_params, **options)
        with torch.device("meta"):
            return cls(*shape, **options).options  # validates and resolves (no memory on meta)
