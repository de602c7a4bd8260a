"""Fixtures of the SURM-Adapter test matrix: ``structure`` × ``form`` × ``layer_case``; see adapter_cases.py."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapter_cases import FORMS, LAYER_CASES, STRUCTURES  # noqa: E402


@pytest.fixture(params=STRUCTURES)
def structure(request):
    return request.param


@pytest.fixture(params=FORMS)
def form(request):
    return request.param


@pytest.fixture(params=LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def layer_case(request):
    return request.param
