"""Skeleton selection for PMSS (Pretrained Matrices Skeleton Selection).

Convention (PyTorch layout, ``weight`` is ``out_features x in_features``, ``y = x @ weight.T``)::

    delta_W = weight[:, I] @ U @ weight[J, :]
              (out x k_in)  (k_in x k_out)  (k_out x in)

* ``I`` (``|I| = k_in``) are **column** indices of ``weight`` (into dim 1, the input features),
* ``J`` (``|J| = k_out``) are **row** indices of ``weight`` (into dim 0, the output features),
* ``U`` is the only trained tensor.

:func:`select_skeleton` chooses ``(I, J)`` with one of the strategies of :data:`SELECTION_STRATEGIES`:

* ``deim``: DEIM (Sorensen & Embree 2016) on the leading singular vectors; the classic CUR choice;
* ``qdeim``: Q-DEIM (Drmac & Gugercin 2016), column-pivoted QR of the transposed singular vectors;
* ``leverage``: top-k rank-k leverage scores (squared row norms of the leading singular vectors);
* ``norm``: top-k Euclidean column (row) norms of ``weight``;
* ``random``: uniform sample without replacement, from a seeded ``torch.Generator``.

Results are deterministic: the same weight, k, strategy and seed give the same indices on the same machine
(floating-point rounding of the SVD may differ between BLAS/LAPACK builds, which can flip near-ties; this is
why an adapter stores the indices it was trained with rather than re-selecting them).

Singular vectors: for ``min(out, in) <= EXACT_SVD_MAX_DIM`` (1024) the exact thin SVD
(``torch.linalg.svd(full_matrices=False)``, cost ``O(out * in * min(out, in))``) is used. Above that, a
randomised truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4: Gaussian sketch of width
``q = k + oversample``, ``niter`` power iterations with QR re-orthonormalisation, cost about
``(2 + 2 * niter) * out * in * q`` multiply-adds) is used; its Gaussian test matrix is drawn from a local CPU
``torch.Generator`` seeded with ``seed``, so the global RNG is neither used nor changed.

Cost measured for a 4096 x 4096 float32 weight with ``k_in = k_out = 256`` (randomised SVD, q = 266,
niter = 2), full :func:`select_skeleton` call, torch 2.13 on a 2-core AMD EPYC VM shared with other jobs:
CPU time with ``torch.set_num_threads(1)`` (an upper bound for the 2-core wall time) deim 1.4 s, qdeim
1.5-1.7 s, leverage 1.1-1.35 s, norm 0.12-0.23 s, random 0.1 s, of which the randomised SVD is about 1.1 s;
2-thread wall time on the machine when lightly loaded: deim 0.8-1.0 s, leverage 0.75 s, norm 0.1 s, random
0.06 s. The exact SVD of a 1024 x 1024 weight costs 0.3-0.7 s there.

Rank deficiency: when k exceeds the numerical rank ``r`` of the weight (singular values above
``sigma_1 * max(out, in) * eps``), DEIM and Q-DEIM select ``r`` indices from the ``r`` meaningful singular
vectors and fill the remaining ``k - r`` with the not yet chosen indices of largest column (row) norm, ties
broken by lower index; leverage scores are computed from the ``r`` meaningful vectors only (ties, including
the zero scores of the remainder, broken by lower index). So every strategy always returns ``k`` distinct
indices. An all-zero weight is rejected, because its skeleton update would be identically zero.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Callable
from typing import Literal

import torch

from .errors import ConfigError, SelectionError, UnknownStructureError

__all__ = [
    "EXACT_SVD_MAX_DIM",
    "SELECTION_STRATEGIES",
    "TruncatedSVD",
    "deim_indices",
    "pivoted_qr_indices",
    "select_deim",
    "select_leverage",
    "select_norm",
    "select_qdeim",
    "select_random",
    "select_skeleton",
    "skeleton_checksum",
    "skeleton_sketch",
    "sketch_difference",
]

Side = Literal["columns", "rows"]
_SIDES = ("columns", "rows")

#: Largest ``min(out, in)`` for which the exact thin SVD is used; larger weights use a randomised SVD.
EXACT_SVD_MAX_DIM = 1024


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_compute(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` detached, as float32 (float64 stays float64), on its own device."""
    return weight.detach().to(dtype=_compute_dtype(weight.dtype))


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise ConfigError(f"side={side!r} is not valid; valid: 'columns' (indices into dim 1), 'rows' (dim 0)")


