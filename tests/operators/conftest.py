"""The structure table shared by the operator tests.

``STRUCTURES`` holds, for every structure, everything the generic test matrix in ``test_operators.py`` needs
to know about it, written from the specification of the structure and independently of its implementation:

* ``cases``: the option dicts to exercise (``big_cases``: the subset also run on the large layer shapes);
* ``dense_reference(op)``: ΔW rebuilt from ``op``'s parameters with numpy (never ``op.to_dense()``);
* ``check_structure(op, dense)``: asserts that ``dense`` (a matrix of ``op``'s shape) has the structure that
  ``op``'s options claim, and returns how many of its constraints could have failed (0 means the structure
  puts no constraint on matrices of that shape, e.g. a 1 × 5 circulant crop);
* ``expected_options`` / ``expected_param_shapes`` / ``spec_num_parameters``: the resolved options, the
  parameter shapes and the parameter count the specification gives;
* ``bad_options``: invalid option sets and the bad value their ``ConfigError`` message must contain;
* ``extra_check(op)``: further per-structure checks of a random operator;
* ``min_budget(out, in)``: the fewest parameters the specification allows on an out × in layer over the size
  option that ``options_for_budget`` chooses (the other options at their defaults): a smaller budget must raise;
* ``constrains``: whether the structure constrains ΔW at all (False for ``dense``: every matrix is one).

The fixtures ``case`` (structure × options), ``big_case``, ``structure`` and ``bad_option`` expose the table
to the tests; a structure that is not registered (yet) in ``OPERATORS`` is skipped by them, and failed by
``test_registry_lists_structure``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from structpeft.operators import OPERATORS, StructuredOperator
from testkit import saved_bytes

# Relative tolerance of the float64 structure checks and of numerical ranks.
STRUCTURE_RTOL = 1e-10
RANK_RTOL = 1e-9


# ------------------------------------------------------------------------------------------- numpy builders
def circulant_matrices(c: np.ndarray) -> np.ndarray:
    """(..., b) -> (..., b, b): circ(c)[r, s] = c[(r - s) mod b], built column by column: roll(c, s)."""
    b = c.shape[-1]
    return np.stack([np.roll(c, s, axis=-1) for s in range(b)], axis=-1)


def toeplitz_matrices(v: np.ndarray) -> np.ndarray:
    """(..., 2b-1) -> (..., b, b): T(v)[r, s] = v[r - s + b - 1]; column s is the window v[b-1-s : 2b-1-s]."""
    b = (v.shape[-1] + 1) // 2
    assert v.shape[-1] == 2 * b - 1
    return np.stack([v[..., b - 1 - s : 2 * b - 1 - s] for s in range(b)], axis=-1)


def skew_circulant_matrices(s: np.ndarray) -> np.ndarray:
    """(..., b) -> (..., b, b): skew(s)[a, c] = s[a - c] (a >= c), -s[a - c + b] (a < c).

    Column c is roll(s, c) with its first c entries negated.
    """
    b = s.shape[-1]
    cols = []
    for c in range(b):
        col = np.roll(s, c, axis=-1).copy()
        col[..., :c] *= -1.0
        cols.append(col)
    return np.stack(cols, axis=-1)


def assemble_blocks(blocks: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """(q, p, b, b) blocks -> the (q·b × p·b) block matrix, cropped to (out, in), one block at a time."""
    q, p, b, _ = blocks.shape
    full = np.zeros((q * b, p * b), dtype=blocks.dtype)
    for i in range(q):
        for j in range(p):
            full[i * b : (i + 1) * b, j * b : (j + 1) * b] = blocks[i, j]
    return full[:out_features, :in_features]


def params_np(op: StructuredOperator) -> dict[str, np.ndarray]:
    return {name: p.detach().to(torch.float64).cpu().numpy() for name, p in op.named_parameters()}


def cyclic_shift(n: int, corner: float) -> np.ndarray:
    """The n × n down-shift Z: Z[a, a-1] = 1 and Z[0, n-1] = corner (0: plain, ±1: (skew-)cyclic shift)."""
    z = np.zeros((n, n))
    z[np.arange(1, n), np.arange(0, n - 1)] = 1.0
    z[0, n - 1] += corner
    return z


def numerical_rank(m: np.ndarray, scale: float) -> int:
    if m.size == 0 or scale == 0.0:
        return 0
    sv = np.linalg.svd(m, compute_uv=False)
    return int((sv > RANK_RTOL * scale).sum())


def grid(out_features: int, in_features: int, b: int) -> tuple[int, int]:
    return math.ceil(out_features / b), math.ceil(in_features / b)


def resolved_block_size(out_features: int, in_features: int, requested: int | None) -> int:
    n = max(out_features, in_features)
    return n if requested is None else min(requested, n)


def as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


def visible_blocks(dense: np.ndarray, bh: int, bw: int):
    """Yield (i, j, block) for the visible part of every bh × bw block of ``dense`` (cropped at the edges)."""
    out_features, in_features = dense.shape
    for i in range(math.ceil(out_features / bh)):
        for j in range(math.ceil(in_features / bw)):
            yield i, j, dense[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]


# ------------------------------------------------------------------------------------------- generic checks
def check_constant_classes(dense: np.ndarray, b: int, *, cyclic: bool) -> int:
    """Within every (visible part of a) b × b block, entries with equal (r - s) mod b (``cyclic``) or equal
    r - s are equal. Returns the number of (block, class) groups with at least two visible entries."""
    scale = max(float(np.abs(dense).max(initial=0.0)), 1e-300)
    nontrivial = 0
    for i, j, blk in visible_blocks(dense, b, b):
        m, n = blk.shape
        key = np.arange(m)[:, None] - np.arange(n)[None, :]
        if cyclic:
            key = key % b
        for k in np.unique(key):
            vals = blk[key == k]
            if vals.size >= 2:
                nontrivial += 1
                spread = float(vals.max() - vals.min())
                assert spread <= STRUCTURE_RTOL * scale, (
                    f"block ({i}, {j}) is not constant on {'wrap-around ' if cyclic else ''}diagonal {k}: values {vals}"
                )
    return nontrivial


def check_displacement_rank(dense: np.ndarray, b: int, rank: int, left_corner: float, right_corner: float) -> int:
    """Every b × b block M satisfies rank(Z_l M - M Z_r) <= ``rank``, where Z_l / Z_r are the down-shifts with
    corner entries ``left_corner`` / ``right_corner``.

    A block cropped to m × n (m < b or n < b) is checked with the m × m / n × n shifts of the same kind:
    cropping changes the displacement only in row 0 (if m < b and the left shift wraps around) and in column
    n - 1 (if n < b), so the bound grows by one for each of these. Returns the number of blocks where the
    bound is smaller than min(m, n), i.e. where a generic matrix would fail.
    """
    nontrivial = 0
    for i, j, blk in visible_blocks(dense, b, b):
        m, n = blk.shape
        bound = rank + int(m < b and left_corner != 0.0) + int(n < b)
        disp = cyclic_shift(m, left_corner) @ blk - blk @ cyclic_shift(n, right_corner)
        scale = float(np.linalg.svd(blk, compute_uv=False)[0])
        got = numerical_rank(disp, scale)
        assert got <= bound, f"block ({i}, {j}) ({m} x {n}) has displacement rank {got} > {bound}"
        if bound < min(m, n):
            nontrivial += 1
    return nontrivial


# ------------------------------------------------------------------------------------------- circulant
def circulant_reference(op: StructuredOperator) -> np.ndarray:
    w = params_np(op)["weight"]
    return assemble_blocks(circulant_matrices(w), op.out_features, op.in_features)


def circulant_check(op: StructuredOperator, dense: np.ndarray) -> int:
    return check_constant_classes(dense, op.options["block_size"], cyclic=True)


def check_own_backward(op: StructuredOperator, weight_spectrum: Callable[[], torch.Tensor], **window: int) -> None:
    """The training product through ``circular_product_for_training`` keeps x and the weight alone, and its
    gradients (and their own gradients) are autograd's through ``circular_product`` (rfft · einsum · irfft) from
    ``weight_spectrum()``, to float64 rounding; ``window``: the product's n_fft / offset."""
    from structpeft.operators.circulant import circular_product

    x = torch.randn(6, op.in_features, dtype=op.weight.dtype, requires_grad=True)
    g = torch.randn(6, op.out_features, dtype=op.weight.dtype)
    assert saved_bytes(lambda: op(x)) == 8 * (x.numel() + op.weight.numel())
    y = op(x)
    assert type(y.grad_fn).__name__ == "_CircularProductBackward"
    reference = circular_product(x, weight_spectrum(), op.grid, op.block_size, op.out_features, **window)
    assert torch.equal(y, reference)
    got = torch.autograd.grad(y, (x, op.weight), g, create_graph=True)
    expected = torch.autograd.grad(reference, (x, op.weight), g, create_graph=True)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # second derivatives: of Σ ∂x² (a gradient penalty) with respect to the weight
    second = [torch.autograd.grad(d[0].pow(2).sum(), op.weight)[0] for d in (got, expected)]
    torch.testing.assert_close(second[0], second[1], rtol=1e-12, atol=1e-12)


