"""Shared by every test folder."""

from __future__ import annotations

import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_deterministic_single_thread():
    """A fixed global seed (adapters with init_weights=False draw from it), one intra-op thread (the test models
    are tiny: on a shared 2-core machine intra-op threads make them 10-100x slower), no deprecation noise from
    transformers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        torch.set_num_threads(threads)
