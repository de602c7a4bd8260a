"""Reports of the accuracy sweep from the finished runs alone: CSV / JSON, Markdown with the issue's targets, plots."""

from __future__ import annotations

import csv
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from .measure import _write_json_atomic, hardware
from .runner import load_finished
from .tasks import SCATTER_FAMILIES, TASKS, Run, _flag, methods_for

CSV_FIELDS = (
    "task",
    "method",
    "family",
    "seed",
    "accuracy",
    "adapter_params",
    "trainable_params",
    "trainable_percent",
    "step_time_s",
    "peak_rss_mb",
    "saved_bytes",
    "forgetting_kind",
    "forgetting",
    "test_answer_loss",
    "wall_s",
)


@dataclass
class Cell:
    """Mean ± sample std over seeds of one (task, method)."""

    task: str
    method: str
    family: str
    n: int
    accuracy: float
    accuracy_std: float
    adapter_params: int
    trainable_params: int
    trainable_percent: float
    step_time_s: float | None
    peak_rss_mb: float | None
    saved_bytes: int
    forgetting_kind: str
    forgetting: float
    forgetting_std: float
    seeds: list[int] = field(default_factory=list)
    # distinct machines its runs ran on (a run without a recorded machine counts as one more): > 1, the step time
    # mixes machines
    machines: int = 1
    # generation tasks: teacher-forced loss of the test answers (nats per token; mean, std over seeds), else None
    answer_loss: float | None = None
    answer_loss_std: float | None = None


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: Sequence[dict[str, Any]], order: Sequence[Run]) -> list[Cell]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["task"], r["method"]), []).append(r)
    cells = []
    seen = set()
    for run in order:
        key = (run.task.name, run.method.name)
        if key in seen or key not in by:
            continue
        seen.add(key)
        rs = sorted(by[key], key=lambda r: r["seed"])
        acc, acc_sd = _mean_std([r["accuracy"] for r in rs])
        fg, fg_sd = _mean_std([r["forgetting"] for r in rs])
        steps = [r["step_time_s"] for r in rs if r.get("step_time_s")]
        mems = [r["peak_rss_mb"] for r in rs if r.get("peak_rss_mb")]
        answers = [r["test_answer_loss"] for r in rs if r.get("test_answer_loss") is not None]
        al, al_sd = _mean_std(answers) if answers else (None, None)
        cells.append(
            Cell(
                task=key[0],
                method=key[1],
                family=rs[0]["family"],
                n=len(rs),
                accuracy=acc,
                accuracy_std=acc_sd,
                adapter_params=rs[0]["adapter_params"],
                trainable_params=rs[0]["trainable_params"],
                trainable_percent=rs[0]["trainable_percent"],
                step_time_s=statistics.median(steps) if steps else None,
                peak_rss_mb=statistics.median(mems) if mems else None,
                saved_bytes=rs[0]["saved_bytes"],
                forgetting_kind=rs[0]["forgetting_kind"],
                forgetting=fg,
                forgetting_std=fg_sd,
                seeds=[r["seed"] for r in rs],
                machines=len({r.get("hardware") for r in rs}),
                answer_loss=al,
                answer_loss_std=al_sd if len(answers) == len(rs) else None,
            )
        )
    return cells


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


# LoRA r=8 runs that the targets compare with (the more accurate one is the reference)
LORA_R8 = ("lora-r8", "lora-r8-lr2e-3", "lora-r8-lr1e-3", "lora-r8-qkvo-lr2e-3", "lora-r8-qkvo-lr5e-3")


def _best_against(candidates: Sequence[Cell], reference: Cell) -> tuple[Cell | None, float]:
    """The most accurate candidate and its accuracy minus the reference's, in points."""
    if not candidates:
        return None, math.nan
    best = max(candidates, key=lambda c: c.accuracy)
    return best, 100 * (best.accuracy - reference.accuracy)


def gap_standard_error(a: Cell, b: Cell) -> float | None:
    """The standard error of the difference of two cells' mean accuracies, in points: sqrt(s_a²/n_a + s_b²/n_b)
    with s the sample std over seeds (independent seeds); None unless both cells have at least two seeds."""
    if a.n < 2 or b.n < 2:
        return None
    return 100 * math.sqrt(a.accuracy_std**2 / a.n + b.accuracy_std**2 / b.n)


