"""Dtypes, the folded dense path, inference caches and torch.compile, on whole models with adapters.

Tolerances (stated in the README's Speed section): a model converted with ``.half()`` / ``.bfloat16()`` or run
under ``torch.autocast(bfloat16)`` must match its float32 reference (same weights, same random non-zero adapter)
within max |y − y32| / max |y32| <= 1e-2 (fp16) / 5e-2 (bf16): the base model's own rounding dominates, the
adapters compute in float32 (FFTs) and cast back to the input dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers  # noqa: F401 - the test extra's: the models below are transformers' BERT
from torch import nn

from structpeft.operators import OPERATORS
from testkit import BERT48_IDS as IDS
from testkit import HALF_TOLERANCE as TOLERANCE
from testkit import adapted_bert48 as adapted
from testkit import cotangent_loss
from testkit import rel_err as rel

STRUCTURES = list(OPERATORS)  # every registered structure, dense (the unstructured ΔW) included


@pytest.mark.parametrize("method", [*STRUCTURES, "pmss"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models_match_float32(method, dtype):
    model = adapted(method)
    with torch.no_grad():
        ref = model(input_ids=IDS).last_hidden_state
        half = copy.deepcopy(model).to(dtype)
        y = half(input_ids=IDS).last_hidden_state
    assert y.dtype == dtype
    assert rel(y, ref) <= TOLERANCE[dtype]
    # the adapter survives the rounding: the half model is closer to the adapted reference than the plain model is
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=IDS).last_hidden_state
    assert rel(plain, ref) > rel(y, ref)


@pytest.mark.parametrize(
    ("method", "compute"), [(s, c) for s in [*STRUCTURES, "pmss"] for c in ("dense", "fast", "hybrid")]
)
def test_bf16_autocast_matches_float32_and_trains(method, compute):
    model = adapted(method, compute)
    reference = copy.deepcopy(model)
    ref = reference(input_ids=IDS).last_hidden_state
    cotangent_loss(ref).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(input_ids=IDS).last_hidden_state
    assert rel(y, ref) <= TOLERANCE[torch.bfloat16]
    # the adapter survives autocast: y is closer to the adapted reference than the plain model is, and the adapter's
    # effect y − plain is float32's ref − plain within 2e-2 (at most 7.6e-3 here; the plain model is 7-27 % off ref,
    # so the tolerance on y alone passes an adapter whose output autocast scaled by 0.9)
    with torch.no_grad(), reference.disable_adapter():
        plain = reference(input_ids=IDS).last_hidden_state
    assert rel(plain, ref) > rel(y, ref)
    assert rel(y - plain, ref - plain) <= 2e-2
    cotangent_loss(y).backward()
    pairs = [
        (p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters(), strict=True) if p.requires_grad
    ]
    assert pairs
    for got, want in pairs:  # at most 1.7e-2 of the largest entry here
        assert got is not None and got.dtype == torch.float32
        assert rel(got, want) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("structure", STRUCTURES)
def test_folded_dense_and_hybrid_paths_give_the_fast_paths_outputs_and_gradients(structure):
    outs, grads = {}, {}
    for compute in ("fast", "dense", "hybrid"):
        model = adapted(structure, compute).double()
        y = model(input_ids=IDS).last_hidden_state
        cotangent_loss(y).backward()
        outs[compute] = y.detach()
        grads[compute] = [p.grad for p in model.parameters() if p.requires_grad]
    for compute in ("dense", "hybrid"):
        torch.testing.assert_close(outs[compute], outs["fast"], atol=1e-10, rtol=0)
        for a, b in zip(grads[compute], grads["fast"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_folded_path_computes_one_matmul_with_the_folded_weight(monkeypatch):
    model = adapted("circulant", "dense")
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    calls = []
    real = nn.functional.linear

    def spy(x, w, b=None):
        calls.append(w.shape)
        return real(x, w, b)

    monkeypatch.setattr(nn.functional, "linear", spy)
    x = torch.randn(3, 48)
    y = layer(x)
    assert calls == [(48, 48)]  # the base matmul only
    base = layer.get_base_layer()
    op = layer.surm_op["default"]
    torch.testing.assert_close(y, real(x, base.weight + op.to_dense(), base.bias), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("compute", ["dense", "fast"])
def test_inference_caches_follow_in_place_parameter_updates(compute):
    model = adapted("circulant", compute)
    ops = [m.surm_op["default"] for m in model.modules() if hasattr(m, "surm_op")]
    with torch.inference_mode():
        first = model(input_ids=IDS).last_hidden_state.clone()
        again = model(input_ids=IDS).last_hidden_state
    assert torch.equal(first, again)  # the cached ΔW / spectra / folded weight give the same result
    with torch.no_grad():
        for op in ops:
            op.weight.mul_(2.0)  # an optimiser-like in-place update bumps the version counters
        expected = copy.deepcopy(model)(input_ids=IDS).last_hidden_state  # a fresh copy has no caches
        got = model(input_ids=IDS).last_hidden_state
    assert not torch.allclose(got, first)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def _fresh_output(model: nn.Module) -> torch.Tensor:
    """The model's output computed without any cache: a deep copy carries none (caches live outside the module)."""
    with torch.no_grad():
        return copy.deepcopy(model)(input_ids=IDS).last_hidden_state


