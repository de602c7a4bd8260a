"""Fixtures of the PMSS test matrix: ``selection`` (strategy) × ``layer_case`` (layer type); see pmss_cases.py."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pmss_cases import LAYER_CASES, SELECTIONS  # noqa: E402


@pytest.fixture(params=SELECTIONS)
def selection(request):
    return request.param


@pytest.fixture(params=LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def layer_case(request):
    return request.param
