"""Shared by every test folder."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

_assert_close = torch.testing.assert_close


def _assert_close_that_can_fail(actual: Any, expected: Any, *args: Any, **kwargs: Any) -> None:
    """``torch.testing.assert_close``, refused where it cannot fail on a relative error: a floating ``expected``
    whose entries are all non-zero-but-within ``atol`` of zero passes for any ``actual`` of that size (gradients
    of a loss the model is invariant to, or of tiny weights, compared with a fixed atol). Compare at the values'
    own scale (an atol relative to them) or assert the zeros explicitly."""
    atol = kwargs.get("atol")  # keyword-only in assert_close
    if atol and isinstance(expected, torch.Tensor) and expected.is_floating_point() and expected.numel():
        scale = float(expected.detach().abs().max())
        if 0 < scale <= atol:
            raise AssertionError(
                f"assert_close cannot fail here: every expected value is within atol={atol:g} of zero "
                f"(max |expected| = {scale:.3g}); use an atol relative to the values' scale"
            )
    _assert_close(actual, expected, *args, **kwargs)


# before the test modules are imported, so that ``from torch.testing import assert_close`` gets it too
torch.testing.assert_close = _assert_close_that_can_fail  # type: ignore[assignment]


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
