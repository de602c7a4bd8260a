"""Fixtures of the SURM-through-PEFT test matrix: ``structure`` × ``layer_case``.

The tables themselves live in ``surm_cases.py`` (importable from fresh-process scripts); see its docstring.
``structure`` is a :class:`surm_cases.StructureCase` (a structure and one set of its options),
``layer_case`` a :class:`surm_cases.LayerCase` (a tiny seeded model whose targeted modules are all of one
layer type).
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from surm_cases import FRESH_PROCESS_CASES, LAYER_CASES, ONE_PER_STRUCTURE, STRUCTURE_CASES  # noqa: E402


def _applicable(request):
    """The case, or a skip with the reason its ``not_applicable`` gives for this test (and layer case)."""
    case = request.param
    layer = request.node.callspec.params.get("layer_case")
    reason = case.reason_not_applicable(request.node.originalname, getattr(layer, "id", None))
    if reason is not None:
        pytest.skip(f"not applicable to {case.id}: {reason}")
    return case


@pytest.fixture(params=STRUCTURE_CASES, ids=[s.id for s in STRUCTURE_CASES])
def structure(request):
    return _applicable(request)


@pytest.fixture(params=ONE_PER_STRUCTURE, ids=[s.id for s in ONE_PER_STRUCTURE])
def one_structure(request):
    """The first option set of each structure (tests that need to run once per structure only)."""
    return _applicable(request)


@pytest.fixture(params=LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def layer_case(request):
    return request.param


@pytest.fixture(scope="session")
def fresh_process(tmp_path_factory):
    """Save the adapters of ``FRESH_PROCESS_CASES`` and reload them all in ONE fresh interpreter.

    The script first tries to load every adapter *without* ``import structpeft`` (PEFT must refuse), then
    imports structpeft, reloads each adapter onto a freshly built base model (same seed) and saves the output.
    Returns {"refused": {key: error text}, "actual": {key: output}, "expected": {key: in-process output}}.
    """
    from surm_testing import fresh_process_results

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return fresh_process_results(tmp_path_factory.mktemp("fresh_process"), FRESH_PROCESS_CASES)
