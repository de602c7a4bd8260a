"""The speed benchmark runs end to end (quick mode: tiny batch) and reports every method; not a timed test."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from structpeft.bench import speed  # noqa: E402
from structpeft.cli import main  # noqa: E402


def test_bench_speed_quick_reports_ratios_for_the_chosen_methods(tmp_path, capsys):
    methods = ["base", "lora-r8", "surm-circulant", "pmss", "c3a-b24", "surm-circulant-merged"]
    args = ["bench", "speed", "--quick", "--reps", "1", "--cases", "train", "infer", "--out", str(tmp_path)]
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
    # the merged model computes what the unmerged (random, non-zero) adapter computes
    merged = results["methods"]["surm-circulant-merged"]
    assert merged["merged_max_abs_diff"] <= 1e-4 * max(merged["merged_output_scale"], 1.0)
    table = (tmp_path / "speed.md").read_text()
    assert "| surm-circulant |" in table and "train / LoRA r8" in table and "train overhead / LoRA's" in table
    # every measured target is listed as met or missed, with its number
    targets = {t["target"]: t for t in results["targets"]}
    assert "surm-circulant >= 2x faster than c3a-b24 (overhead over base, train)" in targets
    assert all(isinstance(t["met"], bool) and t["value"] for t in targets.values())
    assert ("MET: " in table) or ("MISSED: " in table)
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "| pmss |" in capsys.readouterr().out


def test_bench_speed_setting_states_hardware_and_threads(tmp_path):
    args = ["bench", "speed", "--quick", "--reps", "1", "--cases", "infer", "--methods", "base", "lora-r8"]
    assert main([*args, "--threads", "1", "--out", str(tmp_path)]) == 0
    setting = json.load(open(tmp_path / "speed.json"))["setting"]
    assert setting["threads"] == 1 and setting["hardware"] and setting["cases"]["infer"]["batch"] == 2


def test_memory_probe_reports_a_number(capsys):
    args = ["--_memory-probe", "surm-circulant", "--cases", "train", "--batch", "2", "--seq", "8"]
    assert speed.main(args) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) >= 0


@pytest.mark.slow
def test_bench_speed_smollm2_cases_run(tmp_path):
    methods = ["base", "lora-r8", "surm-circulant-b32", "c3a-b32"]
    args = ["bench", "speed", "--model", "smollm2", "--quick", "--reps", "1", "--out", str(tmp_path)]
    assert main([*args, "--methods", *methods]) == 0
    results = json.load(open(tmp_path / "speed-smollm2.json"))
    assert set(results["setting"]["cases"]) == {"train", "long", "decode"}
    assert results["methods"]["surm-circulant-b32"]["trainable"] == results["methods"]["c3a-b32"]["trainable"]