def circulant_extra_check(op: StructuredOperator) -> None:
    """The training product has a backward of its own (see ``check_own_backward``)."""
    check_own_backward(op, lambda: torch.fft.rfft(op.weight, dim=-1))


def circulant_param_shapes(out_features: int, in_features: int, options: dict) -> dict[str, tuple]:
    b = options["block_size"]
    return {"weight": (*grid(out_features, in_features, b), b)}


def circulant_expected_options(out_features: int, in_features: int, requested: dict) -> dict:
    return {"block_size": resolved_block_size(out_features, in_features, requested.get("block_size"))}


# ------------------------------------------------------------------------------------------- toeplitz
def toeplitz_reference(op: StructuredOperator, *, reverse: bool = False) -> np.ndarray:
    w = params_np(op)["weight"]  # (F, q, p, 2b-1)
    factors = toeplitz_matrices(w)  # (F, q, p, b, b)
    order = range(factors.shape[0])
    if reverse:  # the wrong order, used to show that the reference pins the order down
        order = reversed(order)
    blocks = None
    for f in order:  # factor 0 is applied first: block = T_{F-1} @ ... @ T_1 @ T_0
        blocks = factors[f] if blocks is None else factors[f] @ blocks
    return assemble_blocks(blocks, op.out_features, op.in_features)


