"""``structpeft bench grads``: runs on its cases and prints one row each (a smoke test, not a timing test)."""

from __future__ import annotations

import pytest
import torch

from structpeft.bench import grads


def test_grads_bench_times_every_case_and_prints_a_row_each(capsys):
    rows = grads.run(reps=1)
    assert len(rows) == len(grads.CASES)
    for row, case in zip(rows, grads.CASES, strict=True):
        assert (row["model"], row["rows"], row["structure"]) == (case[0], case[3], case[4])
        assert row["gtx_ms"] > 0 and row["param_grads_ms"] > 0 and row["params"] > 0
        if case[5] is not None:
            assert row["options"] == case[5]
    threads = torch.get_num_threads()
    assert grads.main(["--reps", "1", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # restored: an in-process call leaves the caller's setting
    out = capsys.readouterr().out
    assert "median of 1 interleaved repetitions" in out
    assert sum(line.startswith(("| minilm", "| smollm2")) for line in out.splitlines()) == len(grads.CASES)


@pytest.mark.parametrize("bad", [["--reps", "0"], ["--threads", "0"]])
def test_grads_bench_refuses_non_positive_counts(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        grads.main(bad)
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