def _accuracy_text(c: Cell) -> str:
    """Accuracy in points, mean ± sample std over the seeds (one seed: no std, which it does not have)."""
    return f"{100 * c.accuracy:.2f}" + (f" ± {100 * c.accuracy_std:.2f}" if c.n > 1 else "")


def _gap_text(gap: float, best: Cell, ref: Cell) -> str:
    se = gap_standard_error(best, ref)
    spread = f", standard error of the difference {se:.2f}" if se is not None else ""
    return f"{gap:+.2f} points{spread}; {best.n} / {ref.n} seeds"


def pooled_forgetting_std(cells: Sequence[Cell]) -> tuple[float, int] | None:
    """The seed-to-seed std of the forgetting measure pooled over a task's rows, sqrt(Σ (n_i − 1)·s_i² / Σ (n_i − 1))
    over the rows with at least two seeds whose encoder or model changes (head-only leaves the encoder as it was:
    its forgetting is 0 by construction), with the number of rows; None without such rows. It is the measure's
    resolution: the one-std rule reads each row's own std over 3 seeds, itself a noisy estimate."""
    rows = [c for c in cells if c.n >= 2 and c.family != "head-only"]
    dof = sum(c.n - 1 for c in rows)
    if not dof:
        return None
    return math.sqrt(sum((c.n - 1) * c.forgetting_std**2 for c in rows) / dof), len(rows)


def _forgetting_noise_text(cells: Sequence[Cell], ref: Cell, worse: Sequence[Cell], unit: str) -> str:
    """The forgetting target's noise reading: the pooled seed std and, for the largest excess over the reference,
    how many standard errors of a difference of means (pooled std · sqrt(1/n_a + 1/n_b)) it is."""
    pooled = pooled_forgetting_std(cells)
    if pooled is None:
        return ""
    std, rows = pooled
    text = f" (seed-to-seed std of the forgetting pooled over the task's {rows} rows: {std:.2f} {unit}"
    top = max(worse, key=lambda c: c.forgetting, default=None)
    if top is not None and std > 0:
        se = std * math.sqrt(1 / top.n + 1 / ref.n)
        text += (
            f"; the largest excess, {top.method} {top.forgetting - ref.forgetting:+.2f}, is "
            f"{(top.forgetting - ref.forgetting) / se:.1f} standard errors of the difference"
        )
    return text + ")"


