"""What a trained adapter keeps between forward and backward (the activation memory of a training step).

LoRA keeps the layer input x (and the thin x·Aᵀ). A folded layer (compute "dense" / "hybrid": W + s·ΔW in one
matmul) keeps x only: W_eff and the intermediates of building ΔW (Toeplitz / LDR factor stacks) are rebuilt in
the backward. Kronecker's reshape product keeps x only: its intermediate X·Rᵀ is recomputed in the backward.
The probe records every tensor autograd saves during the forward, other than the model's parameters and buffers.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from structpeft import PmssConfig, SurmConfig
from testkit import saved_non_parameter_tensors

FOLD_METHODS = ["circulant", "toeplitz", "kronecker", "ldr", "pmss"]
# (method, compute) pairs that keep x only; the fast products of the FFT structures keep their spectra (not here)
CASES = [(m, c) for m in FOLD_METHODS for c in ("dense", "hybrid")] + [("kronecker", "fast")]


@pytest.mark.parametrize(("method", "compute"), CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_training_keeps_only_the_input_for_the_backward(method, compute):
    """x is kept and nothing else: no (out × in) matrix (W_eff alone was one 48 × 64 matrix per folded layer) and
    no intermediate of about the input's size (Kronecker's X·Rᵀ, 3 × 8·7 values here)."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 48)).double(), _config_one(method, compute))
    # the input requires grad, as a layer's input does behind trainable layers (a frozen matmul with such an input
    # keeps its weight operand)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    saved = saved_non_parameter_tensors(model, x)
    assert saved, "the probe saw nothing: it cannot fail"
    assert sum(math.prod(s) for s in saved) <= x.numel(), saved  # x itself, and nothing else


def _config_one(method: str, compute: str, **kw):
    if method == "pmss":
        return PmssConfig(target_modules=["0"], k_in=4, k_out=4, init_weights=False, compute=compute, **kw)
    return SurmConfig(structure=method, target_modules=["0"], init_weights=False, compute=compute, **kw)
