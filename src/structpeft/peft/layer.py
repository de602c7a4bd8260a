"""ONE layer wrapper shared by every structure and method.

A targeted module (``nn.Linear``, transformers ``Conv1D`` or ``nn.Conv2d``) is replaced by a wrapper that keeps
it as ``base_layer`` and holds, per adapter name, one operator module (a structured ΔW of shape (out, in')):

    forward(x) = base(x) + Σ_{a active} s_a · op_a(dropout_a(x))          (Linear, Conv1D)
    forward(x) = base(x) + Σ_{a active} conv(dropout_a(x), s_a · ΔW_a)     (Conv2d: ΔW acts on the flattened
                                                                           (out, in/groups·kh·kw) kernel)

Active adapters are *summed* (never chained). ``get_delta_weight`` returns s·ΔW in the base weight's layout
(transposed for Conv1D, reshaped for Conv2d); merging adds it to the base weight, unmerging subtracts it.
The operator is built by the method (``_build_operator``): SURM builds it from the layer shape, PMSS from the
frozen weight. An operator may implement ``forward_from_base(x, base_out)`` to reuse the base layer's output, and
``add_from_base(base_out, s)`` = base_out + s·op(x) as one fused op (used for the first active adapter).
Operators in ``compute_mode`` "dense" or "hybrid" (no dropout, float32 / float64 Linear or Conv1D) are folded into
the base matmul instead: forward(x) = x·(W + Σ_a s_a·ΔW_a)ᵀ + b, one matmul (see :mod:`structpeft.operators.fused`;
"hybrid" takes the adapter parameters' gradients through the structure instead of through W + Σ_a s_a·ΔW_a);
with the config's ``fold_inference=True`` the ``"fast"`` ones are too, in inference only (no autograd graph
through the weights), where W + Σ s·ΔW is built once and cached. In training the fold is built again in the
backward (only x kept), or, with the config's ``keep_folded_weight=True``, built once and held until the backward.

Mixed-adapter batches (inference): ``forward(x, adapter_names=[...])``, one name per example along dim 0, gives
each example the base output plus *its* adapter's output (``"__base__"``: none), as PEFT's LoRA layers do; the
tuner injects ``adapter_names`` into every structured layer (``StructuredTuner._enable_peft_forward_hooks``).
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, cast

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..errors import MergeError, MixedBatchError, UnsupportedLayerError
from ..operators.base import DenseDeltaMixin, _compiling
from ..operators.fused import FOLDABLE_DTYPES, FOLDED_MODES, folded_linear, hybrid_linear, records_grad
from .adapter import AdapterBlock

Conv1D: type[nn.Module] | None
try:  # transformers is optional
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - exercised only without transformers
    Conv1D = None

SUPPORTED_LAYER_TYPES = "torch.nn.Linear, transformers Conv1D, torch.nn.Conv2d"
# in a mixed-adapter batch (``model(..., adapter_names=[...])``), the name of "no adapter" (PEFT's convention)
MIXED_BATCH_BASE = "__base__"


class FromBaseOperator(Protocol):
    """An operator that reads its input product from the base layer's output (PMSS's skeleton operator)."""

    def forward_from_base(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor: ...

    def add_from_base(self, base_out: torch.Tensor, scale: float) -> torch.Tensor: ...


def base_weight(module: nn.Module) -> torch.Tensor:
    """The ``weight`` of a supported base layer (a Parameter; ``nn.Module.__getattr__`` types it Tensor | Module)."""
    return cast(torch.Tensor, module.weight)


def base_bias(module: nn.Module) -> torch.Tensor | None:
    """The ``bias`` of a supported base layer (a Parameter or None)."""
    return cast("torch.Tensor | None", module.bias)


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'conv2d' for the supported base layer types, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D is not None and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def delta_shape(module: nn.Module) -> tuple[int, int]:
    """The (out, in') shape of ΔW for a supported base layer; :class:`UnsupportedLayerError` otherwise."""
    kind = layer_kind(module)
    if kind == "linear":
        linear = cast(nn.Linear, module)
        return linear.out_features, linear.in_features
    if kind == "conv1d":
        w = base_weight(module)
        return w.shape[1], w.shape[0]
    if kind == "conv2d":
        w = base_weight(module)
        return w.shape[0], w.shape[1] * w.shape[2] * w.shape[3]
    raise UnsupportedLayerError(
        f"cannot wrap a module of type {type(module).__module__}.{type(module).__qualname__}; "
        f"supported types: {SUPPORTED_LAYER_TYPES}"
    )


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The base weight as the (out, in') matrix ΔW is added to (a view, no copy)."""
    kind = layer_kind(module)
    w = base_weight(module)
    if kind == "conv1d":
        return w.T
    if kind == "conv2d":
        return w.reshape(w.shape[0], -1)
    return w


class StructuredLayer(BaseTunerLayer):
    """Per-adapter operators, scales and dropouts around one base layer (see the module docstring).

    Subclasses set ``adapter_layer_names = ("<prefix>op",)``, ``other_param_names`` and ``_build_operator``.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    op_attr: str = ""
    scaling_attr: str = ""
    dropout_attr: str = ""

    def __init__(self, base_layer: nn.Module, module_path: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        setattr(self, self.op_attr, nn.ModuleDict({}))
        setattr(self, self.dropout_attr, nn.ModuleDict({}))
        setattr(self, self.scaling_attr, {})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.module_path = module_path
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.kind = layer_kind(base)
        self.out_features, self.in_features = delta_shape(base)

    # ------------------------------------------------------------------------------------------- containers
    @property
    def operators(self) -> nn.ModuleDict:
        return getattr(self, self.op_attr)

    @property
    def scalings(self) -> dict[str, float]:
        return getattr(self, self.scaling_attr)

    @property
    def dropouts(self) -> nn.ModuleDict:
        return getattr(self, self.dropout_attr)

    def _build_operator(self, adapter_name: str, config: Any, options: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def _recorded_compute(self, config: Any) -> dict[str, str]:
        """The compute mode per operator role ("delta"; "down" / "up" in an adapter block) that the tuner chose
        for this module and recorded in ``config.layer_options`` ({} for adapters saved before the record)."""
        return config.layer_options.get(self.module_path, {}).get("compute", {})

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Add (or replace) adapter ``adapter_name`` built from ``config``."""
        op = self._build_operator(adapter_name, config, **kwargs)
        self.operators[adapter_name] = op
        self.scalings[adapter_name] = float(config.alpha)
        self.dropouts[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ----------------------------------------------------------------------------------------------- delta
    def is_adapter_placement(self, adapter_name: str) -> bool:
        """True for a SURM-Adapter block (applied to the layer's output), False for a ΔW on the weight."""
        return getattr(self.operators[adapter_name], "placement", "lora") == "adapter"

    def _to_base_layout(self, dense_2d: torch.Tensor) -> torch.Tensor:
        """(out, in') matrix -> the base weight's layout (transposed for Conv1D, kernel-shaped for Conv2d)."""
        base = self.get_base_layer()
        if self.kind == "conv1d":
            return dense_2d.T
        if self.kind == "conv2d":
            return dense_2d.reshape(base_weight(base).shape)
        return dense_2d

    def get_delta_weight(self, adapter_name: str, exact: bool = False) -> torch.Tensor:
        """The change of the base weight (base layout and dtype) that merging this adapter alone makes.

        ΔW placement: s·ΔW. Adapter placement (identity activation): M·W₀ with W₀ the unmerged base weight.
        ``exact``: in float64 instead, not rounded to a half-precision base weight's dtype (for export).
        """
        base = self.get_base_layer()
        if self.is_adapter_placement(adapter_name):
            w0, _ = self._unmerged_weights(list(self.merged_adapters))
            m = cast(AdapterBlock, self.operators[adapter_name]).linear_map(self.scalings[adapter_name])
            dense = m.double() @ w0.double() if exact else m.to(w0) @ w0
        else:
            op = cast(DenseDeltaMixin, self.operators[adapter_name])
            dense = (op.to_dense().double() if exact else op.to_dense()) * self.scalings[adapter_name]
        return self._to_base_layout(dense).to(torch.float64 if exact else base_weight(base).dtype)

    def _merge_terms(self, names: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(D, M, c): the sum of s·ΔW of the ΔW-placed adapters, of the adapter maps M, of the adapter biases."""
        d: torch.Tensor | None = None
        m: torch.Tensor | None = None
        c: torch.Tensor | None = None
        for name in names:
            if name not in self.operators:
                continue
            op, scale = self.operators[name], self.scalings[name]
            if self.is_adapter_placement(name):
                block = cast(AdapterBlock, op)
                m_a = block.linear_map(scale).double()
                m = m_a if m is None else m + m_a
                if block.bias is not None:
                    c = block.bias.double() if c is None else c + block.bias.double()
            else:
                d_a = cast(DenseDeltaMixin, op).to_dense().double() * scale
                d = d_a if d is None else d + d_a
        return d, m, c

    def unmerged_weight_2d(self) -> torch.Tensor:
        """W₀ (out × in') in the base weight's dtype: the base weight without the merged adapters (the base weight
        itself while none is merged; else recomputed from the merged one, exact up to the merge's rounding)."""
        w = weight_2d(self.get_base_layer())
        if not self.merged_adapters:
            return w
        with torch.no_grad():
            return self._unmerged_weights(list(self.merged_adapters))[0].to(w.dtype)

    def _unmerged_weights(self, merged: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W₀, b₀) in float64, (out, in') layout: the base weight and bias with the ``merged`` adapters removed.

        The merged state is W = W₀ + D + M·W₀, b = b₀ + M·b₀ + c (see ``_merge_terms``); adapter maps are undone
        by solving (I + M)·W₀ = W − D.
        """
        base = self.get_base_layer()
        w = weight_2d(base).detach().double()
        bias = getattr(base, "bias", None)
        b = None if bias is None else bias.detach().double()
        d, m, c = self._merge_terms(merged)
        if d is not None:
            w = w - d
        if c is not None and b is not None:
            b = b - c
        if m is not None:
            eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            w = torch.linalg.solve(eye + m, w)
            if b is not None:
                b = torch.linalg.solve(eye + m, b[:, None])[:, 0]
        return w, b

    def _merged_weights(self, names: list[str], new_names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight (and bias, or None where it does not change) with the set ``names`` merged, computed
        from the unmerged base; ``new_names``, the part of ``names`` not merged yet. Writes nothing."""
        base = self.get_base_layer()
        previous = [n for n in names if n not in new_names]
        uses_map = any(self.is_adapter_placement(n) for n in names if n in self.operators)
        if not uses_map:
            # ΔW placement only: plain addition / subtraction in the base dtype (bit-stable, no solve)
            w2 = weight_2d(base).detach().clone()
            for name in new_names:
                w2 = w2 + (cast(DenseDeltaMixin, self.operators[name]).to_dense() * self.scalings[name]).to(w2.dtype)
            new_w, new_b = self._to_base_layout(w2), None
        else:
            w0, b0 = self._unmerged_weights(previous)
            d, m, c = self._merge_terms(names)
            w = w0 + (0 if d is None else d) + (0 if m is None else m @ w0)
            new_w = self._to_base_layout(w).to(base_weight(base).dtype)
            new_b = None
            if b0 is not None:
                b = b0 + (0 if m is None else m @ b0) + (0 if c is None else c)
                new_b = b.to(cast(torch.Tensor, base.bias).dtype)  # b0 is not None: the base layer has a bias
        return new_w, new_b

    def check_finite_merge(self, new_names: list[str]) -> None:
        """:class:`MergeError` if merging ``new_names`` (on top of the adapters merged already) would give non-finite
        weights; changes nothing. Used by ``safe_merge`` on every layer before any layer is merged."""
        self._check_finite(*self._merged_weights(self.merged_adapters + new_names, new_names), new_names)

    def _check_finite(self, new_w: torch.Tensor, new_b: torch.Tensor | None, new_names: list[str]) -> None:
        if torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all()):
            return
        base = self.get_base_layer()
        bias = getattr(base, "bias", None)
        base_finite = bool(torch.isfinite(base_weight(base)).all())
        base_finite = base_finite and (bias is None or bool(torch.isfinite(bias).all()))
        cause = "NaN/inf in the adapter" if base_finite else "the base layer's weights already hold NaN/inf"
        raise MergeError(
            f"merging adapter(s) {new_names} into {self.module_path or type(base).__name__} would give non-finite "
            f"weights ({cause}); safe_merge left every layer unchanged"
        )

    def _set_weights(self, names: list[str], safe_merge: bool, new_names: list[str]) -> None:
        """Write the base weight (and bias) for the merged set ``names``, computed from the unmerged base."""
        new_w, new_b = self._merged_weights(names, new_names)
        if safe_merge:
            self._check_finite(new_w, new_b, new_names)
        base = self.get_base_layer()
        base.weight.data = new_w.contiguous()
        if new_b is not None:
            base.bias.data = new_b

    def check_mergeable(self, adapter_name: str) -> None:
        """:class:`MergeError` if adapter ``adapter_name`` cannot be merged into this layer."""
        if not self.is_adapter_placement(adapter_name):
            return
        try:
            cast(AdapterBlock, self.operators[adapter_name]).check_linear()
        except MergeError as err:
            raise MergeError(f"adapter {adapter_name!r} on {self.module_path or 'this layer'}: {err}") from None
        base = self.get_base_layer()
        if self.kind == "conv2d" and base.groups != 1:
            raise MergeError(
                f"adapter {adapter_name!r} on {self.module_path or 'a Conv2d'}: (I + M)·W mixes output channels "
                f"across the groups={base.groups} of a grouped convolution, which its kernel cannot hold; keep the "
                "adapter unmerged"
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the given (default: active) adapters into the base weight (and bias, for adapter blocks)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        new = [n for n in adapter_names if n in self.operators]
        if not new:
            return
        for name in new:  # non-mergeable adapters raise here, before anything changes
            self.check_mergeable(name)
        self._set_weights(self.merged_adapters + new, safe_merge, new)
        self.merged_adapters.extend(new)

    def unmerge(self) -> None:
        """Restore the unmerged base weight (and bias)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        merged = list(self.merged_adapters)
        if any(self.is_adapter_placement(n) for n in merged if n in self.operators):
            w0, b0 = self._unmerged_weights(merged)
            base.weight.data = self._to_base_layout(w0).to(base_weight(base).dtype).contiguous()
            if b0 is not None:
                base.bias.data = b0.to(cast(torch.Tensor, base.bias).dtype)  # b0 is not None: the base has a bias
        else:
            for name in reversed(merged):
                if name in self.operators:
                    base_weight(base).data -= self.get_delta_weight(name)
        self.merged_adapters.clear()

    # --------------------------------------------------------------------------------------------- forward
    def _adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        op = self.operators[name]
        dropout = self.dropouts[name]
        scale = self.scalings[name]
        if self.is_adapter_placement(name):
            block = cast(AdapterBlock, op)
            if self.kind == "conv2d":  # channels are dim 1
                return block.transform(dropout(base_out).movedim(1, -1), scale).movedim(-1, 1)
            return block.transform(dropout(base_out), scale)
        if self.kind == "conv2d":
            conv = cast(nn.Conv2d, self.get_base_layer())
            delta = (cast(DenseDeltaMixin, op).to_dense() * scale).reshape(conv.weight.shape).to(x.dtype)
            return conv._conv_forward(dropout(x), delta, None)
        if isinstance(dropout, nn.Identity) and hasattr(op, "forward_from_base") and self._base_frozen():
            return cast(FromBaseOperator, op).forward_from_base(x, base_out) * scale
        return op(dropout(x)) * scale

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        """:class:`MixedBatchError` if ``adapter_names`` does not fit the batch ``x`` or adapters are merged."""
        if len(adapter_names) != len(x):
            raise MixedBatchError(
                f"adapter_names has {len(adapter_names)} entries but the batch reaching "
                f"{self.module_path or 'this layer'} has {len(x)} examples: give one adapter name per example"
            )
        if self.merged:
            raise MixedBatchError(
                f"adapter_names cannot be used while adapter(s) {self.merged_adapters} are merged into "
                f"{self.module_path or 'this layer'}: call unmerge_adapter() first"
            )

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each example with its own adapter: base(x) plus, for the examples named ``a``, adapter ``a``'s output on
        that sub-batch (``MIXED_BATCH_BASE`` = no adapter; an adapter this layer does not hold adds nothing)."""
        self._check_mixed_batch(x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        base_out = result
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(index)
        for name, indices in groups.items():
            if name == MIXED_BATCH_BASE or name not in self.operators:
                continue
            idx = torch.tensor(indices, device=result.device)
            delta = self._adapter_output(name, x[idx], base_out[idx])
            result = result.index_add(0, idx, delta.to(result.dtype))
        return result

    def _folded_terms(self) -> list[tuple[nn.Module, float]] | None:
        """(operator, scale) of the active adapters if all of them can be folded into the base weight: ΔW placement
        with ``compute_mode`` "dense" or "hybrid" (or, in inference, ``fold_inference``), no dropout, on a float32 /
        float64 Linear or Conv1D; else None."""
        base = self.get_base_layer()
        if self.kind not in ("linear", "conv1d") or base_weight(base).dtype not in FOLDABLE_DTYPES:
            return None
        terms = []
        for name in self.active_adapters:
            if name not in self.operators:
                continue
            op = self.operators[name]
            foldable = hasattr(op, "delta_weight") and isinstance(self.dropouts[name], nn.Identity)
            if not foldable or self.is_adapter_placement(name):
                return None
            terms.append((op, self.scalings[name]))
        if all(getattr(op, "compute_mode", "fast") in FOLDED_MODES for op, _ in terms):
            return terms
        inference_fold = all(getattr(op, "fold_inference", False) for op, _ in terms)
        if inference_fold and not _compiling() and not records_grad(base_weight(base), [op for op, _ in terms]):
            return terms  # fast-path adapters in inference: the cached W_eff (one weight copy, base speed)
        return None

    def _trains_refolding(self, terms: list[tuple[nn.Module, float]]) -> bool:
        """True if the folded ``terms`` train by :func:`hybrid_linear` (W_eff rebuilt in the backward, only x
        kept; or held, with ``keep_folded_weight``): autograd recording through an adapter, the base weight frozen
        and no ``torch.compile`` tracing (there, and for a trainable base weight, autograd through W + Σ s·ΔW gives
        the same gradients)."""
        weight = base_weight(self.get_base_layer())
        return not weight.requires_grad and not _compiling() and records_grad(weight, [op for op, _ in terms])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)  # injected by the tuner for a mixed-adapter batch
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        terms = None if args or kwargs else self._folded_terms()
        if terms:  # dense ΔWs folded into the base matmul (see structpeft.operators.fused)
            base = self.get_base_layer()
            if self._trains_refolding(terms):
                structured = [getattr(op, "compute_mode", "fast") == "hybrid" for op, _ in terms]
                # W_eff held for the backward only if every folded adapter's config asks (keep_folded_weight)
                keep = all(getattr(op, "keep_folded_weight", False) for op, _ in terms)
                return hybrid_linear(x, weight_2d(base), base_bias(base), terms, structured, keep=keep)
            return folded_linear(x, weight_2d(base), base_bias(base), terms, owner=self)
        result = self.base_layer(x, *args, **kwargs)
        base_out = result
        for name in self.active_adapters:
            if name not in self.operators:
                continue
            if result is base_out and self._adds_from_base(name):  # one fused op: base_out + s·op(x)
                result = cast(FromBaseOperator, self.operators[name]).add_from_base(base_out, self.scalings[name])
                continue
            delta = self._adapter_output(name, x, base_out)
            result = result + delta.to(result.dtype)
        return result

    def _adds_from_base(self, name: str) -> bool:
        """True if adapter ``name``'s output can be added to the base output by ``op.add_from_base`` (an operator
        that reads its input product from the base output, ΔW placement on a Linear / Conv1D, no dropout)."""
        return (
            self.kind in ("linear", "conv1d")
            and hasattr(self.operators[name], "add_from_base")
            and isinstance(self.dropouts[name], nn.Identity)
            and not self.is_adapter_placement(name)
            and self._base_frozen()
        )

    def _base_frozen(self) -> bool:
        """True if the base weight and bias are frozen. Reading W[J, :]x from the base output is exact only then:
        a trainable base would get the adapter's gradient through that read, and once trained it would no longer
        hold the frozen rows R = W₀[J, :] (and bias) the adapter was built with."""
        base = self.get_base_layer()

        def trainable(t: object) -> bool:
            # only a registered Parameter tells: FSDP1 (use_orig_params) swaps in plain views of its flat
            # parameter, whose requires_grad is the flat parameter's (True whenever the unit trains an adapter),
            # not the frozen base weight's; such a view counts as frozen, as PEFT leaves the base
            return isinstance(t, nn.Parameter) and t.requires_grad

        return not trainable(base_weight(base)) and not trainable(getattr(base, "bias", None))
