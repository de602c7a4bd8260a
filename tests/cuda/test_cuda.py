"""The CUDA paths: every structure and PMSS on a GPU, in float32, float16 and bfloat16, against float64 references.

Opt-in (``python -m pytest -m cuda``; the default run deselects the ``cuda`` marker) and never skipped: without a
CUDA device every test here fails, naming what torch sees. ``STRUCTPEFT_TEST_DEVICE=cpu python -m pytest -m cuda``
runs the same tests on the CPU, which checks the tests themselves where no GPU is lent. ``scripts/gpu_check.sh``
runs them together with the GPU speed table.

What is checked on the device: each operator's fast and folded products and their gradients against its dense ΔW in
float64 on the CPU (half-precision inputs within :data:`testkit.HALF_TOLERANCE`: the FFTs run in float32, cuFFT's
half-precision transforms would need power-of-two sizes and blocks of 24 are not); ``.half()`` / ``.bfloat16()``
models and ``torch.autocast`` training steps against the float32 model; the compute paths (fast, folded, hybrid)
giving one output and one gradient; ``compute="auto"`` choosing a path by timing on the device; merge / unmerge;
save on the GPU and load on the CPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from structpeft.operators import OPERATORS
from testkit import BERT48_IDS, HALF_TOLERANCE, adapted_bert48, cotangent_loss, rel_err

pytest.importorskip("transformers")
pytestmark = pytest.mark.cuda

DEVICE = torch.device(os.environ.get("STRUCTPEFT_TEST_DEVICE", "cuda"))
HALF = [torch.float16, torch.bfloat16]
METHODS = [*(name for name in OPERATORS if name != "dense"), "pmss"]
# (structure, options) on a 40 x 72 layer: blocks that are not powers of two (cuFFT's half-precision limit), and
# both of Kronecker's layouts (R of 20 x 24: L by a batched matmul; R of 5 x 3: by per-row transposed copies)
OPERATOR_CASES = [
    ("circulant", {"block_size": 24}),
    ("circulant", {"block_size": 16}),
    ("toeplitz", {"block_size": 12}),
    ("toeplitz", {"block_size": 12, "num_factors": 1}),  # its own backward, DFT-matmul gradient
    ("toeplitz", {"num_factors": 1}),  # one 72 block: its own backward, rfft gradient with a shared spectrum
    ("kronecker", {"factor_shape": [2, 3]}),
    ("kronecker", {"factor_shape": [8, 24]}),
    ("ldr", {"block_size": 24, "displacement_rank": 2}),
    ("dense", {}),
]


@pytest.fixture(autouse=True)
def _device_present():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(
            f"the cuda tests need a CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees "
            f"none; run them where a GPU is present, or with STRUCTPEFT_TEST_DEVICE=cpu to check the tests alone"
        )


def _case_id(case: tuple[str, dict]) -> str:
    structure, options = case
    return structure + "".join(f"-{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("compute", ["fast", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("case", OPERATOR_CASES, ids=_case_id)
def test_operator_product_and_gradients_on_the_device(case, dtype, compute):
    structure, options = case
    torch.manual_seed(0)
    ref_op = OPERATORS[structure](40, 72, **options).double()
    ref_op.reset_parameters(False)
    x = torch.randn(3, 5, 72, dtype=torch.float64)
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    dense = ref_op.to_dense()
    want = x @ dense.T
    want_grads = torch.autograd.grad(want, list(ref_op.parameters()), g)
    op = copy.deepcopy(ref_op).to(DEVICE, dtype)  # as .half() / .bfloat16() leave it in a model
    op.compute_mode = compute
    xd = x.to(DEVICE, dtype).requires_grad_(True)
    y = op(xd)  # FFT products return float32, matmul products the input dtype (the layer casts back to it)
    assert y.dtype in (dtype, torch.float32) and y.device.type == DEVICE.type
    tol = 1e-5 if dtype == torch.float32 else HALF_TOLERANCE[dtype]
    assert rel_err(y, want) <= tol
    grads = torch.autograd.grad(y, [xd, *op.parameters()], g.to(DEVICE, dtype))
    assert grads[0].dtype == dtype
    assert rel_err(grads[0], g @ dense) <= tol
    for got, ref in zip(grads[1:], want_grads, strict=True):
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        assert rel_err(got, ref) <= 10 * tol  # a sum over the 15 rows of products rounded to the input dtype


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_model_on_the_device_matches_float32(method, dtype):
    model = adapted_bert48(method, device=DEVICE)
    ids = BERT48_IDS.to(DEVICE)
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        y = copy.deepcopy(model).to(dtype)(input_ids=ids).last_hidden_state
        with model.disable_adapter():
            plain = model(input_ids=ids).last_hidden_state
    assert y.dtype == dtype and y.device.type == DEVICE.type
    assert rel_err(y, ref) <= HALF_TOLERANCE[dtype]
    assert rel_err(plain, ref) > rel_err(y, ref)  # the adapter survives the rounding


@pytest.mark.parametrize("compute", ["dense", "fast", "hybrid"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_training_step_on_the_device(method, compute, dtype):
    model = adapted_bert48(method, compute, device=DEVICE)
    reference = copy.deepcopy(model)
    ids = BERT48_IDS.to(DEVICE)
    ref = reference(input_ids=ids).last_hidden_state
    cotangent_loss(ref).backward()
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = model(input_ids=ids).last_hidden_state
    assert rel_err(y, ref) <= HALF_TOLERANCE[dtype]
    cotangent_loss(y).backward()
    pairs = [
        (p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters(), strict=True) if p.requires_grad
    ]
    assert pairs
    for got, want in pairs:  # on the CPU at most 1.7e-3 (fp16) / 1.7e-2 (bf16) of the largest entry
        assert got is not None and got.dtype == torch.float32 and got.device.type == DEVICE.type
        assert rel_err(got, want) <= HALF_TOLERANCE[dtype]


@pytest.mark.parametrize("method", METHODS)
def test_compute_paths_agree_on_the_device(method):
    outs, grads = {}, {}
    for compute in ("fast", "dense", "hybrid"):
        model = adapted_bert48(method, compute, device=DEVICE)
        y = model(input_ids=BERT48_IDS.to(DEVICE)).last_hidden_state
        cotangent_loss(y).backward()
        outs[compute] = y.detach()
        grads[compute] = [p.grad for p in model.parameters() if p.requires_grad]
    for compute in ("dense", "hybrid"):
        assert rel_err(outs[compute], outs["fast"]) <= 1e-5
        for a, b in zip(grads[compute], grads["fast"], strict=True):
            assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("compute", ["dense", "hybrid"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_folded_weight_gives_the_default_training_step_on_the_device(method, compute):
    """keep_folded_weight holds W + s·ΔW for the backward instead of rebuilding it: the same values (bit for bit
    on the CPU; 1e-6 here, in case a device kernel's reduction order is not deterministic)."""
    results = []
    for keep in (False, True):
        model = adapted_bert48(method, compute, device=DEVICE, keep_folded_weight=keep)
        y = model(input_ids=BERT48_IDS.to(DEVICE)).last_hidden_state
        cotangent_loss(y).backward()
        results.append((y.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (y0, g0), (y1, g1) = results
    assert g0 and rel_err(y1, y0) <= 1e-6
    for a, b in zip(g1, g0, strict=True):
        assert rel_err(a, b) <= 1e-6


@pytest.fixture
def timed_on(monkeypatch):
    """(device of the timing, device of the timed operator) for each compute="auto" timing from here on."""
    from structpeft.operators import dispatch

    timed: list[tuple[str, str]] = []
    real = dispatch._time_paths

    def spy(op, out_features, in_features, device, *args, **kwargs):
        timed.append((torch.device(device).type, next(op.parameters()).device.type))
        return real(op, out_features, in_features, device, *args, **kwargs)

    monkeypatch.setattr(dispatch, "_time_paths", spy)
    monkeypatch.setattr(dispatch, "_CACHE", {})  # time again, not the answers of earlier tests
    return timed


@pytest.mark.parametrize("method", ["circulant", "kronecker", "pmss"])
def test_auto_compute_times_the_paths_on_the_device(method, timed_on):
    model = adapted_bert48(method, "auto", device=DEVICE)
    assert timed_on and set(timed_on) == {(DEVICE.type, DEVICE.type)}
    fast = adapted_bert48(method, "fast", device=DEVICE)
    ids = BERT48_IDS.to(DEVICE)
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
        assert rel_err(y, fast(input_ids=ids).last_hidden_state) <= 1e-5
    chosen = {getattr(m, "compute_mode", None) for m in model.modules()} - {None}
    assert chosen and chosen <= {"fast", "dense", "hybrid"}


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_save_on_the_device_load_on_the_cpu(method, tmp_path):
    from peft import PeftModel

    from testkit import tiny_bert48

    model = adapted_bert48(method, device=DEVICE)
    ids = BERT48_IDS.to(DEVICE)
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
        model.save_pretrained(tmp_path)
        merged = copy.deepcopy(model).merge_and_unload()
        assert rel_err(merged(input_ids=ids).last_hidden_state, y) <= 1e-5
        loaded = PeftModel.from_pretrained(tiny_bert48(), tmp_path)
        assert rel_err(loaded(input_ids=BERT48_IDS).last_hidden_state, y) <= 1e-5


def test_speed_benchmark_builds_its_models_and_times_their_paths_on_the_device(timed_on):
    from structpeft.bench import speed

    model = speed.build("surm-circulant", speed.build_base().to(DEVICE), "minilm", ["query"], tokens=64)
    assert timed_on and set(timed_on) == {(DEVICE.type, DEVICE.type)}
    assert {p.device.type for p in model.parameters()} == {DEVICE.type}
