"""The matrix-approximation benchmark: end to end in quick mode, and the optimality of its closed-form fits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from structpeft.bench import approx, fits
from structpeft.operators import get_operator_class


def _gaussian(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) / math.sqrt(in_f)


# ------------------------------------------------------------------------------------------------ end to end
def test_quick_run_writes_json_markdown_and_png(tmp_path, capsys):
    from structpeft.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "approx", "--quick", "--steps", "15", "--no-progress", "--out", str(out)]) == 0
    for name in ("approx.json", "approx.md", "approx.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "approx.json").read_text())
    assert results["settings"]["quick"] and results["settings"]["n"] == 64 and results["wall_time_s"] > 0
    assert {"torch", "python", "structpeft"} <= set(results["versions"])
    fitted = [t["name"] for t in results["targets"] if t["shape"] is not None]
    assert {"gaussian", "lowrank"} <= set(fitted)
    for t in results["targets"]:  # a real-weight target is either fitted or skipped with a reason
        assert t["shape"] is not None or "skipped" in t["note"]
    methods = {p["method"] for p in results["points"]}
    assert methods == set(approx.METHODS)
    for p in results["points"]:
        assert 0.0 <= p["rel_error"] <= 1.0 + 1e-6 and 0 < p["params"] <= p["budget"]
        if not p["closed_form"]:  # gradient fits keep the best iterate, never worse than the warm start
            assert p["rel_error"] <= p["warm_start_rel_error"] + 1e-5
    table = (out / "approx.md").read_text()
    assert "| circulant |" in table and "gaussian ρ=8" in table
    assert "| lora |" in capsys.readouterr().out


def test_missing_model_skips_the_real_targets_with_a_note(tmp_path, capsys):
    argv = ["--quick", "--targets", "gaussian", "query", "--methods", "lora", "circulant", "--model",
            str(tmp_path / "no-such-model"), "--no-plot", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert approx.main(argv) == 0
    results = json.loads((tmp_path / "approx.json").read_text())
    query = next(t for t in results["targets"] if t["name"] == "query")
    assert query["shape"] is None and "skipped" in query["note"] and "no-such-model" in query["note"]
    assert all(p["target"] == "gaussian" for p in results["points"])
    assert "note: target query skipped" in capsys.readouterr().out
    assert "Skipped targets: query" in (tmp_path / "approx.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "0"], "invalid budget '0'"),
        (["--targets", "imagenet"], "invalid choice: 'imagenet'"),
        (["--methods", "dense"], "invalid choice: 'dense'"),
        (["--steps", "0"], "expected an integer >= 1"),
        (["--noise", "-1"], "--noise"),
        (["--n", "8", "--rank", "8"], "--rank"),
    ],
)
def test_bad_arguments_are_argparse_errors_naming_the_value(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        approx.main([*argv, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- closed-form fits
@pytest.mark.parametrize("shape, block", [((24, 24), 8), ((20, 28), 8), ((12, 12), None)])
def test_exactly_circulant_and_toeplitz_targets_are_recovered(shape, block):
    torch.manual_seed(1)
    for structure, project in (("circulant", fits.circulant_projection), ("toeplitz", fits.toeplitz_projection)):
        kwargs = {"num_factors": 1} if structure == "toeplitz" else {}
        truth = get_operator_class(structure)(*shape, block_size=block, **kwargs)
        truth.reset_parameters(False)
        with torch.no_grad():
            target = truth.to_dense()
        fitted = project(target, block)
        with torch.no_grad():
            assert fits.relative_error(target, fitted.to_dense()) < 1e-6, structure


def test_circulant_projection_is_optimal_and_not_beaten_by_gradient_fitting():
    target = _gaussian(16, 16, seed=3)
    op = fits.circulant_projection(target, 4)
    dense = op.to_dense()
    closed = fits.relative_error(target, dense)
    # first-order optimality: the residual is orthogonal to the (linear) circulant space
    loss = (op.to_dense() - target).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, op.weight)
    assert grad.abs().max() < 1e-5
    # Adam from zero reaches the same optimum at best (the problem is convex), never a better one
    gd = get_operator_class("circulant")(16, 16, block_size=4)
    res = fits.fit_adam(gd, target / target.pow(2).mean().sqrt(), steps=300, lr=0.05)
    assert closed <= res.best_error + 1e-5
    assert res.best_error == pytest.approx(closed, abs=2e-3)


def test_kronecker_projection_recovers_products_and_sums():
    torch.manual_seed(2)
    lefts, rights = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    one = torch.kron(lefts[0], rights[0]).float()
    op = fits.kronecker_projection(one, (4, 6))
    with torch.no_grad():
        assert fits.relative_error(one, op.to_dense()) < 1e-6
    three = sum(torch.kron(a, b) for a, b in zip(lefts, rights, strict=True))
    dense, _, _ = fits.kronecker_sum_projection(three, (4, 6), terms=3)
    assert fits.relative_error(three, dense) < 1e-10
    dense2, _, _ = fits.kronecker_sum_projection(three, (4, 6), terms=2)
    assert fits.relative_error(three, dense2) > 1e-3  # a rank-3 rearrangement needs 3 terms
    # the benchmark's Kronecker method searches the exact factor shapes within the budget and finds this one
    settings = approx.Settings(progress=False)
    point = approx.METHODS["kronecker"].fitter(one, 4 * 6 + 5 * 2, settings, "")
    assert fits.relative_error(one, point.dense) < 1e-6
    with pytest.raises(approx.ConfigError, match="does not divide"):
        fits.kronecker_sum_projection(one, (3, 6))


def test_lora_error_is_the_singular_value_tail_and_zero_on_a_low_rank_target():
    target = _gaussian(30, 20, seed=4)
    sigma = torch.linalg.svdvals(target.double())
    settings = approx.Settings(progress=False)
    for rank in (1, 3, 7):
        point = approx.METHODS["lora"].fitter(target, rank * 50, settings, "")
        assert point.params == rank * 50
        expected = float(sigma[rank:].pow(2).sum().sqrt() / sigma.pow(2).sum().sqrt())
        assert fits.relative_error(target, point.dense) == pytest.approx(expected, rel=1e-9)
    low = _gaussian(30, 3, seed=5) @ _gaussian(3, 20, seed=6)
    assert fits.relative_error(low, fits.lora_projection(low, 3)) < 1e-6  # float32 target
    assert fits.relative_error(low, fits.skeleton_projection(low, 3)) < 1e-6  # CUR is exact at the rank


def test_closed_form_errors_do_not_increase_with_parameters():
    target = _gaussian(48, 48, seed=7)
    settings = approx.Settings(progress=False)
    for method in ("lora", "circulant", "toeplitz-f1", "kronecker", "pmss-cur"):
        errors = []
        for rho in (0.5, 1, 2, 4, 8, 16):
            try:
                point = approx.METHODS[method].fitter(target, int(rho * 96), settings, "")
            except approx.ConfigError:
                continue
            errors.append(fits.relative_error(target, point.dense))
        assert len(errors) >= 4, method
        assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:], strict=False)), (method, errors)


def test_gradient_methods_start_from_their_projection_and_improve():
    target = _gaussian(32, 32, seed=8)
    settings = approx.Settings(steps=40, lr=0.03, progress=False)
    budget = 4 * 64
    b = approx.block_size_for("ldr", (32, 32), budget, displacement_rank=2)
    circ = fits.relative_error(target, fits.circulant_projection(target, b).to_dense().detach())
    point = approx.METHODS["ldr-r2"].fitter(target, budget, settings, "")
    assert point.init_error == pytest.approx(circ, abs=1e-5)  # warm start = circulant projection
    assert point.params <= budget and point.options["displacement_rank"] == 2
    assert fits.relative_error(target, point.dense) < circ - 1e-3
    b = approx.block_size_for("toeplitz", (32, 32), budget, num_factors=2)
    toep = fits.relative_error(target, fits.toeplitz_projection(target, b).to_dense().detach())
    point = approx.METHODS["toeplitz-f2"].fitter(target, budget, settings, "")
    assert point.init_error == pytest.approx(toep, abs=1e-5)
    assert fits.relative_error(target, point.dense) < toep - 1e-3


def test_block_size_for_prefers_unpadded_grids():
    # the operator's own choice for 64 x 64 Toeplitz at 512 parameters is a padded b = 63 grid
    assert approx.block_size_for("toeplitz", (64, 64), 512, num_factors=1) == 16
    assert approx.block_size_for("circulant", (64, 64), 512) == 8
    assert approx.block_size_for("ldr", (384, 384), 6144, displacement_rank=1) == 48
