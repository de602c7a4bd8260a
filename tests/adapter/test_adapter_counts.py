"""Trainable-parameter counts of SURM-Adapters on a BERT-like model (hidden 96, so a width-64 dense bottleneck
fits), next to a dense bottleneck adapter (m = 64) and PEFT LoRA r = 8 on the same targets; each count equals its
closed formula. Run with ``-s`` to see the table."""

from __future__ import annotations

import adapter_cases
import param_counts
from adapter_cases import bert_like
from param_counts import count_rows, format_rows

TARGETS = ["attention.output.dense", "output.dense"]
HIDDEN, INTERMEDIATE, LAYERS = 96, 128, 2


def _base():
    import torch

    torch.manual_seed(0)
    return bert_like(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS)


def test_parameter_counts_bert_like():
    rows = {r.method: r for r in count_rows(_base, TARGETS, TARGETS)}
    print("\n" + format_rows(f"BERT-like hidden={HIDDEN}, {LAYERS} layers, targets {TARGETS}", list(rows.values())))
    for row in rows.values():
        assert row.trainable == row.formula > 0, row
    n, m, k = HIDDEN, 64, 2 * LAYERS  # k adapted modules, each of output width n (all with a bias)
    # default options: one block of side n (circulant, toeplitz with 2 factors, ldr with rank 1)
    assert rows["surm-adapter circulant"].trainable == k * (n + n)
    assert rows["surm-adapter toeplitz"].trainable == k * (2 * (2 * n - 1) + n)
    assert rows["surm-adapter ldr"].trainable == k * (2 * n + n)
    assert rows["surm-adapter dense"].trainable == k * (n * n + n)
    assert rows["surm-adapter dense bottleneck m=64"].trainable == k * (2 * m * n + n)
    assert rows["surm-adapter circulant bottleneck m=64"].trainable == k * (2 * n + n)  # one n-block each way
    lora = LAYERS * 8 * ((n + n) + (INTERMEDIATE + n))
    assert rows["peft lora r=8"].trainable == lora
    # the structured adapters are far smaller than the dense ones
    assert rows["surm-adapter circulant"].trainable < rows["surm-adapter dense bottleneck m=64"].trainable / 10
    assert rows["surm-adapter kronecker"].trainable < rows["peft lora r=8"].trainable


def test_every_registered_structure_is_in_the_matrix():
    """adapter_cases / param_counts list the structures by hand (fresh-process scripts import them without
    structpeft); a structure added to the registry must be added there too, or it would go untested."""
    from structpeft.operators import OPERATORS

    assert set(adapter_cases.STRUCTURES) == set(OPERATORS)
    assert set(param_counts.STRUCTURES) == set(OPERATORS)
