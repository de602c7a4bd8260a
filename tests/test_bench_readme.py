"""The README's Results section is generated from the benchmark files: numbers come from them, --check detects drift."""

from __future__ import annotations

import json

import pytest

from structpeft.bench import accuracy as A
from structpeft.bench import readme as R


def _fake_sweep(root, accs: dict[str, list[float]]):
    """Write bench.json files as finished runs would, then the sweep's reports, into a repository-like root."""
    runs_root = root / "runs"
    methods = list(accs)
    runs = A.plan(["snli"], [0, 1], methods)
    params = {"lora-r8": 73728, "surm-circulant-lora2": 18432, "pmss-deim-lora8": 73008}
    families = {m.name: m.family for m in A.minilm_methods()}
    for run in runs:
        d = A.run_dir(runs_root, run)
        d.mkdir(parents=True)
        result = {
            "task": "snli",
            "method": run.method.name,
            "family": families[run.method.name],
            "seed": run.seed,
            "accuracy": accs[run.method.name][run.seed],
            "adapter_params": params[run.method.name],
            "trainable_params": params[run.method.name] + 1155,
            "total_params": 22_700_000,
            "trainable_percent": 0.3,
            "step_time_s": 0.4,
            "peak_rss_mb": 700.0,
            "saved_bytes": 4 * params[run.method.name],
            "forgetting_kind": "probe",
            "forgetting": 0.5,
            "argv": A.finetune_argv(run, d),  # the fine-tune command of this plan, as the worker records it
        }
        (d / A.BENCH_FILE).write_text(json.dumps(result))
    A.write_reports(runs, runs_root, root / "docs" / "bench" / "accuracy", "structpeft bench accuracy --tasks snli", {})


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "README.md").write_text(f"# x\n\n## Results\n\n{R.BEGIN}\nold\n{R.END}\n\n## Speed\nkept\n")
    _fake_sweep(
        tmp_path,
        {"lora-r8": [0.60, 0.62], "surm-circulant-lora2": [0.615, 0.625], "pmss-deim-lora8": [0.55, 0.56]},
    )
    return tmp_path


def test_results_section_is_written_from_the_files(repo):
    assert R.main(["--root", str(repo)]) == 0
    text = (repo / "README.md").read_text()
    assert "old" not in text and text.endswith("## Speed\nkept\n")
    section = text.split(R.BEGIN)[1].split(R.END)[0]
    assert "6 of 6 planned runs are in" in section
    assert "| surm-circulant-lora2 | 18,432 |" in section and "62.00 ± 0.71" in section
    assert "surm-circulant-lora2 (62.00, 18,432 params)" in section  # beats LoRA r=8 (61.00) with fewer params
    assert "1 of 2 structured settings were more than 0.5 points below lora-r8" in section  # PMSS at 55.5
    assert "**met**" in section  # the 1/4-parameter target, computed by the sweep
    assert "![accuracy_vs_params_snli](docs/bench/accuracy/accuracy_vs_params_snli.png)" in section
    assert "Not run yet: `structpeft bench approx`" in section
    assert R.main(["--root", str(repo), "--check"]) == 0


def test_check_detects_a_stale_readme(repo):
    assert R.main(["--root", str(repo)]) == 0
    _fake_sweep_path = repo / "docs" / "bench" / "accuracy" / "summary.json"
    summary = json.loads(_fake_sweep_path.read_text())
    summary["meta"]["finished"] = 3
    _fake_sweep_path.write_text(json.dumps(summary))
    assert R.main(["--root", str(repo), "--check"]) == 1


def test_missing_markers_are_refused(tmp_path):
    (tmp_path / "README.md").write_text("# no markers\n")
    with pytest.raises(SystemExit, match="results:begin"):
        R.main(["--root", str(tmp_path)])


def test_approx_findings_count_wins_and_ties_against_lora():
    def pt(method, rank, err):
        return {"target": "t", "method": method, "lora_rank": rank, "rel_error": err}

    approx = {
        "points": [
            *(pt("lora", 1, 0.95), pt("circulant", 1, 0.9495), pt("pmss-cur", 1, 0.1)),  # tie; pmss-cur ignored
            *(pt("lora", 2, 0.90), pt("circulant", 2, 0.85), pt("ldr-r1", 2, 0.88)),  # a win by circulant
            *(pt("lora", 4, 0.80), pt("kronecker", 4, 0.83)),  # a loss
        ]
    }
    (line,) = R._approx_findings(approx)
    assert "at 1 of 3 budgets (ties within 0.001: 1)" in line
    assert "rank-4 LoRA's count) kronecker 0.830 vs LoRA 0.800" in line


