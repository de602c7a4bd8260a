"""The suite's ``torch.testing.assert_close`` (tests/conftest.py) refuses comparisons that cannot fail."""

from __future__ import annotations

import pytest
import torch


def test_a_comparison_whose_expected_values_are_all_within_atol_of_zero_is_refused():
    with pytest.raises(AssertionError, match=r"cannot fail here: every expected value is within atol=1e-06"):
        torch.testing.assert_close(torch.tensor([9e-7]), torch.tensor([4e-9, -2e-9]).max(), atol=1e-6, rtol=0)


def test_exact_zeros_and_values_above_atol_are_compared_as_usual():
    torch.testing.assert_close(torch.zeros(3), torch.zeros(3), atol=1e-6, rtol=0)  # zeros: asserted explicitly
    torch.testing.assert_close(torch.tensor([1.0, 1e-9]), torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(AssertionError, match="not close"):
        torch.testing.assert_close(torch.tensor([1.1]), torch.tensor([1.0]), atol=1e-6, rtol=0)