def _side_length(weight: torch.Tensor, side: str) -> int:
    return weight.shape[1] if side == "columns" else weight.shape[0]


def _squared_norms(weight: torch.Tensor, side: str) -> torch.Tensor:
    """Squared Euclidean norms of the columns (``side='columns'``) or rows of ``weight``."""
    return (weight * weight).sum(dim=0 if side == "columns" else 1)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores; ties broken by lower index (stable descending sort)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]


def _fill_by_norm(weight: torch.Tensor, side: str, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Extend ``chosen`` to ``k`` distinct indices with the unchosen indices of largest norm (ties: lower)."""
    if chosen.numel() >= k:
        return chosen
    scores = _squared_norms(weight, side).clone()
    scores[chosen] = -1.0  # norms are >= 0, so chosen indices sort last
    extra = _top_k(scores, k - chosen.numel())
    return torch.cat([chosen, extra])


# ----------------------------------------------------------------------------------------------------------
# singular vectors
# ----------------------------------------------------------------------------------------------------------


def _randomized_svd(
    a: torch.Tensor, q: int, *, seed: int, niter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomised thin SVD of ``a`` (m x n) of width ``q``: returns ``(U m x q, S q, V n x q)``.

    Halko, Martinsson & Tropp (2011), Algorithm 4.4 (randomised subspace iteration). The Gaussian test matrix
    is drawn on the CPU from a generator seeded with ``seed`` and then moved to ``a``'s device, so the result
    does not depend on, and does not change, any global RNG state. Cost: ``(2 + 2 * niter)`` products of
    ``a`` with an ``n x q`` or ``m x q`` matrix (``O(m * n * q)`` each), ``2 * niter + 2`` thin QRs
    (``O((m + n) * q^2)``) and one ``q x q`` SVD.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(a.shape[1], q, generator=generator, dtype=a.dtype).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mT @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    # SVD of the small q x n matrix B = basis^T a via B^T = Q2 R2 and svd(R2^T) (a q x q SVD; LAPACK's
    # direct SVD of a wide q x n matrix is several times slower).
    q2, r2 = torch.linalg.qr(a.mT @ basis)
    u_small, s, vh_small = torch.linalg.svd(r2.mT)
    return basis @ u_small, s, q2 @ vh_small.mT


class TruncatedSVD:
    """Leading singular triplets of a weight, computed once (lazily) and shared by both sides.

    ``basis("columns", k)`` is the ``in x k`` matrix of leading right singular vectors (used to select the
    columns ``I``), ``basis("rows", k)`` the ``out x k`` matrix of leading left singular vectors (used to
    select the rows ``J``); both are truncated to the numerical rank. The computation is done on the "tall"
    orientation of the weight (``weight`` if ``out >= in``, else ``weight.T``), so that a non-square weight
    and its transpose go through exactly the same arithmetic.

    Exact thin SVD when ``min(out, in) <= EXACT_SVD_MAX_DIM`` or the sketch width ``rank + oversample``
    reaches ``min(out, in)``; otherwise the randomised SVD of :func:`_randomized_svd`.
    """

    def __init__(self, weight: torch.Tensor, rank: int, *, seed: int = 0, oversample: int = 10, niter: int = 2) -> None:
        self.weight = _as_compute(weight)
        self.rank = int(rank)
        self.seed = int(seed)
        self.oversample = int(oversample)
        self.niter = int(niter)
        self._factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._exact = True

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._factors is None:
            w = self.weight
            transposed = w.shape[0] < w.shape[1]
            a = w.mT if transposed else w  # tall: m >= n
            n_min = min(a.shape)
            q = self.rank + max(self.oversample, 0)
            self._exact = n_min <= EXACT_SVD_MAX_DIM or q >= n_min
            if self._exact:
                u, s, vh = torch.linalg.svd(a, full_matrices=False)
                v = vh.mT
            else:
                u, s, v = _randomized_svd(a, q, seed=self.seed, niter=max(self.niter, 0))
            # singular vectors of ``w``: left (out x r), values, right (in x r)
            self._factors = (v, s, u) if transposed else (u, s, v)
        return self._factors

    @property
    def singular_values(self) -> torch.Tensor:
        return self._compute()[1]

    @property
    def numerical_rank(self) -> int:
        """Number of singular values above ``sigma_1 * max(out, in) * eps`` (the ``matrix_rank`` default)."""
        s = self.singular_values
        if s.numel() == 0 or float(s[0]) <= 0.0:
            return 0
        tol = float(s[0]) * max(self.weight.shape) * torch.finfo(s.dtype).eps
        return int((s > tol).sum())

    def basis(self, side: str, k: int) -> torch.Tensor:
        """Leading ``min(k, numerical_rank)`` singular vectors for ``side`` (``n_side x r`` matrix)."""
        _check_side(side)
        if k > self.rank:
            self.rank = k
            if self._factors is not None and not self._exact:
                self._factors = None  # the randomised sketch was sized for a smaller k: recompute wider
        left, _, right = self._compute()
        r = min(k, self.numerical_rank)
        return (right if side == "columns" else left)[:, :r]


def _svd_for(
    weight: torch.Tensor, k: int, svd: TruncatedSVD | None, *, seed: int, oversample: int, niter: int
) -> TruncatedSVD:
    if svd is None:
        svd = TruncatedSVD(weight, k, seed=seed, oversample=oversample, niter=niter)
    return svd


# ----------------------------------------------------------------------------------------------------------
# core index-selection algorithms on a basis
# ----------------------------------------------------------------------------------------------------------


def deim_indices(basis: torch.Tensor) -> torch.Tensor:
    """DEIM indices of the ``n x r`` ``basis`` (Sorensen & Embree 2016, Algorithm 1): ``r`` distinct indices.

    Greedy: ``p_1 = argmax |v_1|``; for ``j = 2..r`` the interpolation residual
    ``res = v_j - V[:, :j-1] @ solve(V[p, :j-1], v_j[p])`` is formed and ``p_j = argmax |res|`` (lowest
    index on exact ties). The residuals are computed incrementally as the Schur complements of Gaussian
    elimination on ``V`` with the chosen pivots (mathematically identical to the formula above; it is LU with
    partial pivoting, but with ties broken by original index), so the cost is ``O(n * r^2)`` instead of
    ``O(n * r^2 + r^4)``.
    """
    n, r = basis.shape
    work = basis.clone()
    chosen: list[int] = []
    taken = torch.zeros(n, dtype=torch.bool, device=basis.device)
    for j in range(r):
        col = work[:, j].abs().masked_fill(taken, -1.0)  # chosen rows have residual 0; mask for safety
        p = int(torch.argmax(col))
        chosen.append(p)
        taken[p] = True
        if j + 1 < r:
            multipliers = work[:, j] / work[p, j]
            work[:, j + 1 :].addr_(multipliers, work[p, j + 1 :].clone(), alpha=-1.0)
    return torch.tensor(chosen, dtype=torch.int64, device=basis.device)


def pivoted_qr_indices(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """First ``k`` column pivots of the column-pivoted QR (Businger & Golub 1965) of ``matrix`` (``r x n``).

    At each step the column with the largest residual norm (lowest index on ties) becomes the pivot; the
    residual norms are downdated with the projections on the new orthonormal direction, and recomputed
    exactly for columns whose residual fell below ``sqrt(eps)`` times its last exact value (the LAPACK
    ``xGEQP3`` safeguard against cancellation). Only the pivots are needed, so ``matrix`` is never updated:
    each step costs one ``r x n`` product. Cost ``O(k * r * n)``; ``k`` must not exceed ``min(r, n)``.
    """
    r, n = matrix.shape
    eps_sqrt = math.sqrt(torch.finfo(matrix.dtype).eps)
    ref = (matrix * matrix).sum(dim=0)  # last exactly computed squared residual norm of every column
    res = ref.clone()  # downdated squared residual norms
    q_basis = matrix.new_zeros(r, k)
    taken = torch.zeros(n, dtype=torch.bool, device=matrix.device)
    chosen: list[int] = []
    for j in range(k):
        p = int(torch.argmax(res.masked_fill(taken, -1.0)))
        chosen.append(p)
        taken[p] = True
        q_prev = q_basis[:, :j]
        q = matrix[:, p].clone()
        for _ in range(2):  # Gram-Schmidt twice is enough (Giraud et al. 2005)
            q -= q_prev @ (q_prev.mT @ q)
        q_norm = torch.linalg.vector_norm(q)
        if float(q_norm) == 0.0:
            break  # rank exhausted; the caller fills the rest
        q /= q_norm
        q_basis[:, j] = q
        res -= (q @ matrix) ** 2
        stale = (res <= eps_sqrt * ref) & ~taken
        if bool(stale.any()):
            cols = matrix[:, stale]
            cols = cols - q_basis[:, : j + 1] @ (q_basis[:, : j + 1].mT @ cols)
            exact = (cols * cols).sum(dim=0)
            res[stale] = exact
            ref[stale] = exact
    return torch.tensor(chosen, dtype=torch.int64, device=matrix.device)


# ----------------------------------------------------------------------------------------------------------
# strategies: (weight, k, side, *, seed, oversample, niter, svd) -> k distinct indices
# ----------------------------------------------------------------------------------------------------------


def select_deim(
    weight: torch.Tensor,
    k: int,
    side: Side,
    *,
    seed: int = 0,
    oversample: int = 10,
    niter: int = 2,
    svd: TruncatedSVD | None = None,
) -> torch.Tensor:
    """DEIM on the leading ``k`` singular vectors of ``weight``.

    Criterion: for ``side='columns'`` the right singular vectors ``V`` (``in x k``), for ``side='rows'`` the
    left ones (``out x k``); indices are the DEIM interpolation points of that basis (:func:`deim_indices`).
    If ``k`` exceeds the numerical rank ``r``, DEIM picks ``r`` and the rest are the largest-norm leftovers.
    Cost: the (truncated) SVD (see the module docstring) plus ``O(n * k^2)`` for the greedy selection.
    ``seed``, ``oversample``, ``niter`` only matter for the randomised SVD of large weights.
    """
    _check_side(side)
    w = _as_compute(weight)
    basis = _svd_for(w, k, svd, seed=seed, oversample=oversample, niter=niter).basis(side, k)
    chosen = deim_indices(basis)
    return _fill_by_norm(w, side, chosen, k)


def select_qdeim(
    weight: torch.Tensor,
    k: int,
    side: Side,
    *,
    seed: int = 0,
    oversample: int = 10,
    niter: int = 2,
    svd: TruncatedSVD | None = None,
) -> torch.Tensor:
    """Q-DEIM: the first ``k`` pivots of the column-pivoted QR of ``V_k^T`` (``k x n``).

    Criterion: ``V_k`` as in :func:`select_deim`; the pivots of ``qr(V_k^T, pivoting=True)`` (Drmac & Gugercin
    2016), computed in pure torch (:func:`pivoted_qr_indices`, agrees with ``scipy.linalg.qr``). If ``k``
    exceeds the numerical rank ``r``, the QR picks ``r`` and the rest are the largest-norm leftovers.
    Cost: the (truncated) SVD plus ``O(n * k^2)`` for the pivoted QR.
    """
    _check_side(side)
    w = _as_compute(weight)
    basis = _svd_for(w, k, svd, seed=seed, oversample=oversample, niter=niter).basis(side, k)
    chosen = pivoted_qr_indices(basis.mT, basis.shape[1])
    return _fill_by_norm(w, side, chosen, k)


def select_leverage(
    weight: torch.Tensor,
    k: int,
    side: Side,
    *,
    seed: int = 0,
    oversample: int = 10,
    niter: int = 2,
    svd: TruncatedSVD | None = None,
) -> torch.Tensor:
    """Top-``k`` rank-``k`` leverage scores.

    Criterion: score of index ``i`` is ``||V_k[i, :]||^2`` (squared row norm of the leading ``k`` singular
    vectors for the side; with ``k`` above the numerical rank ``r`` only ``r`` vectors are used); the ``k``
    largest are taken, ties broken by lower index (scores below ``1e2 * eps * max score`` count as 0).
    Cost: the (truncated) SVD plus ``O(n * k + n log n)``.
    """
    _check_side(side)
    w = _as_compute(weight)
    basis = _svd_for(w, k, svd, seed=seed, oversample=oversample, niter=niter).basis(side, k)
    scores = (basis * basis).sum(dim=1)
    if scores.numel():
        tiny = 100.0 * torch.finfo(scores.dtype).eps * float(scores.max())
        scores = scores.masked_fill(scores <= tiny, 0.0)
    return _top_k(scores, k)


def select_norm(
    weight: torch.Tensor,
    k: int,
    side: Side,
    *,
    seed: int = 0,
    oversample: int = 10,
    niter: int = 2,
    svd: TruncatedSVD | None = None,
) -> torch.Tensor:
    """Top-``k`` Euclidean norms of the columns (``side='columns'``) or rows of ``weight``.

    Criterion: ``||W[:, i]||`` (resp. ``||W[i, :]||``), the ``k`` largest, ties broken by lower index.
    Cost: ``O(out * in + n log n)``; no SVD. ``seed``, ``oversample``, ``niter``, ``svd`` are ignored.
    """
    _check_side(side)
    return _top_k(_squared_norms(_as_compute(weight), side), k)


def _side_seed(seed: int, side: str) -> int:
    """Seed of the ``random`` strategy for one side: sha256 of ``"seed:side"``, 63 bits.

    Rows and columns get independent streams, so a square weight does not get ``I == J``.
    """
    digest = hashlib.sha256(f"{int(seed)}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def select_random(
    weight: torch.Tensor,
    k: int,
    side: Side,
    *,
    seed: int = 0,
    oversample: int = 10,
    niter: int = 2,
    svd: TruncatedSVD | None = None,
) -> torch.Tensor:
    """Uniform sample of ``k`` indices without replacement (data-independent baseline).

    Criterion: ``torch.randperm(n, generator=g)[:k]`` with a CPU ``torch.Generator`` seeded from ``seed`` and
    the side (see :func:`_side_seed`), so it is deterministic, independent of the global RNG, and a different
    seed generally gives different indices. Cost: ``O(n)``.
    """
    _check_side(side)
    generator = torch.Generator(device="cpu").manual_seed(_side_seed(seed, side))
    return torch.randperm(_side_length(weight, side), generator=generator)[:k]


#: Registered selection strategies. A strategy is called as
#: ``fn(weight, k, side, seed=..., oversample=..., niter=..., svd=...)`` where ``weight`` is the float32
#: (float64) weight, ``side`` is ``'columns'`` (return indices into dim 1) or ``'rows'`` (into dim 0) and
#: ``svd`` a :class:`TruncatedSVD` shared by both sides; it returns ``k`` distinct indices in any order.
SELECTION_STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "deim": select_deim,
    "qdeim": select_qdeim,
    "leverage": select_leverage,
    "norm": select_norm,
    "random": select_random,
}

_SVD_STRATEGIES = frozenset({"deim", "qdeim", "leverage"})


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------


def _validate_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise SelectionError(
            f"weight must be a 2-D (out_features x in_features) tensor, got {weight.dim()}-D tensor of shape "
            f"{tuple(weight.shape)}"
        )
    if weight.is_complex() or not weight.is_floating_point():
        raise SelectionError(
            f"weight dtype {weight.dtype} is not a real floating-point dtype; valid: float16, bfloat16, "
            "float32, float64 (dequantize quantized weights before selecting a skeleton)"
        )
    if weight.is_meta:
        raise SelectionError(
            f"weight of shape {tuple(weight.shape)} is on the meta device (not materialised); load the real "
            "weights before selecting a skeleton"
        )


def _validate_k(name: str, k: object, shape: tuple[int, int]) -> int:
    limit = min(shape)
    try:
        if isinstance(k, bool):
            raise TypeError
        value = operator.index(k)  # type: ignore[arg-type]
    except TypeError:
        raise SelectionError(
            f"{name}={k!r} must be an integer with 1 <= {name} < min(out, in) = {limit} for layer of shape {shape}"
        ) from None
    if not 1 <= value < limit:
        hint = "" if limit > 1 else " (no valid value: the layer is too small for a skeleton)"
        raise SelectionError(
            f"{name}={value} must satisfy 1 <= {name} < min(out, in) = {limit} for layer of shape {shape}{hint}"
        )
    return value


def _finalize(indices: torch.Tensor, k: int, n: int, strategy: str, side: str) -> torch.Tensor:
    indices = torch.as_tensor(indices).detach().to(device="cpu", dtype=torch.int64).reshape(-1)
    indices = torch.sort(indices).values
    ok = (
        indices.numel() == k
        and (k == 0 or (int(indices[0]) >= 0 and int(indices[-1]) < n))
        and bool((indices[1:] != indices[:-1]).all())
    )
    if not ok:
        raise SelectionError(
            f"selection strategy {strategy!r} returned {indices.numel()} indices for side {side!r}; expected "
            f"{k} distinct indices in [0, {n})"
        )
    return indices


def select_skeleton(
    weight: torch.Tensor,
    k_in: int,
    k_out: int,
    strategy: str = "deim",
    *,
    seed: int = 0,
    oversample: int = 10,
    niter: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the PMSS skeleton ``(I, J)`` of a linear weight.

    Args:
        weight: ``out_features x in_features`` weight (PyTorch ``nn.Linear`` layout; for a transformers
            ``Conv1D``, whose weight is ``in x out``, pass ``weight.T``). Any real floating dtype and device;
            the computation runs in float32 (float64 for float64 weights) on the weight's device.
        k_in: number of columns ``|I|``; must satisfy ``1 <= k_in < min(out, in)``.
        k_out: number of rows ``|J|``; must satisfy ``1 <= k_out < min(out, in)``. ``k == min(out, in)`` is
            rejected too: the selection would then be (for the smaller side) every index, not a skeleton.
        strategy: a key of :data:`SELECTION_STRATEGIES` (``deim``, ``qdeim``, ``leverage``, ``norm``,
            ``random``).
        seed: seed of the ``random`` strategy and of the randomised SVD (weights with
            ``min(out, in) > EXACT_SVD_MAX_DIM``).
        oversample: extra sketch columns of the randomised SVD (``q = max(k_in, k_out) + oversample``).
        niter: power iterations of the randomised SVD.

    Returns:
        ``(I, J)``: ``I`` column indices (into dim 1, ``in_features``), ``J`` row indices (into dim 0,
        ``out_features``), each a 1-D int64 CPU tensor, sorted ascending, distinct. The update is
        ``weight[:, I] @ U @ weight[J, :]`` with ``U`` of shape ``(k_in, k_out)``.

    Raises:
        SelectionError: weight not 2-D / not floating / on meta / containing NaN or inf / all zeros, or
            ``k_in`` / ``k_out`` out of range.
        UnknownStructureError: ``strategy`` is not registered.
    """
    if strategy not in SELECTION_STRATEGIES:
        valid = ", ".join(sorted(SELECTION_STRATEGIES))
        raise UnknownStructureError(f"unknown selection strategy {strategy!r}; valid: {valid}")
    _validate_weight(weight)
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    k_in = _validate_k("k_in", k_in, shape)
    k_out = _validate_k("k_out", k_out, shape)

    w = _as_compute(weight)
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(w).sum())
        n_inf = int(torch.isinf(w).sum())
        raise SelectionError(
            f"weight of shape {shape} contains {n_nan} NaN and {n_inf} inf entries; a skeleton can only be "
            "selected from a finite weight"
        )
    if not bool((w != 0).any()):
        raise SelectionError(
            f"weight of shape {shape} is all zeros; its skeleton update weight[:, I] @ U @ weight[J, :] "
            "would be identically zero (exclude this module from target_modules)"
        )

    fn = SELECTION_STRATEGIES[strategy]
    svd = TruncatedSVD(w, max(k_in, k_out), seed=seed, oversample=oversample, niter=niter)
    kwargs = {"seed": seed, "oversample": oversample, "niter": niter, "svd": svd}
    cols = fn(w, k_in, "columns", **kwargs)
    rows = fn(w, k_out, "rows", **kwargs)
    i_idx = _finalize(cols, k_in, shape[1], strategy, "columns")
    j_idx = _finalize(rows, k_out, shape[0], strategy, "rows")
    return i_idx, j_idx