def check_targets(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The issue's targets, each met / missed (or not measured) with its numbers."""
    out = []
    by_task: dict[str, dict[str, Cell]] = {}
    for c in cells:
        by_task.setdefault(c.task, {})[c.method] = c
    for task, cs in by_task.items():
        loras = [cs[m] for m in LORA_R8 if m in cs]
        if not loras:
            continue
        # the reference: the most accurate LoRA r=8 run (learning-rate and target-module controls included)
        lora = max(loras, key=lambda c: c.accuracy)
        if task in ("snli", "bbc"):
            # a quarter of the smallest LoRA r=8 (query / value), also where the reference is the one on more modules
            quarter = min(c.adapter_params for c in loras) / 4
            best, gap = _best_against(
                [c for c in cs.values() if c.family.startswith("SURM") and c.adapter_params <= quarter], lora
            )
            if best is not None:
                out.append(
                    {
                        "task": task,
                        "target": "a SURM structure at <= 1/4 of LoRA r=8's parameters within 0.5 points of it "
                        "(any modules, at most a quarter of the smallest LoRA r=8, against the best LoRA r=8)",
                        "met": gap >= -0.5,
                        "detail": f"best {best.method} ({best.adapter_params:,} vs {lora.adapter_params:,} "
                        f"parameters): {_accuracy_text(best)} vs {lora.method} {_accuracy_text(lora)} "
                        f"({_gap_text(gap, best, lora)})",
                    }
                )
            out += _same_module_targets(task, cs, loras)
        if task == "gsm":
            best, gap = _best_against(
                [c for c in cs.values() if c.family == "PMSS" and c.adapter_params <= lora.adapter_params], lora
            )
            if best is not None:
                out.append(
                    {
                        "task": task,
                        "target": "PMSS at <= LoRA r=8's parameters matching or beating LoRA r=8",
                        "met": gap >= 0,
                        "detail": f"{best.method}: {100 * best.accuracy:.1f} vs {lora.method} "
                        f"{100 * lora.accuracy:.1f} ({gap:+.1f} points; {best.n} / {lora.n} seeds; "
                        f"{_resolution(task)})" + _answer_loss_note(best, loras),
                    }
                )
        structured = [c for c in cs.values() if c.family.startswith(("SURM", "PMSS"))]
        if structured:
            worse = [
                c for c in structured if c.forgetting > lora.forgetting + max(c.forgetting_std, lora.forgetting_std)
            ]
            unit = "points" if lora.forgetting_kind == "probe" else "nats"
            out.append(
                {
                    "task": task,
                    "target": "forgetting no worse than LoRA r=8's (within one std)",
                    "met": not worse,
                    "detail": f"{lora.method} {lora.forgetting:+.3f} {unit}; "
                    + (
                        "worse: " + ", ".join(f"{c.method} {c.forgetting:+.3f}" for c in worse)
                        if worse
                        else f"all {len(structured)} SURM / PMSS settings within"
                    )
                    + _forgetting_noise_text(list(cs.values()), lora, worse, unit),
                }
            )
    return out


def _target_modules(task: str, method: str) -> str | None:
    """The target modules a planned method names (``"default targets"`` where it names none); None if unknown."""
    m = next((m for m in methods_for(TASKS[task]) if m.name == method), None) if task in TASKS else None
    if m is None:
        return None
    if "--target-modules" not in m.args:
        # SURM-Adapter's defaults are the sublayer outputs (attention.output.dense, output.dense), not query / value
        adapter = "--placement" in m.args and m.args[m.args.index("--placement") + 1] == "adapter"
        return "default adapter targets" if adapter else "default targets"
    i = m.args.index("--target-modules") + 1
    j = next((k for k in range(i, len(m.args)) if m.args[k].startswith("--")), len(m.args))
    return ", ".join(m.args[i:j])


def _same_module_targets(task: str, cs: dict[str, Cell], loras: Sequence[Cell]) -> list[dict[str, Any]]:
    """The quarter target read per set of target modules: for each set with a LoRA r=8 run, the best SURM setting
    on the same modules at <= a quarter of that LoRA r=8's parameters against the best LoRA r=8 on them."""
    out = []
    for modules in dict.fromkeys(_target_modules(task, c.method) for c in loras):
        if modules is None:
            continue
        ref = max((c for c in loras if _target_modules(task, c.method) == modules), key=lambda c: c.accuracy)
        quarter = ref.adapter_params / 4
        best, gap = _best_against(
            [
                c
                for c in cs.values()
                if c.family.startswith("SURM")
                and _target_modules(task, c.method) == modules
                and c.adapter_params <= quarter
            ],
            ref,
        )
        if best is None:
            continue
        out.append(
            {
                "task": task,
                "target": f"the same, read on the same modules ({modules}): a SURM structure there at <= 1/4 of that "
                "LoRA r=8's parameters within 0.5 points of it",
                "met": gap >= -0.5,
                "detail": f"best {best.method} ({best.adapter_params:,} vs {ref.adapter_params:,} parameters): "
                f"{_accuracy_text(best)} vs {ref.method} {_accuracy_text(ref)} ({_gap_text(gap, best, ref)})",
            }
        )
    return out


def _answer_loss_note(best: Cell, loras: Sequence[Cell]) -> str:
    """The teacher-forced answer loss of ``best`` against the lowest of the LoRA r=8 runs' (where measured)."""
    loras = [c for c in loras if c.answer_loss is not None]
    if best.answer_loss is None or not loras:
        return ""
    lora = min(loras, key=lambda c: cast(float, c.answer_loss))  # not None: filtered above
    return (
        f"; teacher-forced loss of the test answers {best.answer_loss:.4f} vs {lora.method} {lora.answer_loss:.4f} "
        "nats per token (lower is better)"
    )


def _resolution(task: str) -> str:
    """How coarse an exact-match score on the task's test problems is: one problem in points."""
    args = TASKS[task].args
    n = int(_flag(args, "--max-test"))
    return f"{n} test problems: one problem = {100 / n:.1f} points"


def _learning_rates_note() -> str:
    from ...cli.methods import DEFAULT_LR, HEAD_LR

    rates = {t: ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR[t].items()) for t in ("classification", "generation")}
    return (
        f"Learning rates: each method's `structpeft finetune` default (classification: {rates['classification']}; "
        f"generation (gsm): {rates['generation']}; no per-run tuning), the newly initialised classification "
        f"head at {HEAD_LR:g} for every method; lora-r8-lr2e-3 "
        "repeats LoRA r=8 at the structured methods' rate as a control, and lora-r8-qkvo-lr2e-3 puts it on all four "
        "attention projections (the reference of the SURM rows with other targets); the targets use the best of "
        "them, and a quarter of query / value LoRA r=8's parameters as the SURM limit; "
        "surm-circulant-lora2-lr5e-3 is the same control for SURM circulant (2.5x its default rate) and "
        "surm-circulant-lora2-lr1e-3 the forgetting control (LoRA's rate), SURM candidates like the other SURM rows; "
        "surm-kronecker-qkvo-1536-lr5e-3 / -lr2e-2 (half and twice Kronecker's rate) and lora-r8-qkvo-lr5e-3 "
        "(2.5x) are the learning-rate controls of the closest SNLI pair, candidates like the rows they repeat; "
        "on gsm, lora-r8-lr1e-3 repeats LoRA r=8 at PMSS's generation rate and "
        "pmss-deim-lora8-lr3e-4 PMSS at LoRA's (the forgetting control; not a candidate for the PMSS target)."
    )


