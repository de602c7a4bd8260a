"""Fixtures of the PMSS test matrix: ``selection`` (strategy) × ``layer_case`` (layer type); see pmss_cases.py."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pmss_cases import LAYER_CASES, SELECTIONS  # noqa: E402


@pytest.fixture(params=SELECTIONS)
def selection(request):
    return request.param


@pytest.fixture(params=LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def layer_case(request):
    return request.param


@pytest.fixture(autouse=True)
def _quiet_deterministic_single_thread():
    """Fixed global seed (init_weights=False draws from it), no noise from transformers, and one intra-op
    thread: the models are tiny, and on a busy 2-core machine multi-threaded tiny matmuls are ~100x slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        torch.set_num_threads(threads)
