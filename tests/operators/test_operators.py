"""The operator test matrix: every structure × its option dicts × layer shapes (see ``conftest.py``).

Per-structure knowledge (independent dense references, structure checks, parameter shapes, bad options) lives
in the ``STRUCTURES`` table of ``conftest.py``; the tests here are generic.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from structpeft.errors import ConfigError, ShapeError, UnknownStructureError
from structpeft.operators import OPERATORS, StructuredOperator, get_operator_class
from structpeft.operators.base import BlockGridOperator
from testkit import rel_err, saved_bytes

EXPECTED_STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr", "dense")

SMALL_SHAPES = [(1, 5), (7, 13), (13, 7), (5, 5), (97, 89)]
BIG_SHAPES = [(384, 1536), (1536, 384), (768, 768)]
GRAD_SHAPES = [(7, 13), (5, 5), (13, 7)]
STRUCTURE_SHAPES = [(1, 5), (7, 13), (13, 7), (5, 5), (97, 89), (24, 40), (40, 24), (16, 16), (65, 64), (10, 15)]
LEADING_SHAPES = [(), (5,), (2, 3)]


def shape_id(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", EXPECTED_STRUCTURES)
def test_registry_lists_structure(name):
    assert name in OPERATORS, f"{name!r} is not registered; registered: {sorted(OPERATORS)}"
    cls = get_operator_class(name)
    assert cls is OPERATORS[name]
    assert issubclass(cls, StructuredOperator)
    assert cls.structure == name


@pytest.mark.parametrize("bad", ["circulent", "lora", "", None, 3])
def test_unknown_structure_name(bad):
    with pytest.raises(UnknownStructureError) as excinfo:
        get_operator_class(bad)
    assert isinstance(excinfo.value, ConfigError) and isinstance(excinfo.value, ValueError)
    msg = str(excinfo.value)
    assert repr(bad) in msg
    for name in OPERATORS:
        assert name in msg


def test_every_registered_structure_is_in_the_matrix(structure_table):
    """A structure added to the registry without its fixtures (dense reference, bad options ...) would otherwise
    go untested."""
    missing = set(OPERATORS) - set(structure_table)
    assert not missing, f"add {sorted(missing)} to the STRUCTURES table of tests/operators/conftest.py"


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_option_names_are_the_constructor_options(name):
    """``option_names`` (which SurmConfig and the CLI accept per structure) are the constructor's options after
    the shape and the keys of ``options``; each is a SurmConfig field and a CLI flag, so a new structure needs
    its module and a registry line, and a new option a config field and a flag."""
    import inspect

    from structpeft import SurmConfig
    from structpeft.cli.methods import STRUCTURE_OPTIONS

    cls = OPERATORS[name]
    params = list(inspect.signature(cls.__init__).parameters)
    assert params[:3] == ["self", "out_features", "in_features"]
    assert tuple(params[3:]) == cls.option_names
    assert tuple(cls(6, 6).options) == cls.option_names
    fields = SurmConfig.__dataclass_fields__
    assert all(o in fields and o in STRUCTURE_OPTIONS for o in cls.option_names), cls.option_names


# ------------------------------------------------------------------------------------------- 1. zero init
@pytest.mark.parametrize("shape", SMALL_SHAPES + BIG_SHAPES[:1], ids=shape_id)
def test_zero_init_is_exactly_zero(case, shape):
    out_features, in_features = shape
    op = case.make(out_features, in_features, dtype=torch.float32, init=False)
    assert torch.count_nonzero(op.to_dense()) > 0, "init=False must give a non-zero ΔW"
    op.reset_parameters(init=True)  # back to zero after having been random
    dense = op.to_dense()
    assert dense.shape == (out_features, in_features)
    assert torch.count_nonzero(dense) == 0
    for lead in LEADING_SHAPES:
        y = op(randn(*lead, in_features, dtype=torch.float32))
        assert y.shape == (*lead, out_features)
        assert torch.count_nonzero(y) == 0


def test_zero_init_is_trainable(case):
    """At ΔW = 0 the adapter must still receive a gradient (else it can never leave the identity)."""
    op = case.make(7, 13, init=True)
    y = op(randn(4, 13))
    loss = (y * randn(*y.shape, seed=2)).sum()
    params = [p for p in op.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads), (
        "all parameter gradients are zero at init=True: the adapter cannot be trained"
    )


# ------------------------------------------------------------------------------------ 2. forward vs dense
def _check_forward_against_reference(case, out_features: int, in_features: int) -> None:
    op = case.make(out_features, in_features, dtype=torch.float32)
    op64 = copy.deepcopy(op).to(torch.float64)  # the same values, in float64
    ref = torch.from_numpy(case.structure.dense_reference(op64))
    assert ref.shape == (out_features, in_features)
    assert ref.abs().max() > 0

    dense = op64.to_dense()
    assert dense.shape == (out_features, in_features) and dense.dtype == torch.float64
    assert rel_err(dense, ref) <= 1e-10, "to_dense() differs from the independent reference"

    for lead in LEADING_SHAPES:
        x = randn(*lead, in_features)
        y = op64(x)
        assert y.shape == (*lead, out_features) and y.dtype == torch.float64
        assert rel_err(y, x @ ref.T) <= 1e-10, f"float64 forward, leading shape {lead}"

        x32 = x.to(torch.float32)
        y32 = op(x32)
        assert y32.shape == (*lead, out_features) and y32.dtype == torch.float32
        assert rel_err(y32, x32.to(torch.float64) @ ref.T) <= 1e-5, f"float32 forward, leading shape {lead}"


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
def test_forward_matches_dense(case, shape):
    _check_forward_against_reference(case, *shape)


@pytest.mark.parametrize("shape", BIG_SHAPES, ids=shape_id)
def test_forward_matches_dense_big(big_case, shape):
    _check_forward_against_reference(big_case, *shape)


# ------------------------------------------------------------------------------------------- 3. structure
@pytest.mark.parametrize("shape", STRUCTURE_SHAPES, ids=shape_id)
def test_structure(case, shape):
    op = case.make(*shape)
    dense = op.to_dense().detach().numpy()
    case.structure.check_structure(op, dense)
    case.structure.extra_check(op)


def test_structure_check_can_fail(case):
    """The structure check rejects a random matrix wherever the structure constrains the shape at all, and
    constrains at least one of the probe shapes; a structure that constrains nothing (``dense``) accepts any."""
    checked = []
    for out_features, in_features in [(24, 40), (40, 24), (13, 7), (16, 16)]:
        op = case.make(out_features, in_features)
        if case.structure.check_structure(op, op.to_dense().detach().numpy()) == 0:
            if not case.structure.constrains:  # counts no constraint on a random matrix either
                assert case.structure.check_structure(op, randn(out_features, in_features, seed=3).numpy()) == 0
            continue  # e.g. F Toeplitz factors of size b <= 2F - 1: every matrix is such a product
        random_dense = randn(out_features, in_features, seed=3).numpy()
        with pytest.raises(AssertionError):
            case.structure.check_structure(op, random_dense)
        # and the true matrix plus a small (1e-4 relative) dense perturbation
        dense = op.to_dense().detach().numpy()
        perturbed = dense + 1e-4 * np.abs(dense).max() * random_dense
        with pytest.raises(AssertionError):
            case.structure.check_structure(op, perturbed)
        checked.append((out_features, in_features))
    assert bool(checked) == case.structure.constrains, checked


# ------------------------------------------------------------------------------------------- 4. gradcheck
class _Call(torch.nn.Module):
    """``compute(op, *args)`` as a module's forward, so that ``functional_call`` can swap op's parameters."""

    def __init__(self, op: StructuredOperator, compute) -> None:
        super().__init__()
        self.op, self.compute = op, compute

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.compute(self.op, *args)


def _of_parameters(op: StructuredOperator, compute):
    """(fresh leaf copies of op's parameters, f(params, *args) = compute(op, *args) with those parameters)."""
    wrapper = _Call(op, compute)
    names = [name for name, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in wrapper.named_parameters())

    def f(params, *args):
        return torch.func.functional_call(wrapper, dict(zip(names, params, strict=True)), args)

    return params, f


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
def test_gradcheck(case, shape):
    out_features, in_features = shape
    params, f = _of_parameters(case.make(out_features, in_features), lambda op, x: op(x))
    x = randn(2, in_features).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, *p: f(p, x), (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
def test_gradgradcheck(case, shape):
    """Second derivatives of the structured product in the input and the parameters (a gradient penalty trains
    through them; Kronecker's product has a backward of its own)."""
    out_features, in_features = shape
    params, f = _of_parameters(case.make(out_features, in_features), lambda op, x: op(x))
    x = randn(2, in_features).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x, *p: f(p, x), (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shape", [(97, 89), (24, 40)], ids=shape_id)
def test_large_fast_intermediates_are_recomputed_not_saved(case, shape):
    """Where the fast product's intermediates exceed in + out values per row, training keeps only its input and
    parameters for the backward (torch.utils.checkpoint) and recomputes the rest; outputs and gradients equal the
    saving path's bit for bit; ``recompute_fast`` forces either way; no checkpoint without autograd."""
    out_features, in_features = shape
    op = case.make(out_features, in_features)
    x = randn(64, in_features).requires_grad_(True)
    g = randn(64, out_features, seed=2)
    inputs_bytes = 8 * (x.numel() + sum(p.numel() for p in op.parameters()))
    assert op._recomputes() == (op.fast_intermediates() > in_features + out_features)
    results = {}
    for forced in (False, True):
        op.recompute_fast = forced
        y = op(x)
        results[forced] = (y.detach(), *torch.autograd.grad(y, (x, *op.parameters()), g))
        saved = saved_bytes(lambda: op(x))
        if forced:
            assert saved == inputs_bytes  # x and the parameters alone
        else:  # the formula is a lower bound on what the saving path holds
            assert saved >= 8 * 64 * op.fast_intermediates()
    for a, b in zip(results[False], results[True], strict=True):
        assert torch.equal(a, b)
    op.recompute_fast = None
    expected = inputs_bytes if op._recomputes() else saved_bytes(lambda: op.fast_forward(x))
    assert saved_bytes(lambda: op(x)) == expected
    if case.structure.name == "toeplitz" and shape == (97, 89) and case.options.get("num_factors", 2) > 1:
        assert op._recomputes()  # the case the rule is for: several factors on a block grid (or one big block)
    with torch.no_grad():
        assert torch.equal(op(x), results[False][0])


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=shape_id)
def test_dense_gradcheck(case, shape):
    """The materialised ΔW (the fold's path) has correct first and second derivatives in its parameters."""
    params, f = _of_parameters(case.make(*shape), lambda op: op.to_dense())
    assert torch.autograd.gradcheck(lambda *p: f(p), params, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(lambda *p: f(p), params, eps=1e-6, atol=1e-7, rtol=1e-5)


def _check_param_grads(op: StructuredOperator, lead: tuple[int, ...] = (6,)) -> None:
    """``op.param_grads(x, g)`` equals the gradient of Σ g·(x ΔWᵀ) through ``to_dense`` (float64), and is None for
    a frozen parameter."""
    out_features, in_features = op.out_features, op.in_features
    x, g = randn(*lead, in_features, seed=4), randn(*lead, out_features, seed=5)
    params = list(op.parameters())
    expected = torch.autograd.grad(((x @ op.to_dense().T) * g).sum(), params)
    got = op.param_grads(x.reshape(-1, in_features), g.reshape(-1, out_features))
    assert len(got) == len(params)
    for name_got, want, p in zip(got, expected, params, strict=True):
        assert name_got.shape == p.shape and name_got.dtype == p.dtype
        assert rel_err(name_got, want) <= 1e-10
    params[0].requires_grad_(False)
    partial = op.param_grads(x.reshape(-1, in_features), g.reshape(-1, out_features))
    assert partial[0] is None
    for got_p, want in zip(partial[1:], expected[1:], strict=True):
        assert rel_err(got_p, want) <= 1e-10
    params[0].requires_grad_(True)


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=shape_id)
def test_param_grads_match_dense_reference(case, shape):
    """The "hybrid" compute mode's parameter gradient (no input gradient, no gᵀx) against autograd through ΔW."""
    _check_param_grads(case.make(*shape, dtype=torch.float64))


@pytest.mark.parametrize("shape", BIG_SHAPES, ids=shape_id)
def test_param_grads_match_dense_reference_big(big_case, shape):
    _check_param_grads(big_case.make(*shape, dtype=torch.float64), lead=(2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_param_grads_of_half_precision_rows(case, dtype):
    """Half-precision x and g (autocast's matmul dtype) give float32 gradients close to the float32 ones."""
    op = case.make(13, 24, dtype=torch.float32)
    x, g = randn(5, 24, dtype=torch.float32), randn(5, 13, dtype=torch.float32)
    full = op.param_grads(x, g)
    half = op.param_grads(x.to(dtype), g.to(dtype))
    for got, want in zip(half, full, strict=True):
        assert got.dtype == torch.float32 and rel_err(got, want) <= 2e-2


@pytest.mark.parametrize("b", [1, 2, 5, 16, 97])
def test_circulant_real_dft_matrix_is_rfft(b):
    from structpeft.operators.circulant import real_dft_matrix

    x = randn(7, b)
    want = torch.view_as_real(torch.fft.rfft(x, dim=-1)).reshape(7, -1)  # (re, im) interleaved per frequency
    assert rel_err(x @ real_dft_matrix(b, torch.float64).T, want) <= 1e-13


def test_circulant_real_dft_matrix_is_kept_and_usable_with_autograd():
    """Built once per (b, dtype, device); a matrix first built under inference mode is a normal tensor, so a later
    product with a tensor that requires grad can save it for the backward."""
    from structpeft.operators.circulant import _real_dft_matrix, real_dft_matrix

    _real_dft_matrix.cache_clear()
    with torch.inference_mode():
        first = real_dft_matrix(13, torch.float32)
    assert real_dft_matrix(13, torch.float32, "cpu") is first and not first.is_inference()
    assert real_dft_matrix(13, torch.float64) is not first
    x = randn(3, 13).float().requires_grad_(True)
    (x @ first.T).sum().backward()
    torch.testing.assert_close(x.grad, first.sum(0).expand(3, 13))


@pytest.mark.parametrize("max_block", [0, 10_000], ids=["rfft", "dft-matmul"])
@pytest.mark.parametrize("shape", [(24, 40), (97, 89), (384, 1536)], ids=shape_id)
def test_circulant_param_grads_by_either_transform(monkeypatch, max_block, shape):
    """Both ways of taking the block DFTs in ``param_grads`` (chosen by block size) match the dense reference."""
    from structpeft.operators import circulant

    monkeypatch.setattr(circulant, "DFT_MATMUL_MAX_BLOCK", max_block)
    for block_size in (None, 8):
        _check_param_grads(circulant.CirculantOperator(*shape, block_size=block_size).double(), lead=(2, 3))


@pytest.mark.parametrize("min_block", [1, 10_000], ids=["batched", "transposed-copies"])
@pytest.mark.parametrize("right_first", [True, False], ids=["R-first", "L-first"])
@pytest.mark.parametrize(
    "shape,factor_shape", [((24, 40), (2, 2)), ((97, 89), (4, 3)), ((20, 60), (1, 3)), ((30, 7), (30, 1))]
)
def test_kronecker_products_by_either_layout(monkeypatch, min_block, right_first, shape, factor_shape):
    """Both ways of applying L to the rows' middle axis (a batched matmul with L broadcast for blocks of at least
    ``BMM_MIN_BLOCK`` columns, transposed copies otherwise), in either factor order, match the dense reference in
    the forward, the custom backward (∂x, ∂L, ∂R; gradcheck and gradgradcheck) and ``param_grads``."""
    from structpeft.operators import kronecker

    monkeypatch.setattr(kronecker, "BMM_MIN_BLOCK", min_block)
    op = kronecker.KroneckerOperator(*shape, factor_shape=factor_shape).double()
    op.reset_parameters(init=False)
    op._right_first = right_first
    out_features, in_features = shape
    x = randn(2, 3, in_features, seed=2).requires_grad_(True)
    g = randn(2, 3, out_features, seed=3)
    y = op(x)
    dense = op.to_dense()
    assert rel_err(y, x @ dense.T) <= 1e-12
    got = torch.autograd.grad(y, (x, op.left, op.right), g)
    want = torch.autograd.grad(x @ dense.T, (x, op.left, op.right), g)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-12
    _check_param_grads(op, lead=(2, 3))
    params, f = _of_parameters(op, lambda op, x: op(x))
    xs = randn(2, in_features, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, *p: f(p, x), (xs, *params), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(lambda x, *p: f(p, x), (xs, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("b", [1, 2, 5, 16])
def test_toeplitz_dense_and_its_backward_match_an_index_reference(b):
    from structpeft.operators.base import diagonal_sums, toeplitz_dense

    v = randn(3, 2, 2 * b - 1).requires_grad_(True)
    r, s = torch.meshgrid(torch.arange(b), torch.arange(b), indexing="ij")
    reference = v[..., r - s + b - 1]  # T[r, s] = v[r - s + b - 1], by indexing (autograd: a scatter-add)
    got = toeplitz_dense(v)
    assert torch.equal(got, reference)
    g = randn(3, 2, b, b, seed=2)
    (want,) = torch.autograd.grad(reference, v, g)
    (have,) = torch.autograd.grad(got, v, g)
    torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diagonal_sums(g), want, rtol=1e-12, atol=1e-12)
    # gradients arriving in other memory layouts (transposed blocks, channels-last) give the same sums
    for other in (g.transpose(-1, -2).contiguous().transpose(-1, -2), g.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(diagonal_sums(other), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- 5. parameters
@pytest.mark.parametrize("shape", SMALL_SHAPES + BIG_SHAPES, ids=shape_id)
def test_parameter_count_and_options(case, shape):
    out_features, in_features = shape
    cls = case.cls
    op = cls(out_features, in_features, **case.resolve_options(out_features, in_features))
    options = op.options
    n = sum(p.numel() for p in op.parameters())
    assert n == cls.num_parameters(out_features, in_features, **options)

    expected = case.structure.expected_options(out_features, in_features, case.resolve_options(*shape))
    got = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}
    for key, value in expected.items():
        assert got[key] == value, f"options[{key!r}] = {got[key]!r}, expected {value!r}"

    shapes = {name: tuple(p.shape) for name, p in op.named_parameters()}
    assert shapes == case.structure.expected_param_shapes(out_features, in_features, options)
    assert n == case.structure.spec_num_parameters(out_features, in_features, options)

    # The options are JSON-serialisable and rebuild an operator of the same shape.
    reloaded = json.loads(json.dumps(options))
    rebuilt = cls(out_features, in_features, **reloaded)
    assert {name: tuple(p.shape) for name, p in rebuilt.named_parameters()} == shapes
    assert json.dumps(rebuilt.options) == json.dumps(options)


def _too_small(budget: int) -> str:
    """The start of options_for_budget's ConfigError message, naming the budget."""
    return rf"budget of {budget} parameters is too small for a "


@pytest.mark.parametrize("shape", [(384, 384), (384, 1536), (1536, 384), (97, 89)], ids=shape_id)
@pytest.mark.parametrize("lora_rank", [8, 64])
def test_options_for_budget(structure, shape, lora_rank):
    out_features, in_features = shape
    budget = lora_rank * (out_features + in_features)
    cls = structure.cls
    if budget < structure.min_budget(out_features, in_features):  # dense: out·in > r·(out + in) on these shapes
        with pytest.raises(ConfigError, match=_too_small(budget)):
            cls.options_for_budget(out_features, in_features, budget)
        return
    options = cls.options_for_budget(out_features, in_features, budget)
    n = cls.num_parameters(out_features, in_features, **options)
    assert 0 < n <= budget
    op = cls(out_features, in_features, **options)
    assert sum(p.numel() for p in op.parameters()) == n


def test_budget_rule_prefers_an_exact_tiling_within_tolerance():
    from structpeft.operators.base import EXACT_TILING_TOLERANCE, largest_block_size_within

    toeplitz = get_operator_class("toeplitz")
    # 384 x 384 at LoRA r=8 (6,144): b = 171 (3 x 3 over 513, 6,138) has the most parameters; b = 96 tiles exactly
    # with 6,112, within the tolerance, and wins
    assert toeplitz.num_parameters(384, 384, block_size=171) == 6138
    assert toeplitz.options_for_budget(384, 384, 6144)["block_size"] == 96
    assert toeplitz.options_for_budget(768, 768, 16 * 768)["block_size"] == 192  # not 767 (2 x 2 over 1,534)

    # the exact tiling is not taken when it gives up more than the tolerance
    counts = {1: 10, 2: 99, 3: 100, 4: 98}  # b = 2 and 4 divide 8 x 8, b = 3 does not
    pick = largest_block_size_within(8, 8, 100, lambda b: counts.get(b, 10**9))
    assert pick == 2  # 99 >= 99% of 100; of the exact ones the larger count
    counts[2] = 50
    tol_floor = (1 - EXACT_TILING_TOLERANCE) * 100
    assert counts[2] < tol_floor and counts[4] < tol_floor
    assert largest_block_size_within(8, 8, 100, lambda b: counts.get(b, 10**9)) == 3


@pytest.mark.parametrize("shape", [(1, 5), (7, 13), (13, 7), (97, 89), (384, 1536)], ids=shape_id)
def test_options_for_budget_at_the_smallest_budget(structure, shape):
    """At the fewest parameters the specification allows (the structure's ``min_budget``) an operator of exactly
    that size is chosen; one parameter less raises a ConfigError naming the budget and that smallest count."""
    out_features, in_features = shape
    cls, smallest = structure.cls, structure.min_budget(*shape)
    options = cls.options_for_budget(out_features, in_features, smallest)
    assert cls.num_parameters(out_features, in_features, **options) == smallest
    op = cls(out_features, in_features, **options)
    assert sum(p.numel() for p in op.parameters()) == smallest
    with pytest.raises(ConfigError, match=rf"{_too_small(smallest - 1)}.*\b{smallest}\b"):
        cls.options_for_budget(out_features, in_features, smallest - 1)


BLOCK_GRID_STRUCTURES = [n for n in OPERATORS if issubclass(get_operator_class(n), BlockGridOperator)]


def test_block_grid_structures_are_found():
    assert {"circulant", "toeplitz", "ldr"} <= set(BLOCK_GRID_STRUCTURES)


@pytest.mark.parametrize("name", BLOCK_GRID_STRUCTURES)
@pytest.mark.parametrize("shape", [(384, 384), (576, 576), (192, 576), (1536, 384), (97, 89), (768, 768)], ids=shape_id)
def test_budget_rule_invariants(name, shape, structure_table):
    """Over LoRA budgets r = 1..64: exactly the budgets below the structure's ``min_budget`` raise (at r >= 8 none
    does); otherwise never above the budget; an exact tiling whenever one is within the tolerance of the largest
    count, else the largest count."""
    from structpeft.operators.base import EXACT_TILING_TOLERANCE

    cls = get_operator_class(name)
    out_features, in_features = shape
    smallest = structure_table[name].min_budget(out_features, in_features)
    for rank in (1, 2, 4, 8, 16, 32, 64):
        budget = rank * (out_features + in_features)
        if budget < smallest:
            assert rank < 8, (rank, budget, smallest)
            with pytest.raises(ConfigError, match=_too_small(budget)):
                cls.options_for_budget(out_features, in_features, budget)
            continue
        b = cls.options_for_budget(out_features, in_features, budget)["block_size"]
        counts = {c: cls.num_parameters(out_features, in_features, block_size=c) for c in range(1, max(shape) + 1)}
        best = max(n for n in counts.values() if n <= budget)
        exact = [c for c, n in counts.items() if n <= budget and out_features % c == 0 and in_features % c == 0]
        exact_ok = [c for c in exact if counts[c] >= (1 - EXACT_TILING_TOLERANCE) * best]
        assert counts[b] <= budget
        if exact_ok:
            assert b in exact_ok and counts[b] == max(counts[c] for c in exact_ok), (rank, b)
        else:
            assert counts[b] == best, (rank, b)


@pytest.mark.parametrize("budget", [0, 1, 10])
def test_options_for_budget_too_small(structure, budget):
    with pytest.raises(ConfigError, match=_too_small(budget)):
        structure.cls.options_for_budget(384, 384, budget)


# ------------------------------------------------------------------------------------------- 6. half inputs
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (97, 89), (384, 1536)], ids=shape_id)
def test_half_precision_inputs(case, shape, dtype):
    out_features, in_features = shape
    op = case.make(out_features, in_features, dtype=torch.float32)
    x = randn(3, in_features, dtype=torch.float32).to(dtype)
    y = op(x)
    assert y.shape == (3, out_features)
    assert torch.isfinite(y).all()
    assert rel_err(y, op(x.to(torch.float32))) <= 1e-2


# ------------------------------------------------------------------------------------------- 7. errors
def test_bad_options_raise_config_error(bad_option):
    structure, options, bad_value = bad_option
    with pytest.raises(ConfigError) as excinfo:
        structure.cls(7, 13, **options)
    assert str(bad_value) in str(excinfo.value), f"message does not name the bad value {bad_value!r}"


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_layer_shape_raises_config_error(structure, bad):
    for out_features, in_features in [(bad, 5), (5, bad)]:
        with pytest.raises(ConfigError, match=str(bad)):
            structure.cls(out_features, in_features)


def test_wrong_input_dim_raises_shape_error(case):
    op = case.make(7, 13)
    for x in [randn(3, 14), randn(12), randn(2, 3, 7)]:
        with pytest.raises(ShapeError, match="13"):
            op(x)


# ------------------------------------------------------------------------------------ 8. no dense forward
@pytest.mark.parametrize("shape", [(7, 13), (384, 1536)], ids=shape_id)
def test_forward_does_not_form_dense_matrix(case, shape, monkeypatch):
    out_features, in_features = shape
    op = case.make(out_features, in_features)
    x = randn(2, 3, in_features)
    expected = x @ op.to_dense().detach().T

    def forbidden(*args, **kwargs):
        raise AssertionError("forward formed the dense matrix")

    monkeypatch.setattr(op, "to_dense", forbidden)
    monkeypatch.setattr(type(op), "to_dense", forbidden)
    monkeypatch.setattr(torch, "kron", forbidden)
    y = op(x)
    assert rel_err(y, expected) <= 1e-10
    y.sum().backward()  # the backward pass does not need it either
    assert all(p.grad is not None for p in op.parameters())
    grads = op.param_grads(x.reshape(-1, in_features), torch.ones(6, out_features, dtype=x.dtype))  # nor "hybrid"
    for got, p in zip(grads, op.parameters(), strict=True):
        assert rel_err(got, p.grad) <= 1e-10


# ---------------------------------------------------------------------------------- per-structure quirks
def test_default_options(structure):
    op = structure.cls(24, 40)
    expected = structure.expected_options(24, 40, {})
    for key, value in expected.items():
        assert op.options[key] == value


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("b", [5, 9, 16])
def test_ldr_displacement_rank_is_exactly_r(rank, b):
    """Single square block (out = in = b): rank(Z1 M - M Zm1) == r for random parameters, r <= b."""
    if "ldr" not in OPERATORS:
        pytest.skip("ldr is not registered (yet)")
    torch.manual_seed(0)
    op = OPERATORS["ldr"](b, b, displacement_rank=rank).to(torch.float64)
    op.reset_parameters(init=False)
    m = op.to_dense().detach().numpy()
    z1 = np.roll(np.eye(b), 1, axis=0)  # Z1[a, a-1] = 1, Z1[0, b-1] = 1
    zm1 = z1.copy()
    zm1[0, b - 1] = -1.0
    disp = z1 @ m - m @ zm1
    sv = np.linalg.svd(disp, compute_uv=False)
    scale = np.linalg.svd(m, compute_uv=False)[0]
    assert (sv > 1e-9 * scale).sum() == rank, sv / scale


# ------------------------------------------------------------------------------------------- FFT helpers
@pytest.mark.parametrize(
    ("n_rows", "q", "p", "b", "n_fft"),
    [
        (5, 3, 2, 8, None),  # DFT as a matmul
        (5, 3, 2, 8, 16),  # the same, zero-padded (Toeplitz)
        (5, 2, 3, 100, None),  # rfft and a complex bmm over frequencies
        (5, 2, 3, 60, 120),
        (5, 1, 1, 120, None),  # one block: the spectrum summed over the rows
        (5, 1, 1, 100, 200),
    ],
)
def test_block_correlation_is_the_sum_over_rows_of_circular_correlations(n_rows, q, p, b, n_fft):
    """C[i, j, m] = Σ_n Σ_t gs[n, i, (t + m) mod L]·xs[n, j, t] with both zero-padded to L, on every branch
    (DFT matmul, rfft + bmm, single block), also when the caller passes the output gradient's spectrum."""
    from structpeft.operators.circulant import block_correlation

    xs, gs = randn(n_rows, p, b), randn(n_rows, q, b, seed=2)
    length = n_fft or b
    xp = np.pad(xs.numpy(), ((0, 0), (0, 0), (0, length - b)))
    gp = np.pad(gs.numpy(), ((0, 0), (0, 0), (0, length - b)))
    expected = np.stack([np.einsum("nit,njt->ij", np.roll(gp, -m, axis=-1), xp) for m in range(length)], axis=-1)
    got = block_correlation(xs, gs, n_fft)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    gf = torch.fft.rfft(gs, n=length, dim=-1)
    np.testing.assert_allclose(
        block_correlation(xs, gs, n_fft, gf=gf).numpy(), expected, rtol=0, atol=1e-10 * np.abs(expected).max()
    )


@pytest.mark.parametrize(
    ("structure", "options", "shape"),
    [
        ("toeplitz", {"block_size": 5, "num_factors": 1}, (97, 89)),  # DFT-matmul correlation
        ("toeplitz", {"block_size": 64, "num_factors": 1}, (97, 89)),  # rfft + bmm, shared spectrum, 2 x 2 grid
        ("toeplitz", {"num_factors": 1}, (97, 89)),  # one block: the spectrum summed over the rows, shared
        ("circulant", {"block_size": 5}, (97, 89)),
        ("circulant", {"block_size": 100}, (250, 200)),  # rfft + bmm, shared spectrum, 3 x 2 grid
        ("circulant", {}, (97, 89)),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v),
)
def test_own_backward_gradients_on_every_correlation_branch(structure, options, shape):
    """Circulant's and one-factor Toeplitz's own backward (``_CircularProduct``) against autograd through their FFT
    product, on every branch of the weight gradient's correlation, with both gradients asked for (the output
    gradient's spectrum shared where the correlation takes rffts) and each alone."""
    from structpeft.operators.circulant import circular_product

    out_features, in_features = shape
    op = OPERATORS[structure](out_features, in_features, **options).double()
    op.reset_parameters(False)
    b = op.block_size
    x = randn(3, 4, in_features).requires_grad_(True)
    g = randn(3, 4, out_features, seed=3)
    y = op(x)
    assert type(y.grad_fn).__name__ == "_CircularProductBackward"  # not autograd through the FFTs
    if structure == "toeplitz":  # T(v) x: the circular product of length 2b at window offset b - 1
        wf = torch.fft.rfft(op.weight[0], n=2 * b, dim=-1)
        reference = circular_product(x, wf, op.grid, b, out_features, 2 * b, b - 1)
    else:
        reference = circular_product(x, torch.fft.rfft(op.weight, dim=-1), op.grid, b, out_features)
    assert torch.equal(y, reference)
    for only in ((x, op.weight), (x,), (op.weight,)):
        got = torch.autograd.grad(op(x), only, g)
        expected = torch.autograd.grad(reference, only, g, retain_graph=True)
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