def test_accuracy_findings_rank_the_answer_losses_where_measured():
    from structpeft.bench.readme import _accuracy_findings

    def cell(method, family, acc, loss):
        return {
            "task": "gsm",
            "method": method,
            "family": family,
            "accuracy": acc,
            "adapter_params": 10,
            "n": 1,
            "answer_loss": loss,
        }

    cells = [cell("lora-r8", "LoRA", 0.02, 1.1372), cell("pmss-deim-lora8", "PMSS", 0.02, 0.658)]
    (line,) = _accuracy_findings({"cells": cells})
    assert "(nats per token, lower is better): pmss-deim-lora8 0.658, lora-r8 1.137." in line
    for c in cells:
        c["answer_loss"] = None
    assert "Teacher-forced" not in _accuracy_findings({"cells": cells})[0]


def test_each_other_models_speed_table_gets_its_own_section(repo):
    docs = repo / "docs" / "bench"
    (docs / "speed-smollm2.md").write_text("| method | train ms |\n|---|---|\n| base | 4321.0 |\n")
    setting = {"model": "smollm2", "model_description": "LLaMA decoder", "cases": {"decode": {"batch": 1, "seq": 128}}}
    (docs / "speed-smollm2.json").write_text(json.dumps({"setting": setting}))
    assert R.main(["--root", str(repo)]) == 0
    section = (repo / "README.md").read_text().split(R.BEGIN)[1].split(R.END)[0]
    assert "Not run yet: `structpeft bench speed --out docs/bench`" in section  # the MiniLM table is still missing
    smol = section.split("### Speed, smollm2 (measured)")[1]
    assert "LLaMA decoder" in smol and "cases decode 1 × 128" in smol and "| base | 4321.0 |" in smol
    assert "![speed-smollm2]" not in smol  # no plot file, no broken image link
    (docs / "speed-smollm2.png").write_bytes(b"png")
    assert R.main(["--root", str(repo)]) == 0
    assert "![speed-smollm2](docs/bench/speed-smollm2.png)" in (repo / "README.md").read_text()


def test_each_further_accuracy_sweep_gets_its_own_section(repo):
    """A sweep written to docs/bench/accuracy-NAME (a partial re-run) is listed after the main one, with its own
    command, run count and table; the main one's are unchanged."""
    other = repo / "other"
    _fake_sweep(other, {"lora-r8": [0.70, 0.72], "surm-circulant-lora2": [0.65, 0.66], "pmss-deim-lora8": [0.5, 0.5]})
    (other / "docs" / "bench" / "accuracy").rename(repo / "docs" / "bench" / "accuracy-rerun")
    assert R.main(["--root", str(repo)]) == 0
    section = (repo / "README.md").read_text().split(R.BEGIN)[1].split(R.END)[0]
    main, rest = section.split("### Accuracy, rerun", 1)
    assert "62.00 ± 0.71" in main and "62.00 ± 0.71" not in rest
    assert "71.00 ± 1.41" in rest and "6 of 6 planned runs are in" in rest
    assert "docs/bench/accuracy-rerun/accuracy_vs_params_snli.png" in rest


def test_the_gpus_results_get_their_own_section_with_device_tests_and_plots(repo):
    cuda = repo / "docs" / "bench" / "cuda"
    assert R.main(["--root", str(repo)]) == 0
    assert "On a GPU" not in (repo / "README.md").read_text()  # nothing measured on a GPU: no section
    cuda.mkdir(parents=True)
    (cuda / "speed.md").write_text("| method | train ms |\n|---|---|\n| base | 8.6 |\n")
    (cuda / "speed.json").write_text(json.dumps({"setting": {"model": "minilm", "device": "cuda"}}))
    (cuda / "speed.png").write_bytes(b"png")
    (cuda / "speed-smollm2.md").write_text("| method | train ms |\n|---|---|\n| base | 113.2 |\n")
    (cuda / "gpu.txt").write_text("name, driver_version\nNVIDIA H200, 580.159.04\n")
    (cuda / "cuda-tests.txt").write_text("$ python3 -m pytest -q -m cuda tests/cuda\n.....\n106 passed in 16.99s\n")
    assert R.main(["--root", str(repo)]) == 0
    section = (repo / "README.md").read_text().split(R.BEGIN)[1].split(R.END)[0]
    gpu = section.split("### On a GPU (CUDA, measured)")[1]
    assert "`NVIDIA H200, 580.159.04`" in gpu and "`python3 -m pytest -q -m cuda tests/cuda`: **106 passed" in gpu
    minilm, smol = gpu.split("#### Speed on the GPU, minilm")[1].split("#### Speed on the GPU, smollm2")
    assert "| base | 8.6 |" in minilm and "![speed](docs/bench/cuda/speed.png)" in minilm
    assert "| base | 113.2 |" in smol and "![speed-smollm2]" not in smol
    assert "| base | 8.6 |" not in section.split("### On a GPU")[0]  # the CPU sections do not pick up the GPU's