def skeleton_checksum(weight: torch.Tensor, I: torch.Tensor, J: torch.Tensor) -> str:  # noqa: E741
    """Short hex digest (16 hex chars, 64 bits of sha256) identifying the skeleton factors of ``weight``.

    Hashes, in this order: the shapes of ``weight``, ``I`` and ``J``; the indices ``I`` and ``J`` (int64
    little-endian); the bytes of ``weight[:, I]`` and ``weight[J, :]`` converted to float32, contiguous, on
    the CPU, little-endian. Used to detect that an adapter is loaded onto a base model whose weights differ
    from the one it was created on. Values that round to the same float32 (e.g. a bf16 weight and its exact
    float32 upcast) give the same checksum; a float32 weight and its bf16 rounding generally do not.
    """
    _validate_weight(weight)
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    parts = []
    for name, idx, n in (("I", I, shape[1]), ("J", J, shape[0])):
        idx = torch.as_tensor(idx)
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise SelectionError(
                f"{name} must be a 1-D integer index tensor, got dtype {idx.dtype} and shape {tuple(idx.shape)}"
            )
        idx = idx.to(device="cpu", dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise SelectionError(
                f"{name} has indices in [{int(idx.min())}, {int(idx.max())}], outside [0, {n}) for weight of "
                f"shape {shape}"
            )
        parts.append(idx)
    i_idx, j_idx = parts
    w = weight.detach()
    cols = w[:, i_idx.to(w.device)].to(device="cpu", dtype=torch.float32).contiguous()
    rows = w[j_idx.to(w.device), :].to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(f"pmss-skeleton-v1;{shape};{tuple(i_idx.shape)};{tuple(j_idx.shape)};".encode())
    for t, fmt in ((i_idx, "<i8"), (j_idx, "<i8"), (cols, "<f4"), (rows, "<f4")):
        h.update(t.numpy().astype(fmt, copy=False).tobytes())
    return h.hexdigest()[:16]


SKETCH_SIZE = 8  # signed sums per sketch


def _sketch_signs(n: int, t: int) -> torch.Tensor:
    """±1 for entries 0..n-1 of projection t: bit 15 of a multiplicative (Weyl) hash of the entry index, in plain
    int64 arithmetic, so the signs are the same on every platform and torch version."""
    e = torch.arange(n, dtype=torch.int64)
    h = (e * 0x9E3779B1 + (t + 1) * 0x85EBCA77) & 0xFFFFFFFF
    return 1.0 - 2.0 * ((h >> 15) & 1).to(torch.float64)


def skeleton_sketch(weight: torch.Tensor, I: torch.Tensor, J: torch.Tensor) -> list[float] | None:  # noqa: E741
    """A rounding-tolerant fingerprint of the skeleton factors: ``[‖F‖, s_1, ..., s_8]`` for F the entries of
    ``weight[:, I]`` then ``weight[J, :]`` (row-major, in float64) and s_t = Σ_e σ_t(e)·F_e with fixed ±1 signs.

    Rounding every entry by a relative δ (fp16: 2⁻¹¹, bf16: 2⁻⁹) moves each s_t by about δ·‖F‖ / √3 (signed,
    independent errors); other weights move them by about ‖F‖. :func:`sketch_difference` compares two sketches.
    ``None`` where an entry is not finite (the exact checksum then decides alone).
    """
    w = weight.detach()
    i_idx = torch.as_tensor(I).to(device=w.device, dtype=torch.int64)
    j_idx = torch.as_tensor(J).to(device=w.device, dtype=torch.int64)
    f = torch.cat([w[:, i_idx].reshape(-1), w[j_idx, :].reshape(-1)]).to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(f).all()):
        return None
    sums = [float(_sketch_signs(f.numel(), t) @ f) for t in range(SKETCH_SIZE)]
    return [float(f.norm()), *sums]


def sketch_difference(found: list[float], recorded: list[float]) -> float:
    """The largest difference between two :func:`skeleton_sketch` values (the norm and each signed sum), relative
    to the recorded norm: below 1e-2 for the same weights rounded to fp16 or bf16, about 1 for other weights."""
    if len(found) != len(recorded):
        return math.inf
    scale = abs(recorded[0])
    diff = max(abs(a - b) for a, b in zip(found, recorded, strict=True))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale
