"""Best approximations of a target matrix T (out × in) within each structure family, at a given size.

* ``lora``: rank r = floor(P / (out + in)) truncated SVD; by Eckart–Young the optimum, error
  sqrt(Σ_{i>r} σ_i²) / ||T||_F.
* ``circulant``: closed form. The block-circulant matrices of a block size are a linear space in which every
  entry of T lies on exactly one wrapped diagonal (a − s) mod b of one block, so the orthogonal projection sets
  each diagonal to the mean of T over its entries (entries cropped away by the padding are free).
* ``toeplitz-f1``: one Toeplitz factor per block, closed form: the mean of T over each (unwrapped) diagonal.
* ``toeplitz-f2``: the paper's product of two Toeplitz factors per block; Adam from the warm start
  T(e)·T₁ with T₁ the ``toeplitz-f1`` projection and T(e) the identity (a local optimum).
* ``kronecker``: one product L ⊗ R, closed form (Van Loan & Pitsianis 1993): with the rearrangement
  𝓡(T)[(a₁, b₁), (a₂, b₂)] = T[a₁·o₂ + a₂, b₁·i₂ + b₂], ||T − L ⊗ R||_F = ||𝓡(T) − vec(L)·vec(R)ᵀ||_F, so the
  best pair is the best rank-1 approximation of 𝓡(T) (for a sum of k products, its best rank k). Every exact
  factor shape (o₁ | out, i₁ | in) is tried and the best one within the budget is kept.
* ``ldr-r{1,2,4}``: Σ_k circ(c_k)·skew(h_k) blocks of displacement rank r; Adam from the warm start
  circ(c₁)·skew(e₀) = the circulant projection (other terms: circ 0, skew random), so never worse than it at the
  same block size (a local optimum).
* ``pmss-cur`` (P = k² trainable entries of U): C·U·R with k DEIM-selected columns C and rows R of T itself and the
  optimal core U = C⁺·T·R⁺. The skeleton is taken from the target, which PMSS cannot do in fine-tuning (there it
  comes from the pretrained W, not from ΔW), so this is an optimistic reference, not a like-for-like method.

Gradient fitting minimises ||T̃ − S||_F² / ||T̃||_F² (T̃ = T / rms(T)) through the operator's ``to_dense()`` with
Adam (``--steps``, peak ``--lr``, 5 % linear warm-up then cosine decay to 1 % of the peak) and keeps the best
iterate, the warm start included.

"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..operators import StructuredOperator
from ..operators.circulant import CirculantOperator
from ..operators.kronecker import KroneckerOperator
from ..operators.ldr import LDROperator
from ..operators.toeplitz import ToeplitzOperator


# ----------------------------------------------------------------------------------------------------- helpers
def relative_error(target: torch.Tensor, approx: torch.Tensor) -> float:
    """||T − S||_F / ||T||_F, computed in float64."""
    t = target.detach().double()
    return float(torch.linalg.matrix_norm(t - approx.detach().double()) / torch.linalg.matrix_norm(t))


def _padded_blocks(target: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T zero-padded to (q·b) × (p·b) and cut into blocks (q, p, b, b), with the 0/1 mask of real entries."""
    out_f, in_f = target.shape
    b = block_size
    q, p = math.ceil(out_f / b), math.ceil(in_f / b)
    padded = target.new_zeros(q * b, p * b)
    padded[:out_f, :in_f] = target
    mask = torch.zeros_like(padded)
    mask[:out_f, :in_f] = 1.0

    def blocks(m: torch.Tensor) -> torch.Tensor:
        return m.reshape(q, b, p, b).permute(0, 2, 1, 3)

    return blocks(padded), blocks(mask)


