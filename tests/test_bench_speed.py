"""The speed benchmark runs end to end (quick mode: tiny batch) and reports every method; not a timed test."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from structpeft.cli import main  # noqa: E402


def test_bench_speed_quick_reports_ratios_for_the_chosen_methods(tmp_path, capsys):
    methods = ["base", "lora-r8", "surm-circulant", "pmss", "c3a-b24", "surm-circulant-merged"]
    args = ["bench", "speed", "--quick", "--reps", "1", "--modes", "train", "infer", "--out", str(tmp_path)]
    assert main([*args, "--methods", *methods]) == 0
    results = json.load(open(tmp_path / "speed.json"))
    assert list(results["methods"]) == methods
    for name, entry in results["methods"].items():
        assert entry["train_ms"] > 0 and entry["infer_ms"] > 0
        assert (entry["trainable"] == 0) == (name in ("base", "surm-circulant-merged"))
    # same trainable-parameter budget for the structured methods as LoRA r=8
    lora = results["methods"]["lora-r8"]["trainable"]
    assert results["methods"]["surm-circulant"]["trainable"] <= lora
    assert results["methods"]["c3a-b24"]["trainable"] == lora
    table = (tmp_path / "speed.md").read_text()
    assert "| surm-circulant |" in table and "train / LoRA r8" in table
    assert "| pmss |" in capsys.readouterr().out