def markdown(cells: Sequence[Cell], targets: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = []
    for task in dict.fromkeys(c.task for c in cells):
        lines += [f"### {task}: {meta['tasks'][task]['description']}", ""]
        cs = [c for c in cells if c.task == task]
        lora = next((c for c in cs if c.method == "lora-r8"), None)
        unit = "points of probe accuracy" if cs[0].forgetting_kind == "probe" else "nats of token loss"
        answers = any(c.answer_loss is not None for c in cs)
        lines += [
            f"| method | adapter params | trainable % | accuracy (mean ± std) | vs LoRA r8 | step (s) | peak RSS "
            f"(MB) | saved | forgetting ({unit}) | seeds |" + (" test answer loss (nats / token) |" if answers else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if answers else ""),
        ]
        for c in cs:
            vs = f"{100 * (c.accuracy - lora.accuracy):+.2f}" if lora is not None else "—"
            step = (f"{c.step_time_s:.3f}" + ("†" if c.machines > 1 else "")) if c.step_time_s else "—"
            mem = f"{c.peak_rss_mb:,.0f}" if c.peak_rss_mb else "—"
            acc = _accuracy_text(c)
            fgt = f"{c.forgetting:+.3f}" + (f" ± {c.forgetting_std:.3f}" if c.n > 1 else "")
            lines.append(
                f"| {c.method} | {c.adapter_params:,} | {c.trainable_percent:.3f} | {acc} | {vs} | {step} | {mem} | "
                f"{_size(c.saved_bytes)} | {fgt} | {c.n} |" + (f" {_answer_cell(c)} |" if answers else "")
            )
        if any(c.machines > 1 for c in cs):
            lines += [
                "",
                "† the seeds of this cell ran on different machines (see the hardware line below): its "
                "step time mixes them and does not compare with the other rows.",
            ]
        lines.append("")
    lines += [
        "Accuracy: mean ± sample std over the seeds in the last column (one seed: no std). Step time (median "
        "per run) and peak RSS (per run process) were measured while other jobs may have shared the machine: "
        "use `structpeft bench speed` for controlled timings. Forgetting (positive = forgotten): MiniLM, the "
        "base minus the fine-tuned encoder's accuracy, in points, of a logistic-regression probe on mean-pooled "
        "embeddings for the other task (BBC for SNLI runs, SNLI for BBC runs); SmolLM2, the increase of the mean "
        "token loss on BBC News text.",
        "",
        _learning_rates_note(),
        "",
    ]
    if targets:
        lines += ["### Targets", ""]
        for t in targets:
            lines.append(f"- **{t['task']}** — {t['target']}: **{'met' if t['met'] else 'missed'}** — {t['detail']}")
        lines.append("")
    lines.append(
        f"{meta['finished']} of {meta['planned']} planned runs finished ({meta['failed']} failed); "
        f"{meta['hardware']}; command: `{meta['command']}`."
    )
    return "\n".join(lines) + "\n"


def _answer_cell(c: Cell) -> str:
    if c.answer_loss is None:
        return "—"
    return f"{c.answer_loss:.4f}" + (f" ± {c.answer_loss_std:.4f}" if c.n > 1 and c.answer_loss_std is not None else "")


def plots(cells: Sequence[Cell], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(c.task for c in cells):
        cs = [c for c in cells if c.task == task]
        families = list(dict.fromkeys(c.family for c in cs))
        for kind in ("params", "time"):
            fig, ax = plt.subplots(figsize=(8, 5.2))
            for i, fam in enumerate(families):
                fc = [c for c in cs if c.family == fam]
                if kind == "params":
                    fc = sorted(fc, key=lambda c: c.trainable_percent)
                    xs = [c.trainable_percent for c in fc]
                else:
                    fc = [c for c in fc if c.step_time_s]
                    xs = [cast(float, c.step_time_s) for c in fc]  # not None: filtered above
                if not fc:
                    continue
                ys = [100 * c.accuracy for c in fc]
                es = [100 * c.accuracy_std for c in fc]
                marker = "osD^v<>ph*X"[i % 11]
                line = "-" if (kind == "params" and len(fc) > 1 and fam not in SCATTER_FAMILIES) else ""
                ax.errorbar(xs, ys, yerr=es, fmt=marker + line, capsize=3, label=fam, alpha=0.85)
                if fam in (*SCATTER_FAMILIES, "SURM LDR") or len(fc) == 1:
                    for c, x, y in zip(fc, xs, ys, strict=True):
                        ax.annotate(c.method, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_ylabel("test accuracy (%)")
            if kind == "params":
                ax.set_xlabel("trainable parameters (% of the model, log scale)")
                ax.set_title(f"{task}: accuracy vs trainable parameters (mean ± std over seeds)")
            else:
                ax.set_xlabel("median wall time per training step (s, log scale)")
                ax.set_title(f"{task}: accuracy vs time per step")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            path = out / (f"accuracy_vs_params_{task}.png" if kind == "params" else f"time_vs_accuracy_{task}.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def _bbc_data_note(results: Sequence[dict[str, Any]]) -> str:
    """Which BBC data the runs read (every task does: classification, a forgetting probe, or LM text)."""
    from ...data.builtin import BBC_DATA_VERSION

    old = sum(r.get("bbc_data_version", 1) != BBC_DATA_VERSION for r in results)
    if not old:
        return ""
    return (
        f"{old} of {len(results)} runs read the BBC data before its 98 repeated articles were dropped (split by file: "
        "27-37 of the 445 test articles also in training); re-run them for the current data"
    )


def runs_hardware(results: Sequence[dict[str, Any]]) -> str:
    """The machines the runs ran on, as recorded per run: one description, or each with its run count."""
    counts = Counter(r.get("hardware") for r in results)
    if not counts:
        return hardware()
    if len(counts) == 1 and None not in counts:
        return next(iter(counts))
    parts = [f"{hw} ({n} runs)" for hw, n in counts.items() if hw is not None]
    if None in counts:
        parts.append(f"not recorded ({counts[None]} runs, finished before runs recorded their machine)")
    return "; ".join(parts)


def write_reports(
    runs: Sequence[Run], runs_root: Path, out: Path, command: str, failed: dict[str, Any]
) -> dict[str, Any]:
    done = load_finished(runs_root, runs)
    results = [done[r.id] for r in runs if r.id in done]
    out.mkdir(parents=True, exist_ok=True)
    cells = summarise(results, runs)
    targets = check_targets(cells)
    meta = {
        "planned": len(runs),
        "finished": len(results),
        "failed": len(failed),
        "failures": list(failed.values()),
        "hardware": runs_hardware(results),
        "data_note": _bbc_data_note(results),
        "command": command,
        "tasks": {r.task.name: asdict(r.task) for r in runs},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(out / "runs.csv.tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow(r)
    os.replace(out / "runs.csv.tmp", out / "runs.csv")
    # "restored_from" marks a run folder re-created from this very file: no information in the report itself
    _write_json_atomic(out / "runs.json", [{k: v for k, v in r.items() if k != "restored_from"} for r in results])
    _write_json_atomic(out / "summary.json", {"meta": meta, "cells": [asdict(c) for c in cells], "targets": targets})
    md = markdown(cells, targets, meta) if cells else "No finished runs yet.\n"
    (out / "summary.md.tmp").write_text(md)
    os.replace(out / "summary.md.tmp", out / "summary.md")
    if cells:
        plots(cells, out)
    return {"cells": cells, "targets": targets, "meta": meta, "markdown": md}
