"""The structured-operator protocol shared by every structure.

An operator is a ``torch.nn.Module`` that *is* a structured matrix ΔW of shape (out_features, in_features):

* ``op(x)`` computes ``x @ ΔW.T`` for ``x`` of shape (..., in_features) with the fast algorithm (FFT, reshape),
  never by forming ΔW (``op.fast_forward``), unless ``op.compute_mode = "dense"`` asks for a materialised ΔW
  (faster for grids of small blocks; chosen per layer by :mod:`structpeft.operators.dispatch`; inside a wrapped
  layer a dense ΔW is folded into the base weight, one matmul, see :mod:`structpeft.operators.fused`);
* in training, the fast product of a structure whose intermediates are large (``fast_intermediates()``, values per
  input row, above ``in_features + out_features``: Toeplitz with several factors, LDR on a block grid) is run under
  ``torch.utils.checkpoint``: only its input is kept for the backward, which recomputes the product (one more
  forward of it) instead of holding ``fast_intermediates()`` values per row in every adapted layer (Toeplitz at
  MiniLM's LoRA-r=8 budget: 1.4 GB saved for a 32 × 128 batch without it, 30 MB with LoRA). ``op.recompute_fast =
  True / False`` forces it either way, ``None`` (the default) applies the rule;
* ``op.to_dense()`` returns ΔW itself (out_features × in_features), by an independent construction that the tests
  use as the reference; ``op.delta_weight()`` is ΔW in the compute dtype (≥ float32, autocast off), cached while
  the parameters cannot change (no grad recorded, unchanged parameter versions);
* ``cls.num_parameters(out, in, **options)`` is the parameter count, a closed formula stated in the docstring;
* ``op.reset_parameters(init=True)`` gives ΔW = 0 (the adapter starts as the identity), ``init=False`` a random
  non-zero ΔW (for tests and ablations);
* ``cls.options_for_budget(out, in, n_params, **fixed)`` chooses the structure's size options so that the operator has
  at most ``n_params`` parameters, as close to it as the structure allows.

Operators are pure torch; nothing here imports PEFT.

Block grid (shared by ``circulant``, ``toeplitz`` and ``ldr``): a rectangular (out × in) matrix is tiled by a
grid of q × p square b × b blocks, q = ceil(out / b), p = ceil(in / b); the input is zero-padded from ``in`` to
p·b and the output cropped from q·b to ``out``. ``block_size=None`` means b = max(out, in): one block, i.e. the
layer is embedded in a single b × b structured matrix and cropped. A requested b larger than max(out, in) is
clamped to max(out, in) (the resolved value is reported by ``op.options``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ConfigError, ShapeError

# per-operator memo of :meth:`StructuredOperator.cached`, outside the module so that it is never copied, pickled or
# saved with it, and dropped with the operator
_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Part of every cache key (here and in :mod:`.fused`), next to each parameter's storage and version counter: the
# updates of a parameter that its version counter misses. Torch's fused optimisers (``AdamW(fused=True)``,
# transformers' default ``adamw_torch_fused``) and writes through ``.data`` change a parameter without bumping its
# version, so an optimiser step counts here for each of its parameters that a cache has used (a global step hook),
# and so does every ``train()`` / ``eval()`` of the operator that owns it.
_MISSED_UPDATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def memoised(
    store: dict[str, Any],
    name: str,
    tensors: Sequence[torch.Tensor],
    build: Callable[[], torch.Tensor],
    extra: tuple[Any, ...] = (),
) -> torch.Tensor:
    """``build()``, kept as ``store[name]`` and returned again while the inference mode and ``extra`` are the
    same and every tensor of ``tensors`` is the very same object with the same storage, dtype, version counter
    and :func:`update_count`. The inference caches (the ΔW and spectra of an operator, a layer's folded weight)
    all use it. The entry keeps weak references to the tensors: storage address and version alone also match a
    new tensor the allocator placed where a freed one was, with the same version (an adapter deleted, another
    loaded under its name: zero init, then one copy from the file)."""
    key = (
        torch.is_inference_mode_enabled(),
        *extra,
        *((t.data_ptr(), t.dtype, t._version, update_count(t)) for t in tensors),
    )
    hit = store.get(name)
    if hit is not None and hit[0] == key and all(r() is t for r, t in zip(hit[2], tensors, strict=True)):
        return hit[1]
    value = build()
    store[name] = (key, value, tuple(weakref.ref(t) for t in tensors))
    return value


def update_count(param: torch.Tensor) -> int:
    """Updates of ``param`` that its version counter may have missed (see ``_MISSED_UPDATES``); part of the caches'
    keys, and from now on counted for ``param``."""
    return _MISSED_UPDATES.setdefault(param, 0)


def _count_update(param: torch.Tensor) -> None:
    if param in _MISSED_UPDATES:  # only parameters some cache has used (the others have nothing to invalidate)
        _MISSED_UPDATES[param] += 1


def _after_optimizer_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            _count_update(param)


register_optimizer_step_post_hook(_after_optimizer_step)


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; raise :class:`ConfigError` naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")
    return value


def toeplitz_dense(v: torch.Tensor) -> torch.Tensor:
    """(..., 2b − 1) diagonals -> (..., b, b) Toeplitz matrices T[r, s] = v[r − s + b − 1].

    Built as sliding windows (``unfold``) of the reversed vector: with u = flip(v), unfold(u)[m, n] = u[m + n] and
    T[r, s] = u[b − 1 − r + s], i.e. the windows with the row order reversed. The backward, ∂v[k] = Σ_{r − s =
    k − b + 1} G[r, s] (the sums along the diagonals of the incoming gradient G), is :func:`diagonal_sums`: one
    pad, a strided view and one reduction, no scatter; on CPU 1.8-3.2× faster than autograd's unfold / flip
    backward for b = 24-256.
    """
    return _ToeplitzDense.apply(v)


def diagonal_sums(g: torch.Tensor) -> torch.Tensor:
    """(..., b, b) -> (..., 2b − 1) with out[k] = Σ_{r − s = k − b + 1} g[r, s] (the adjoint of toeplitz_dense).

    Skew trick, one copy: pad each matrix to (b + 1, 2b − 1) (b − 1 zeros on the left of each row, one zero row
    below), so g[r, s] sits at flat index r(2b − 1) + s + b − 1; the strided view with row stride 2b reads, at
    (r, c), flat index r(2b − 1) + r + c, i.e. g[r, c + r − b + 1] where that exists and a pad zero otherwise (a
    read past the row's end lands in the left pad of the next row, or in the zero row). So column c collects the
    diagonal s − r = c − b + 1; the column sums, reversed, are ∂v. Differentiable again (pad, strided view, sum).
    """
    b = g.shape[-1]
    # (..., b + 1, 2b − 1); contiguous(): pad keeps a channels-last layout of a 4-D gradient (no-op otherwise)
    padded = nn.functional.pad(g, (b - 1, 0, 0, 1)).contiguous()
    view = padded.as_strided((*g.shape[:-2], b, 2 * b - 1), (*padded.stride()[:-2], 2 * b, 1))
    return view.sum(dim=-2).flip(-1)


class _ToeplitzDense(torch.autograd.Function):
    """toeplitz_dense with :func:`diagonal_sums` as its backward (differentiable again: pads, views, a sum)."""

    @staticmethod
    def forward(v: torch.Tensor) -> torch.Tensor:
        b = (v.shape[-1] + 1) // 2
        return v.flip(-1).unfold(-1, b, 1).flip(-2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return diagonal_sums(grad)


def circulant_dense(c: torch.Tensor) -> torch.Tensor:
    """(..., b) first columns -> (..., b, b) circulant matrices circ(c)[r, s] = c[(r − s) mod b]: the Toeplitz
    matrix with diagonals (c[1:], c) (index r − s + b − 1 of that vector is c[(r − s) mod b])."""
    return toeplitz_dense(torch.cat([c[..., 1:], c], dim=-1))


def skew_circulant_dense(h: torch.Tensor) -> torch.Tensor:
    """(..., b) -> (..., b, b) skew-circulant skew(h)[a, s] = h[a − s] (a >= s), −h[a − s + b] (a < s): the
    Toeplitz matrix with diagonals (−h[1:], h)."""
    return toeplitz_dense(torch.cat([-h[..., 1:], h], dim=-1))


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype FFT-based products run in: float64 if any input is float64, else float32.

    Half-precision FFTs are unsupported on CPU, need power-of-two sizes on CUDA and lose accuracy, so fp16 / bf16
    inputs are computed in float32 and the result is cast back by the caller.
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


class DenseDeltaMixin:
    """``delta_weight()`` (ΔW in the compute dtype, cached for inference) for a module with ``to_dense()``.

    Shared by the structured operators and PMSS's skeleton operator: whatever ΔW is made of, folding it into the
    base weight (:mod:`structpeft.operators.fused`) needs it materialised, cheaply, and only once while the
    parameters cannot change.
    """

    #: True while a checkpointed fast product runs (:meth:`StructuredOperator.forward`): :meth:`cached` builds
    _uncached: bool = False

    if TYPE_CHECKING:  # provided by nn.Module and by the concrete operator

        def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

        def to_dense(self) -> torch.Tensor: ...

        def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def train(self, mode: bool = True) -> Any:
        """``nn.Module.train``; the values cached before it are not reused after it (``model.eval()`` before an
        evaluation sees the current parameters, however they were changed)."""
        for param in self.parameters():
            _count_update(param)
        return super().train(mode)  # type: ignore[misc]  # nn.Module.train, next in the operators' MRO

    def delta_weight(self, cache: bool = True) -> torch.Tensor:
        """ΔW (out × in) in the compute dtype (float32 at least; float64 for float64 parameters), built with
        autocast disabled (a bf16 autocast would round the block products). With ``cache`` the result is kept
        while the parameters cannot change: see :meth:`cached`."""
        dtype = compute_dtype(*(p.dtype for p in self.parameters()))

        def build() -> torch.Tensor:
            with torch.autocast(self._device_type(), enabled=False):
                return self.to_dense().to(dtype)

        return self.cached("delta_weight", build) if cache else build()

    def cached(self, name: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, memoised under ``name`` while the operator's parameters are frozen for this call.

        A value is reused only if no autograd graph is being recorded through the parameters (grad disabled, or
        no parameter requires grad), outside ``torch.compile`` tracing, and if every parameter still has the
        same storage, dtype and version counter (in-place updates such as an optimiser step bump the version), and
        no optimiser step over them or ``train()`` / ``eval()`` of this operator happened since (fused optimisers
        and ``.data`` writes do not bump the version: :func:`update_count`). This caches the dense ΔW and the
        weight spectra (rfft of the frozen weights) for inference.
        """
        params = list(self.parameters())
        recording = torch.is_grad_enabled() and has_trainable(self)  # type: ignore[arg-type]  # a Module mixin
        if recording or _compiling() or self._uncached:
            return build()
        return memoised(_CACHES.setdefault(self, {}), name, params, build)

    def param_grads(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """∂/∂θ Σ_n g_n · (ΔW(θ) x_n) for every parameter θ (``self.parameters()`` order; None where θ is frozen).

        ``x`` (N × in) are the layer inputs, ``g`` (N × out) the gradients of the layer outputs (already multiplied
        by the adapter's scale). This is the gradient of the structured parameters alone, without the input
        gradient and without the (out × in) matrix gᵀx that autograd through a folded W + s·ΔW forms: the
        ``"hybrid"`` compute mode (:mod:`structpeft.operators.fused`) runs the forward and the input gradient
        through the folded weight and only this through the structure. Default: autograd through the fast
        product (its forward, then the parameter half of its backward); structures override it with a direct
        formula where the forward's inverse transform can be skipped. Computed in the compute dtype, autocast off.
        """
        params = list(self.parameters())
        trainable = [p for p in params if p.requires_grad]
        dtype = compute_dtype(*(p.dtype for p in params))
        with torch.enable_grad(), torch.autocast(self._device_type(), enabled=False):
            product = getattr(self, "fast_forward", None) or self.forward
            y = product(x.detach().to(dtype))
            grads = iter(torch.autograd.grad(y, trainable, g.to(y.dtype), allow_unused=True) if trainable else ())
        return tuple(next(grads) if p.requires_grad else None for p in params)

    def _device_type(self) -> str:
        # a loop rather than next(iterator, default): older dynamo (torch 2.8) breaks the graph on the latter
        for p in self.parameters():
            return p.device.type
        return "cpu"


class StructuredOperator(DenseDeltaMixin, nn.Module):
    """Base class: a structured ΔW (out_features × in_features) as a module; see the module docstring."""

    structure: ClassVar[str] = ""
    #: run the fast product under torch.utils.checkpoint in training (True), never (False), or by the rule of the
    #: module docstring (None): intermediates above in_features + out_features values per row are recomputed
    recompute_fast: bool | None = None
    #: the structure's own options (keyword arguments of ``__init__`` after the shape, keys of :attr:`options`);
    #: ``SurmConfig`` and the CLI accept these for this structure and refuse them for the others
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = check_positive_int("out_features", out_features)
        self.in_features = check_positive_int("in_features", in_features)
        # "fast": the structured product; "dense": x @ to_dense().T (faster for small blocks, see dispatch.py);
        # "hybrid": as "fast" here (a wrapping layer folds ΔW into its base weight and trains θ by param_grads)
        self.compute_mode = "fast"

    # ----------------------------------------------------------------------------------------------------- api
    @property
    def options(self) -> dict[str, Any]:
        """The resolved structure options (JSON-serialisable), enough to rebuild an operator of the same shape."""
        raise NotImplementedError

    @classmethod
    def num_parameters(cls, out_features: int, in_features: int, *args: Any, **options: Any) -> int:
        """The parameter count for a layer of this shape with these options (each structure names its own)."""
        raise NotImplementedError

    @classmethod
    def options_for_budget(cls, out_features: int, in_features: int, n_params: int, **fixed: Any) -> dict[str, Any]:
        """Size options with at most ``n_params`` parameters; ``fixed`` options (e.g. ``displacement_rank``) are
        kept as given and the free size option (block size, factor shape) is chosen."""
        raise NotImplementedError

    def reset_parameters(self, init: bool = True) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *, recomputing: bool = False) -> torch.Tensor:
        """x @ ΔW.T by the structured product (``compute_mode="fast"``) or a materialised ΔW (``"dense"``).
        ``recomputing`` (internal): the checkpointed fast product itself, see the module docstring."""
        if recomputing:  # build the weight spectra in the forward and its recomputation alike, never from the cache
            self._uncached = True
            try:
                return self.fast_forward(x)
            finally:
                self._uncached = False
        if x.shape[:-1].numel() == 0:  # no rows (an empty batch): the FFT paths refuse it, so answer directly
            self._check_input(x)
            dtype = compute_dtype(x.dtype, *(p.dtype for p in self.parameters()))
            out = x.new_zeros(*x.shape[:-1], self.out_features, dtype=dtype)
            # connected to the parameters (zero gradients, as an empty batch through nn.Linear gives)
            return out + sum((p.reshape(-1)[:0].sum() for p in self.parameters()), x.new_zeros((), dtype=dtype))
        if self.compute_mode == "dense":
            self._check_input(x)
            w = self.delta_weight()
            dtype = compute_dtype(x.dtype, w.dtype)  # float32 at least, like the fast path
            return torch.nn.functional.linear(x.to(dtype), w.to(dtype))
        if self._recomputes() and torch.is_grad_enabled() and (x.requires_grad or has_trainable(self)):
            # keep x alone for the backward, which runs fast_forward again (see the module docstring); the parameters
            # go in as inputs, so that the recomputation uses the tensors this forward used (also under
            # torch.func.functional_call) and a second derivative reaches them
            names, params = zip(*self.named_parameters(), strict=True)

            def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
                args = dict(zip(names, params, strict=True))
                return cast(torch.Tensor, torch.func.functional_call(self, args, (x,), {"recomputing": True}))

            return cast(torch.Tensor, checkpoint(run, x, *params, use_reentrant=False))
        return self.fast_forward(x)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fast_intermediates(self) -> int:
        """A lower bound on the values per input row that the fast product's autograd graph saves beyond its input
        (its largest intermediates, a closed formula per structure); 0 where they are no larger than the input and
        output together."""
        return 0

    def _recomputes(self) -> bool:
        if self.recompute_fast is not None:
            return bool(self.recompute_fast)
        return self.fast_intermediates() > self.in_features + self.out_features

    def to_dense(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------- helpers
    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"{self.structure} operator expects inputs with last dimension in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"out_features={self.out_features}, in_features={self.in_features}, {opts}"


class BlockGridOperator(StructuredOperator):
    """A structured operator tiled as a q × p grid of b × b blocks (see the module docstring)."""

    def __init__(self, out_features: int, in_features: int, block_size: int | None = None) -> None:
        super().__init__(out_features, in_features)
        self.block_size = resolve_block_size(out_features, in_features, block_size)
        self.grid = grid_shape(out_features, in_features, self.block_size)

    def _split_input(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., p, b), zero-padding the input to p·b."""
        return _split_blocks(x, self.grid[1], self.block_size)

    def _split_output(self, g: torch.Tensor) -> torch.Tensor:
        """(..., out) -> (..., q, b), zero-padding to q·b (the adjoint of the crop in :meth:`_merge_output`)."""
        return _split_blocks(g, self.grid[0], self.block_size)

    def _merge_output(self, y: torch.Tensor) -> torch.Tensor:
        """(..., q, b) -> (..., out), cropping q·b to out."""
        return _merge_blocks(y, self.out_features)

    def _assemble(self, blocks: torch.Tensor) -> torch.Tensor:
        """(q, p, b, b) dense blocks -> cropped (out, in) matrix."""
        q, p, b, _ = blocks.shape
        full = blocks.permute(0, 2, 1, 3).reshape(q * b, p * b)
        if full.shape == (self.out_features, self.in_features):
            return full  # exact tiling: no crop (a slice's backward would write a zero-filled copy of the gradient)
        return full[: self.out_features, : self.in_features]


def _split_blocks(t: torch.Tensor, n_blocks: int, b: int) -> torch.Tensor:
    """(..., n) -> (..., n_blocks, b), zero-padding the last dimension to n_blocks·b."""
    pad = n_blocks * b - t.shape[-1]
    if pad:
        t = nn.functional.pad(t, (0, pad))
    return t.reshape(*t.shape[:-1], n_blocks, b)


def _merge_blocks(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n_blocks, b) -> (..., n), cropping n_blocks·b to n (the adjoint of :func:`_split_blocks`)."""
    return t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1])[..., :n]


def has_trainable(module: nn.Module) -> bool:
    """True if a parameter of ``module`` requires grad."""
    return any(p.requires_grad for p in module.parameters())


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def resolve_block_size(out_features: int, in_features: int, block_size: int | None) -> int:
    """The block size actually used: ``max(out, in)`` for ``None``, else ``min(block_size, max(out, in))``."""
    n = max(out_features, in_features)
    if block_size is None:
        return n
    check_positive_int("block_size", block_size)
    return min(block_size, n)


def grid_shape(out_features: int, in_features: int, block_size: int) -> tuple[int, int]:
    """(q, p) = (ceil(out / b), ceil(in / b))."""
    return math.ceil(out_features / block_size), math.ceil(in_features / block_size)


EXACT_TILING_TOLERANCE = 0.01
"""How many fewer parameters (a fraction of the largest count within budget) a block size that tiles the layer
exactly may have and still be preferred to a padded one (see :func:`largest_block_size_within`)."""


def largest_block_size_within(
    out_features: int,
    in_features: int,
    n_params: int,
    params_per_block: Callable[[int], int],
    exact_tolerance: float = EXACT_TILING_TOLERANCE,
) -> int:
    """The block size b whose parameter count is the largest one not above ``n_params``, preferring exact tilings.

    ``params_per_block(b)`` returns the operator's parameter count for block size b. Parameter counts of block
    grids are not monotone in b (padding), so every b in 1..max(out, in) is scanned (cheap: closed formulas).
    Let n* be the largest count not above ``n_params``. If some b dividing both out and in (no zero padding) has
    a count within ``exact_tolerance`` (default :data:`EXACT_TILING_TOLERANCE`) of n*, the largest such count wins
    (``exact_tolerance=1``: any exact tiling within budget beats every padded one): a padded grid spends part
    of its parameters on entries that are cropped away, and pays for the padded size in every product (Toeplitz
    on a 384 × 384 layer at LoRA r=8's 6,144: b = 171, a 3 × 3 grid over 513 × 513 with 6,138 parameters,
    against b = 96, 4 × 4 exact, 6,112 parameters and a third of the work to build ΔW). Otherwise the b with
    count n* is returned. Ties go to the smaller b (more, smaller blocks: cheaper FFTs). Raises
    :class:`ConfigError` if even the smallest count exceeds the budget.
    """
    counts = {b: params_per_block(b) for b in range(1, max(out_features, in_features) + 1)}
    within = {b: n for b, n in counts.items() if n <= n_params}
    if not within:
        raise ConfigError(
            f"budget of {n_params} parameters is too small for a ({out_features} x {in_features}) layer: "
            f"the smallest this structure allows is {min(counts.values())}"
        )
    best_n = max(within.values())
    exact = {
        b: n
        for b, n in within.items()
        if out_features % b == 0 and in_features % b == 0 and n >= (1 - exact_tolerance) * best_n
    }
    pool = exact or within
    top = max(pool.values())
    return min(b for b, n in pool.items() if n == top)