def toeplitz_check(op: StructuredOperator, dense: np.ndarray) -> int:
    b, num_factors = op.options["block_size"], op.options["num_factors"]
    nontrivial = 0
    if num_factors == 1:  # ΔW itself is block-Toeplitz
        nontrivial += check_constant_classes(dense, b, cyclic=False)
    # A product of F Toeplitz matrices has (non-cyclic) displacement rank <= 2F: ∇(AB) = ∇(A) B + A ∇(B).
    nontrivial += check_displacement_rank(dense, b, 2 * num_factors, 0.0, 0.0)
    return nontrivial


def toeplitz_extra_check(op: StructuredOperator) -> None:
    """Each factor alone (the others set to the identity T(e_{b-1})) is Toeplitz; the factor order matters. One
    factor: the training product has a backward of its own, the circulant's at length 2b, window offset b − 1 (see
    ``check_own_backward``)."""
    if op.options["num_factors"] == 1:
        b = op.block_size
        check_own_backward(op, lambda: torch.fft.rfft(op.weight[0], n=2 * b, dim=-1), n_fft=2 * b, offset=b - 1)
    b, num_factors = op.options["block_size"], op.options["num_factors"]
    identity = torch.zeros(2 * b - 1, dtype=op.weight.dtype)
    identity[b - 1] = 1.0
    for f in range(num_factors):
        single = copy.deepcopy(op)
        with torch.no_grad():
            for g in range(num_factors):
                if g != f:
                    single.weight[g] = identity
        dense = single.to_dense().detach().numpy()
        expected = assemble_blocks(
            toeplitz_matrices(op.weight[f].detach().to(torch.float64).numpy()),
            op.out_features,
            op.in_features,
        )
        np.testing.assert_allclose(dense, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
        check_constant_classes(dense, b, cyclic=False)
    if num_factors > 1 and min(op.out_features, op.in_features) >= 3 and b >= 3:
        # Toeplitz matrices do not commute in general: the reversed product is a different matrix.
        dense = op.to_dense().detach().numpy()
        assert np.abs(dense - toeplitz_reference(op, reverse=True)).max() > 1e-6 * np.abs(dense).max()


def toeplitz_param_shapes(out_features: int, in_features: int, options: dict) -> dict[str, tuple]:
    b = options["block_size"]
    return {"weight": (options["num_factors"], *grid(out_features, in_features, b), 2 * b - 1)}


def toeplitz_expected_options(out_features: int, in_features: int, requested: dict) -> dict:
    return {
        "block_size": resolved_block_size(out_features, in_features, requested.get("block_size")),
        "num_factors": requested.get("num_factors", 2),
    }


# ------------------------------------------------------------------------------------------- kronecker
def kronecker_factor_shapes(op: StructuredOperator) -> tuple[int, int, int, int]:
    o1, i1 = as_tuple(op.options["factor_shape"])
    return o1, i1, math.ceil(op.out_features / o1), math.ceil(op.in_features / i1)


def kronecker_reference(op: StructuredOperator) -> np.ndarray:
    p = params_np(op)
    return np.kron(p["left"], p["right"])[: op.out_features, : op.in_features]


def kronecker_check(op: StructuredOperator, dense: np.ndarray) -> int:
    """Van Loan–Pitsianis: rearranging the o2 × i2 blocks of kron(L, R) as rows vec(block) gives
    vec(L) vec(R)^T, of rank <= 1. Checked on the fully visible blocks (all blocks, i.e. the uncropped kron,
    when out = o1·o2 and in = i1·i2) and on all visible blocks cropped to their common top-left corner."""
    out_features, in_features = dense.shape
    _, _, o2, i2 = kronecker_factor_shapes(op)
    rows_visible, cols_visible = math.ceil(out_features / o2), math.ceil(in_features / i2)
    h_min, w_min = out_features - (rows_visible - 1) * o2, in_features - (cols_visible - 1) * i2
    rearrangements = {
        "full blocks": [
            dense[a * o2 : (a + 1) * o2, c * i2 : (c + 1) * i2].ravel()
            for a in range(out_features // o2)
            for c in range(in_features // i2)
        ],
        "all blocks, common corner": [
            dense[a * o2 : a * o2 + h_min, c * i2 : c * i2 + w_min].ravel()
            for a in range(rows_visible)
            for c in range(cols_visible)
        ],
    }
    nontrivial = 0
    for what, rows in rearrangements.items():
        if not rows:
            continue
        r = np.stack(rows)
        scale = float(np.linalg.svd(r, compute_uv=False)[0]) if r.size else 0.0
        got = numerical_rank(r, scale)
        assert got <= 1, f"rearrangement ({what}, {r.shape}) has rank {got} > 1: not a Kronecker product"
        nontrivial += int(min(r.shape) >= 2)
    return nontrivial


def kronecker_extra_check(op: StructuredOperator) -> None:
    o1, i1, o2, i2 = kronecker_factor_shapes(op)
    assert 1 <= o1 <= op.out_features and 1 <= i1 <= op.in_features
    fresh = copy.deepcopy(op)
    fresh.reset_parameters(init=True)
    assert torch.count_nonzero(fresh.left) == 0, "init=True must set left = 0"
    assert torch.count_nonzero(fresh.right) > 0, "init=True must leave right random (non-zero)"
    # the default factor shapes allow full rank (random factors give rank min(out, in)); (65, 64) had L 6 x 8 and
    # R 11 x 8, rank 48, before the rank bound came first in the choice
    default = type(op)(op.out_features, op.in_features).to(torch.float64)
    default.reset_parameters(init=False)
    rank = int(torch.linalg.matrix_rank(default.to_dense().detach()))
    assert rank == min(op.out_features, op.in_features), (default.factor_shape, rank)


def kronecker_param_shapes(out_features: int, in_features: int, options: dict) -> dict[str, tuple]:
    o1, i1 = as_tuple(options["factor_shape"])
    return {"left": (o1, i1), "right": (math.ceil(out_features / o1), math.ceil(in_features / i1))}


def kronecker_expected_options(out_features: int, in_features: int, requested: dict) -> dict:
    if requested.get("factor_shape") is None:
        return {}  # chosen automatically; validity is checked by kronecker_extra_check
    return {"factor_shape": as_tuple(requested["factor_shape"])}


# ------------------------------------------------------------------------------------------- ldr
def ldr_reference(op: StructuredOperator) -> np.ndarray:
    p = params_np(op)
    blocks = (circulant_matrices(p["circ"]) @ skew_circulant_matrices(p["skew"])).sum(axis=0)
    return assemble_blocks(blocks, op.out_features, op.in_features)


def ldr_check(op: StructuredOperator, dense: np.ndarray) -> int:
    # circ commutes with Z1, skew with Zm1 and Z1 - Zm1 has rank one: rank(Z1 M - M Zm1) <= r per block.
    return check_displacement_rank(dense, op.options["block_size"], op.options["displacement_rank"], 1.0, -1.0)


def ldr_extra_check(op: StructuredOperator) -> None:
    """For random parameters the displacement rank of a fully visible block is exactly min(r, b)."""
    b, r = op.options["block_size"], op.options["displacement_rank"]
    dense = op.to_dense().detach().to(torch.float64).numpy()
    if dense.shape[0] < b or dense.shape[1] < b:
        return
    blk = dense[:b, :b]
    disp = cyclic_shift(b, 1.0) @ blk - blk @ cyclic_shift(b, -1.0)
    got = numerical_rank(disp, float(np.linalg.svd(blk, compute_uv=False)[0]))
    assert got == min(r, b), f"displacement rank of a random block is {got}, expected {min(r, b)}"


def ldr_param_shapes(out_features: int, in_features: int, options: dict) -> dict[str, tuple]:
    shape = (options["displacement_rank"], *grid(out_features, in_features, options["block_size"]))
    return {"circ": (*shape, options["block_size"]), "skew": (*shape, options["block_size"])}


def ldr_expected_options(out_features: int, in_features: int, requested: dict) -> dict:
    return {
        "block_size": resolved_block_size(out_features, in_features, requested.get("block_size")),
        "displacement_rank": requested.get("displacement_rank", 1),
    }


# ------------------------------------------------------------------------------------------- dense
def dense_reference(op: StructuredOperator) -> np.ndarray:
    return params_np(op)["weight"]


def dense_check(op: StructuredOperator, dense: np.ndarray) -> int:
    """No structure: any out × in matrix is a dense ΔW, so there is nothing to check (0 constraints)."""
    assert dense.shape == (op.out_features, op.in_features)
    return 0


def dense_param_shapes(out_features: int, in_features: int, options: dict) -> dict[str, tuple]:
    return {"weight": (out_features, in_features)}


# ------------------------------------------------------------------------------------------- budgets
def smallest_over_block_sizes(param_shapes: Callable[[int, int, dict], dict[str, tuple]], **defaults: Any):
    """``min_budget`` of a block-grid structure: the smallest spec count over b = 1..max(out, in)."""

    def min_budget(out_features: int, in_features: int) -> int:
        return min(
            sum(math.prod(s) for s in param_shapes(out_features, in_features, {"block_size": b, **defaults}).values())
            for b in range(1, max(out_features, in_features) + 1)
        )

    return min_budget


def kronecker_min_budget(out_features: int, in_features: int) -> int:
    """The smallest o1·i1 + o2·i2 over the factor sizes the module docstring allows: padding d·ceil(n/d) − n of
    at most max(5 % of n, 1) along each dimension."""

    def sizes(n: int) -> np.ndarray:
        d = np.arange(1, n + 1)
        return d[d * -(-n // d) - n <= max(0.05 * n, 1)]

    o1, i1 = sizes(out_features)[:, None], sizes(in_features)[None, :]
    return int((o1 * i1 + -(-out_features // o1) * -(-in_features // i1)).min())


# ------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class PerShape:
    """An option value that depends on the layer shape: ``fn(out, in)``; ``label`` names it in test ids."""

    label: str
    fn: Callable[[int, int], Any]

    def __repr__(self) -> str:
        return self.label


@dataclass(frozen=True)
class Structure:
    name: str
    cases: tuple[dict[str, Any], ...]
    big_cases: tuple[dict[str, Any], ...]
    dense_reference: Callable[[StructuredOperator], np.ndarray]
    check_structure: Callable[[StructuredOperator, np.ndarray], int]
    expected_param_shapes: Callable[[int, int, dict], dict[str, tuple]]
    expected_options: Callable[[int, int, dict], dict]
    # (options, bad value whose str() the ConfigError message must contain), for a 7 × 13 layer
    bad_options: tuple[tuple[dict[str, Any], Any], ...]
    min_budget: Callable[[int, int], int]
    extra_check: Callable[[StructuredOperator], None] = lambda op: None
    constrains: bool = True

    def spec_num_parameters(self, out_features: int, in_features: int, options: dict) -> int:
        return sum(math.prod(s) for s in self.expected_param_shapes(out_features, in_features, options).values())

    @property
    def cls(self) -> type[StructuredOperator]:
        if self.name not in OPERATORS:
            pytest.skip(f"structure {self.name!r} is not registered in OPERATORS (yet)")
        return OPERATORS[self.name]


BLOCK_SIZE_BAD = (
    ({"block_size": 0}, 0),
    ({"block_size": -3}, -3),
    ({"block_size": 2.5}, 2.5),
    ({"block_size": "4"}, "4"),
)

STRUCTURES: dict[str, Structure] = {
    s.name: s
    for s in [
        Structure(
            name="circulant",
            cases=({}, {"block_size": 3}, {"block_size": 64}),
            big_cases=({}, {"block_size": 3}, {"block_size": 64}),
            dense_reference=circulant_reference,
            check_structure=circulant_check,
            expected_param_shapes=circulant_param_shapes,
            expected_options=circulant_expected_options,
            bad_options=BLOCK_SIZE_BAD,
            min_budget=smallest_over_block_sizes(circulant_param_shapes),
            extra_check=circulant_extra_check,
        ),
        Structure(
            name="toeplitz",
            cases=(
                {},
                {"num_factors": 1},
                {"num_factors": 3},
                {"block_size": 5},
                {"block_size": 5, "num_factors": 1},
            ),
            big_cases=(
                {},
                {"num_factors": 1},
                {"num_factors": 3},
                {"block_size": 5},
                {"block_size": 5, "num_factors": 1},
            ),
            dense_reference=toeplitz_reference,
            check_structure=toeplitz_check,
            expected_param_shapes=toeplitz_param_shapes,
            expected_options=toeplitz_expected_options,
            bad_options=BLOCK_SIZE_BAD
            + (({"num_factors": 0}, 0), ({"num_factors": -1}, -1), ({"num_factors": 1.5}, 1.5)),
            min_budget=smallest_over_block_sizes(toeplitz_param_shapes, num_factors=2),
            extra_check=toeplitz_extra_check,
        ),
        Structure(
            name="kronecker",
            cases=(
                {},
                {"factor_shape": PerShape("capped4x3", lambda o, i: (min(o, 4), min(i, 3)))},
                {"factor_shape": PerShape("outx1", lambda o, i: (o, 1))},
            ),
            big_cases=(
                {},
                {"factor_shape": PerShape("capped4x3", lambda o, i: (min(o, 4), min(i, 3)))},
                {"factor_shape": PerShape("outx1", lambda o, i: (o, 1))},
            ),
            dense_reference=kronecker_reference,
            check_structure=kronecker_check,
            expected_param_shapes=kronecker_param_shapes,
            expected_options=kronecker_expected_options,
            bad_options=(
                ({"factor_shape": (0, 2)}, 0),
                ({"factor_shape": (2, -1)}, -1),
                ({"factor_shape": (2.5, 3)}, 2.5),
                ({"factor_shape": (8, 1)}, 8),  # 8 > out = 7
                ({"factor_shape": (1, 14)}, 14),  # 14 > in = 13
            ),
            min_budget=kronecker_min_budget,
            extra_check=kronecker_extra_check,
        ),
        Structure(
            name="ldr",
            cases=(
                {},
                {"displacement_rank": 2},
                {"displacement_rank": 4},
                {"block_size": 7, "displacement_rank": 2},
            ),
            big_cases=({}, {"displacement_rank": 2}, {"block_size": 7, "displacement_rank": 2}),
            dense_reference=ldr_reference,
            check_structure=ldr_check,
            expected_param_shapes=ldr_param_shapes,
            expected_options=ldr_expected_options,
            bad_options=BLOCK_SIZE_BAD
            + (
                ({"displacement_rank": 0}, 0),
                ({"displacement_rank": -2}, -2),
                ({"displacement_rank": 1.5}, 1.5),
            ),
            min_budget=smallest_over_block_sizes(ldr_param_shapes, displacement_rank=1),
            extra_check=ldr_extra_check,
        ),
        Structure(  # the unstructured ΔW (full fine-tuning of the targeted layers in the LoRA placement)
            name="dense",
            cases=({},),
            big_cases=({},),
            dense_reference=dense_reference,
            check_structure=dense_check,
            expected_param_shapes=dense_param_shapes,
            expected_options=lambda out_features, in_features, requested: {},
            bad_options=(),  # no options; bad layer shapes are checked for every structure
            min_budget=lambda out_features, in_features: out_features * in_features,
            constrains=False,
        ),
    ]
}

# For each structure, its option dicts to exercise (the table asked for by the test plan).
STRUCTURE_CASES: dict[str, tuple[dict[str, Any], ...]] = {name: s.cases for name, s in STRUCTURES.items()}


@dataclass(frozen=True)
class Case:
    """One structure with one option dict."""

    structure: Structure
    options: dict[str, Any]

    @property
    def cls(self) -> type[StructuredOperator]:
        return self.structure.cls

    def resolve_options(self, out_features: int, in_features: int) -> dict[str, Any]:
        return {k: (v.fn(out_features, in_features) if isinstance(v, PerShape) else v) for k, v in self.options.items()}

    def make(
        self,
        out_features: int,
        in_features: int,
        *,
        dtype: torch.dtype = torch.float64,
        init: bool = False,
        seed: int = 0,
    ) -> StructuredOperator:
        """The operator in ``dtype``, then ``reset_parameters(init)`` after ``torch.manual_seed(seed)``."""
        op = self.cls(out_features, in_features, **self.resolve_options(out_features, in_features))
        op = op.to(dtype)
        torch.manual_seed(seed)
        op.reset_parameters(init=init)
        return op

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v!r}" for k, v in self.options.items()) or "default"
        return f"{self.structure.name}-{opts}"


def _case_params(big: bool) -> list:
    return [
        pytest.param(case, id=case.id)
        for s in STRUCTURES.values()
        for case in (Case(s, dict(o)) for o in (s.big_cases if big else s.cases))
    ]


@pytest.fixture(params=_case_params(big=False))
def case(request) -> Case:
    """Every structure × every option dict of its ``cases`` (skipped while the structure is unregistered)."""
    request.param.cls  # noqa: B018 - skips if unregistered
    return request.param


@pytest.fixture(params=_case_params(big=True))
def big_case(request) -> Case:
    """Every structure × its ``big_cases`` (the option dicts also run on the large shapes)."""
    request.param.cls  # noqa: B018
    return request.param


@pytest.fixture
def structure_table() -> dict[str, Structure]:
    """The whole table (for the test that every registered structure has an entry in it)."""
    return STRUCTURES


@pytest.fixture(params=list(STRUCTURES.values()), ids=list(STRUCTURES))
def structure(request) -> Structure:
    request.param.cls  # noqa: B018
    return request.param


@pytest.fixture(
    params=[(s, opts, bad) for s in STRUCTURES.values() for opts, bad in s.bad_options],
    ids=[f"{s.name}-{opts!r}" for s in STRUCTURES.values() for opts, _ in s.bad_options],
)
def bad_option(request) -> tuple[Structure, dict[str, Any], Any]:
    request.param[0].cls  # noqa: B018
    return request.param