def _diagonal_means(target: torch.Tensor, block_size: int, index: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per block (i, j) and bin d, the mean of T over the entries (a, s) of the block with index[a, s] = d that lie
    inside the (cropped) matrix; 0 for a bin with no such entry. Returns (q, p, n_bins)."""
    blocks, mask = _padded_blocks(target, block_size)
    q, p, b, _ = blocks.shape
    idx = index.reshape(1, 1, b * b).expand(q, p, b * b)
    sums = blocks.new_zeros(q, p, n_bins).scatter_add_(2, idx, blocks.reshape(q, p, b * b))
    counts = blocks.new_zeros(q, p, n_bins).scatter_add_(2, idx, mask.reshape(q, p, b * b))
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))


# ----------------------------------------------------------------------------------------- closed-form fits
def circulant_projection(target: torch.Tensor, block_size: int | None = None) -> CirculantOperator:
    """The block-circulant matrix of block size b nearest to ``target`` in Frobenius norm, as an operator.

    circ(c)[a, s] = c[(a − s) mod b]: each parameter c_ij[d] multiplies the entries of block (i, j) on the wrapped
    diagonal d, so the orthogonal projection onto this linear space sets c_ij[d] to the mean of T over them.
    """
    out_f, in_f = target.shape
    op = CirculantOperator(out_f, in_f, block_size=block_size)
    b = op.block_size
    index = (torch.arange(b)[:, None] - torch.arange(b)[None, :]) % b
    with torch.no_grad():
        op.weight.copy_(_diagonal_means(target.float(), b, index, b))
    return op


def toeplitz_projection(target: torch.Tensor, block_size: int | None = None) -> ToeplitzOperator:
    """The block-Toeplitz matrix (one Toeplitz factor per block) nearest to ``target``: T(v)[a, s] =
    v[a − s + b − 1], so each of the 2b − 1 diagonals of each block is set to the mean of T over it."""
    out_f, in_f = target.shape
    op = ToeplitzOperator(out_f, in_f, block_size=block_size, num_factors=1)
    b = op.block_size
    index = torch.arange(b)[:, None] - torch.arange(b)[None, :] + b - 1
    with torch.no_grad():
        op.weight[0].copy_(_diagonal_means(target.float(), b, index, 2 * b - 1))
    return op


def _rearrange(target: torch.Tensor, factor_shape: tuple[int, int]) -> torch.Tensor:
    """Van Loan–Pitsianis rearrangement 𝓡(T) of shape (o₁·i₁) × (o₂·i₂): 𝓡(T)[(a₁, b₁), (a₂, b₂)] =
    T[a₁·o₂ + a₂, b₁·i₂ + b₂], so that 𝓡(L ⊗ R) = vec(L)·vec(R)ᵀ."""
    (o1, i1), (out_f, in_f) = factor_shape, target.shape
    o2, i2 = out_f // o1, in_f // i1
    return target.reshape(o1, o2, i1, i2).permute(0, 2, 1, 3).reshape(o1 * i1, o2 * i2)


def _check_exact_shape(target: torch.Tensor, factor_shape: tuple[int, int]) -> tuple[int, int]:
    o1, i1 = (int(v) for v in factor_shape)
    out_f, in_f = target.shape
    if o1 < 1 or i1 < 1 or out_f % o1 or in_f % i1:
        raise ConfigError(
            f"factor_shape={factor_shape!r} does not divide the target shape {tuple(target.shape)}: the closed-form "
            "Kronecker projection needs o1 | out and i1 | in"
        )
    return o1, i1


def kronecker_sum_projection(
    target: torch.Tensor, factor_shape: tuple[int, int], terms: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best Σ_{k<terms} L_k ⊗ R_k (L_k o₁ × i₁, R_k o₂ × i₂) in Frobenius norm, by the truncated SVD of 𝓡(T).

    Returns ``(dense, lefts, rights)`` with ``lefts`` (terms, o₁, i₁) and ``rights`` (terms, o₂, i₂); the singular
    value is split evenly, L_k = sqrt(σ_k)·u_k, R_k = sqrt(σ_k)·v_k. Needs o₁ | out and i₁ | in.
    """
    o1, i1 = _check_exact_shape(target, factor_shape)
    out_f, in_f = target.shape
    o2, i2 = out_f // o1, in_f // i1
    u, s, vh = torch.linalg.svd(_rearrange(target, (o1, i1)), full_matrices=False)
    k = min(terms, s.numel())
    root = s[:k].sqrt()
    lefts = (u[:, :k] * root).T.reshape(k, o1, i1)
    rights = (vh[:k] * root[:, None]).reshape(k, o2, i2)
    dense = torch.einsum("kac,kbd->abcd", lefts, rights).reshape(out_f, in_f)
    return dense, lefts, rights


def kronecker_projection(target: torch.Tensor, factor_shape: tuple[int, int]) -> KroneckerOperator:
    """The single Kronecker product L ⊗ R of the given factor shape nearest to ``target`` (best rank 1 of 𝓡(T))."""
    _, lefts, rights = kronecker_sum_projection(target.float(), factor_shape, 1)
    o1, i1 = factor_shape  # a pair: kronecker_sum_projection has checked it
    op = KroneckerOperator(target.shape[0], target.shape[1], factor_shape=(o1, i1))
    with torch.no_grad():
        op.left.copy_(lefts[0])
        op.right.copy_(rights[0])
    return op


def exact_kronecker_shapes(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """Factor shapes (o₁, i₁) with o₁ | out and i₁ | in (no padding), excluding the trivial L = 1 × 1 and R = 1 × 1."""
    shapes = [
        (o1, i1)
        for o1 in range(1, out_features + 1)
        if out_features % o1 == 0
        for i1 in range(1, in_features + 1)
        if in_features % i1 == 0
    ]
    return [s for s in shapes if s != (1, 1) and s != (out_features, in_features)]


def kronecker_shape_errors(target: torch.Tensor) -> dict[tuple[int, int], tuple[int, float]]:
    """For every exact factor shape: (parameters o₁·i₁ + o₂·i₂, squared residual ||T||² − σ₁(𝓡(T))²)."""
    t = target.double()
    total = float((t * t).sum())
    result = {}
    for shape in exact_kronecker_shapes(*target.shape):
        r = _rearrange(t, shape)
        gram = r @ r.T if r.shape[0] <= r.shape[1] else r.T @ r
        sigma1_sq = float(torch.linalg.eigvalsh(gram)[-1])
        o1, i1 = shape
        params = o1 * i1 + (target.shape[0] // o1) * (target.shape[1] // i1)
        result[shape] = (params, max(total - sigma1_sq, 0.0))
    return result


def lora_projection(target: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation (Eckart–Young): U_r·diag(σ_r)·V_rᵀ, the optimum of LoRA B·A of that rank."""
    u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def skeleton_projection(target: torch.Tensor, k: int, strategy: str = "deim") -> torch.Tensor:
    """C·U·R with k columns C = T[:, I] and rows R = T[J, :] selected by ``strategy`` (DEIM) and the optimal core
    U = C⁺·T·R⁺ (the least-squares core for fixed C and R)."""
    from ..selection import select_skeleton

    cols, rows = select_skeleton(target.float(), k, k, strategy)
    t = target.double()
    c, r = t[:, cols], t[rows, :]
    core = torch.linalg.pinv(c) @ t @ torch.linalg.pinv(r)
    return c @ core @ r


# ------------------------------------------------------------------------------------------- gradient fits
@dataclass
class FitResult:
    """A gradient fit: the best dense approximation found and its history."""

    dense: torch.Tensor
    init_error: float
    best_error: float
    best_step: int
    seconds: float


def fit_adam(
    op: StructuredOperator,
    target: torch.Tensor,
    *,
    steps: int,
    lr: float,
    progress: bool = False,
    desc: str = "",
) -> FitResult:
    """Fit ``op``'s parameters (initialised by the caller) to ``target`` by Adam on ||T − S||_F² / ||T||_F².

    Schedule: linear warm-up over the first 5 % of the steps, then cosine decay from ``lr`` to ``lr / 100``. The best
    iterate (the initial one included) is returned: this is a local optimum of a non-convex problem, not a certified
    best approximation. The learning rate assumes entries of unit scale (see :func:`normalise`).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    goal = target.float()
    denom = float(goal.pow(2).sum()) or 1.0
    params = [p for p in op.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    best_dense: torch.Tensor | None = None
    init_error = best_error = math.inf
    best_step = 0
    bar = tqdm(range(steps + 1), desc=desc, leave=False, disable=not progress, file=sys.stderr)
    for step in bar:
        dense = op.to_dense().float()
        loss = (dense - goal).pow(2).sum() / denom
        err = math.sqrt(max(loss.item(), 0.0))  # error of the current iterate (step 0: the initialisation)
        if step == 0:
            init_error = err
        if err < best_error:
            best_error, best_step, best_dense = err, step, dense.detach().clone()
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and step % 50 == 0:
            bar.set_postfix(err=f"{err:.4f}")
    assert best_dense is not None
    return FitResult(best_dense, init_error, relative_error(goal, best_dense), best_step, time.perf_counter() - start)


def normalise(target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(T / rms(T), rms(T)): relative errors do not depend on the scale, and unit-scale entries let one learning
    rate serve every target."""
    scale = float(target.float().pow(2).mean().sqrt()) or 1.0
    return target.float() / scale, scale


def toeplitz2_warm_start(target: torch.Tensor, block_size: int | None) -> ToeplitzOperator:
    """A two-factor Toeplitz operator equal to the one-factor projection: T₂·T₁ with T₁ = I, T₂ = projection."""
    single = toeplitz_projection(target, block_size)
    op = ToeplitzOperator(target.shape[0], target.shape[1], block_size=single.block_size, num_factors=2)
    b = op.block_size
    with torch.no_grad():
        op.weight.zero_()
        op.weight[0, ..., b - 1] = 1.0  # factor 0 (applied first) = identity
        op.weight[1].copy_(single.weight[0])
    return op


def ldr_warm_start(target: torch.Tensor, block_size: int | None, rank: int, generator: torch.Generator) -> LDROperator:
    """An LDR operator equal to the circulant projection at its block size: term 0 = circ(c)·skew(e₀) with skew(e₀)
    = I; terms 1.. have circ = 0 (so they add nothing) and random skew ~ N(0, 1/b) (so their circ gets gradient)."""
    op = LDROperator(target.shape[0], target.shape[1], block_size=block_size, displacement_rank=rank)
    circ = circulant_projection(target, op.block_size)
    b = op.block_size
    with torch.no_grad():
        op.circ.zero_()
        op.skew.zero_()
        op.circ[0].copy_(circ.weight)
        op.skew[0, ..., 0] = 1.0
        if rank > 1:
            op.skew[1:].copy_(torch.randn(op.skew[1:].shape, generator=generator) * b**-0.5)
    return op