CACHE_CASES = [
    (m, c) for m in ("circulant", "toeplitz", "ldr", "kronecker", "pmss") for c in ("dense", "fast", "hybrid")
]


@pytest.mark.parametrize(("method", "compute"), CACHE_CASES)
def test_inference_caches_follow_a_fused_optimiser_step(method, compute):
    """torch's fused AdamW (transformers' default optimizer, ``adamw_torch_fused``) updates the parameters without
    bumping their version counters: an evaluation after a step must still see the new parameters, in eval mode
    (Trainer calls model.eval()) and without a mode switch at all."""
    model = adapted(method, compute)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    for switch_modes in (True, False):
        model.eval()
        with torch.no_grad():
            before = model(input_ids=IDS).last_hidden_state.clone()  # fills the caches
        if switch_modes:
            model.train()
        cotangent_loss(model(input_ids=IDS).last_hidden_state).backward()
        opt.step()
        opt.zero_grad()
        if switch_modes:
            model.eval()
        with torch.no_grad():
            got = model(input_ids=IDS).last_hidden_state
        assert not torch.allclose(got, before)
        torch.testing.assert_close(got, _fresh_output(model), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("compute", ["dense", "fast"])
def test_inference_caches_follow_data_writes_across_a_mode_switch(compute):
    """Writes through ``.data`` bypass the version counter too; the next train() / eval() drops what was cached."""
    model = adapted("circulant", compute).eval()
    ops = [m.surm_op["default"] for m in model.modules() if hasattr(m, "surm_op")]
    with torch.no_grad():
        before = model(input_ids=IDS).last_hidden_state.clone()
    for op in ops:
        op.weight.data.mul_(3.0)
    model.train()
    model.eval()
    with torch.no_grad():
        got = model(input_ids=IDS).last_hidden_state
    assert not torch.allclose(got, before)
    torch.testing.assert_close(got, _fresh_output(model), atol=1e-6, rtol=1e-5)


def test_delta_weight_is_cached_only_outside_autograd():
    op = OPERATORS["ldr"](24, 40, block_size=8)
    op.reset_parameters(False)
    with torch.no_grad():
        assert op.delta_weight() is op.delta_weight()
    w = op.delta_weight()
    assert w.requires_grad and w is not op.delta_weight()
    torch.testing.assert_close(w, op.to_dense(), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("method", "compute"),
    [
        ("circulant", "dense"),
        ("circulant", "hybrid"),
        ("circulant", "fast"),
        ("toeplitz", "fast"),
        ("ldr", "fast"),
        ("pmss", "dense"),
        ("pmss", "fast"),
    ],
)
def test_compiled_model_matches_eager_without_graph_breaks(method, compute):
    """torch.compile (aot_eager backend: no C++ build, cheap) with fullgraph=True: the adapter path traces
    without graph breaks (PMSS and circulant "fast": through their own autograd functions; Toeplitz and LDR "fast"
    on this 3 × 3 grid: through torch.utils.checkpoint), and the compiled forward and gradients equal the eager
    ones."""
    torch._dynamo.reset()
    model = adapted(method, compute)
    x = torch.randn(4, 6, 48)
    layer = model.base_model.model.encoder.layer[0].attention.self.value
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    ref = layer(x)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    params = [p for p in layer.parameters() if p.requires_grad]  # LDR has two
    for g, g_ref in zip(torch.autograd.grad(y.sum(), params), torch.autograd.grad(ref.sum(), params), strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


# inductor compiles C++ for each case (about 8 s each on 2 cores, cold cache): PMSS on every path and circulant's own
# backward run by default, the rest of the matrix is opt-in (-m slow)
INDUCTOR_DEFAULT = {("pmss", "dense"), ("pmss", "fast"), ("pmss", "hybrid"), ("circulant", "fast")}


@pytest.mark.parametrize(
    ("method", "compute"),
    [
        pytest.param(m, c, marks=() if (m, c) in INDUCTOR_DEFAULT else pytest.mark.slow, id=f"{c}-{m}")
        for m in [*STRUCTURES, "pmss"]
        for c in ["dense", "fast", "hybrid"]
    ],
)
def test_inductor_compiled_model_matches_eager(method, compute):
    """The compiled forward and the adapter parameters' gradients equal eager's (a copy of the model)."""
    torch._dynamo.reset()
    model = adapted(method, compute)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    y = compiled(input_ids=IDS).last_hidden_state
    ref = eager(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    cotangent_loss(y).backward()
    cotangent_loss(ref).backward()
    pairs = [
        (name, p.grad, q.grad)
        for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True)
        if p.requires_grad
    ]
    assert pairs
    for name, got, want in pairs:
        assert got is not None and want is not None, name
        assert rel(got, want) <= 1e-4, name


def test_compiled_toeplitz_one_factor_traces_its_own_backward():
    """Toeplitz with one factor trains through the circulant's autograd function (``_CircularProduct``): torch.compile
    (aot_eager, fullgraph) traces it without graph breaks, and the compiled output and input / weight gradients
    equal the eager ones."""
    torch._dynamo.reset()
    op = OPERATORS["toeplitz"](40, 24, block_size=8, num_factors=1)
    op.reset_parameters(False)
    x = torch.randn(4, 6, 24, requires_grad=True)
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    y, ref = compiled(x), op(x)
    assert type(ref.grad_fn).__name__ == "_CircularProductBackward"
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, op.weight), g)
    expected = torch.autograd.grad(ref, (x, op.weight), g)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_inductor_fold_keeps_a_large_scale_of_a_matmul_delta():
    """The fold W + s·ΔW with ΔW a matmul product (PMSS's C·U·R) under inductor: torch 2.13's inductor rewrote
    add(W, mm, alpha=s) into an addmm without the alpha, so the fold is written as two ops when compiling."""
    from structpeft.operators.fused import _add_scaled

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    w, u, x = (torch.randn(*shape, generator=gen) for shape in ((48, 48), (8, 8), (5, 48)))
    rows, cols = torch.arange(8), torch.arange(8) * 2

    def layer(x: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, _add_scaled(w, w[:, cols] @ (0.01 * u) @ w[rows, :], 300.0))

    torch.testing.assert_close(torch.compile(layer)(x, w, u), layer(x, w, u), atol=1e-4, rtol=1e-5)
