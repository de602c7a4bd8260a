"""Write the README's "Results" section from the benchmarks' own output files (no hand-typed numbers).

``python -m structpeft.bench.readme`` replaces everything between ``<!-- results:begin -->`` and
``<!-- results:end -->`` in README.md with:

* the accuracy sweep (``docs/bench/accuracy/summary.md`` and its plots, written by ``structpeft bench accuracy``),
  with the targets it checks and how many of the planned runs / seeds are in, then each further sweep written to
  ``docs/bench/accuracy-<name>/`` (``structpeft bench accuracy --out docs/bench/accuracy-<name>``, e.g. a
  partial re-run) under its own heading;
* the matrix-approximation experiment (``docs/bench/approx.md`` / ``approx.png``, ``structpeft bench approx``);
* the speed table (``docs/bench/speed.md``, ``structpeft bench speed``) and one more per other model measured
  (``docs/bench/speed-<model>.md``, ``structpeft bench speed --model <model>``);
* the GPU's: ``docs/bench/cuda/`` (``bash scripts/gpu_check.sh`` on a CUDA machine, its ``bench/`` folder copied
  there): the device line (``gpu.txt``), the CUDA tests' result line (``cuda-tests.txt``) and its speed tables;
* sentences on where structured adapters win and where they do not, computed from those numbers.

``--check`` exits 1 if the README is not up to date with the files (for CI or a pre-commit hook).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .accuracy import LORA_R8

TIE = 1e-3  # relative-error difference below which two approximations count as equal
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def _accuracy_findings(summary: dict[str, Any]) -> list[str]:
    """Plain-language findings computed from the sweep's cells."""
    out = []
    cells = summary.get("cells", [])
    for task in dict.fromkeys(c["task"] for c in cells):
        cs = {c["method"]: c for c in cells if c["task"] == task}
        loras = [cs[m] for m in LORA_R8 if m in cs]
        if not loras:
            continue
        lora = max(loras, key=lambda c: c["accuracy"])
        peft_ranked = sorted(cs.values(), key=lambda c: -c["accuracy"])
        best = peft_ranked[0]
        small = [c for c in cs.values() if c["family"].startswith(("SURM", "PMSS")) and c["adapter_params"] > 0]
        beat = [c for c in small if c["adapter_params"] <= lora["adapter_params"] and c["accuracy"] > lora["accuracy"]]
        lost = [c for c in small if c["accuracy"] < lora["accuracy"] - 0.005]
        line = f"**{task}**: best overall {best['method']} ({100 * best['accuracy']:.2f}); "
        line += "; ".join(f"{c['method']} {100 * c['accuracy']:.2f}" for c in loras) + ". "
        accs = [c["accuracy"] for c in loras]
        if max(accs) - min(accs) > 0.01:
            line += (
                "LoRA r=8's accuracy depends on its learning rate (and target modules, where both were run); the "
                "comparisons below use the best. "
            )
        if beat:
            names = ", ".join(
                f"{c['method']} ({100 * c['accuracy']:.2f}, {c['adapter_params']:,} params)" for c in beat
            )
            line += f"Structured adapters at <= LoRA r=8's parameters that beat {lora['method']}: {names}. "
        else:
            line += f"No structured adapter at <= LoRA r=8's parameters beat {lora['method']}. "
        if lost:
            line += f"{len(lost)} of {len(small)} structured settings were more than 0.5 points below {lora['method']}."
        answers = sorted((c for c in cs.values() if c.get("answer_loss") is not None), key=lambda c: c["answer_loss"])
        if answers:
            ranked = ", ".join(f"{c['method']} {c['answer_loss']:.3f}" for c in answers)
            line = (
                line.rstrip() + f" Teacher-forced loss of the test answers (nats per token, lower is better): {ranked}."
            )
        n = sorted({c["n"] for c in cs.values()})
        line += f" (Seeds per setting: {', '.join(map(str, n))}.)"
        out.append(line)
    return out


def _approx_findings(approx: dict[str, Any] | None) -> list[str]:
    """Per target: at how many budgets the best SURM structure beats LoRA's truncated SVD (lower error)."""
    if not approx or not approx.get("points"):
        return []
    best: dict[tuple[str, float], dict[str, Any]] = {}
    lora: dict[tuple[str, float], float] = {}
    for p in approx["points"]:
        key = (p["target"], p["lora_rank"])
        if p["method"] == "lora":
            lora[key] = p["rel_error"]
        elif p["method"] != "pmss-cur" and (key not in best or p["rel_error"] < best[key]["rel_error"]):
            best[key] = p
    out = []
    for target in dict.fromkeys(k[0] for k in lora):
        keys = [k for k in lora if k[0] == target and k in best]
        wins = [k for k in keys if best[k]["rel_error"] < lora[k] - TIE]
        ties = [k for k in keys if abs(best[k]["rel_error"] - lora[k]) <= TIE]
        largest = max(keys, key=lambda k: k[1])
        b = best[largest]
        out.append(
            f"**{target}**: the best SURM structure has a lower error than LoRA at equal parameters at "
            f"{len(wins)} of {len(keys)} budgets (ties within {TIE:g}: {len(ties)}); "
            f"at the largest (rank-{largest[1]:g} LoRA's count) "
            f"{b['method']} {b['rel_error']:.3f} vs LoRA {lora[largest]:.3f}."
        )
    return out


def _speed_header(speed: dict[str, Any]) -> list[str]:
    st = speed.get("setting") or {}
    if not st:
        return []
    cases = ", ".join(f"{n} {c['batch']} × {c['seq']}" for n, c in (st.get("cases") or {}).items())
    command = (st.get("command") or "structpeft bench speed").strip()
    line = (
        f"Command: `{command}`. {st.get('model_description', st.get('model'))}; targets {st.get('targets')}; "
        f"cases {cases}; median of {st.get('reps')} interleaved repetitions after {st.get('warmup')} warm-up; "
        f"{st.get('cpu_count')} CPU cores ({st.get('hardware')}), {st.get('threads')} threads, "
        f"torch {st.get('torch')}, device {st.get('device')}."
    )
    start, end = st.get("load_average_start"), st.get("load_average_end")
    if start and end:
        line += f" Load average (1 min) at start / end: {start[0]} / {end[0]}"
        line += " — other jobs were running, timings are noisy." if max(start[0], end[0]) > 2.5 else "."
    mem = st.get("memory_measured")
    if mem:
        line += (
            f" Peak memory (the process's peak during one train step, model included) measured again on "
            f"{mem.get('date')} with `{mem.get('command')}` ({mem.get('hardware')}, torch {mem.get('torch')})."
        )
    return [line]


def _speed_table(md: Path, rel: str = "docs/bench") -> list[str]:
    """One ``structpeft bench speed`` output: its setting line (from the .json beside it), table and plot
    (``rel``: the folder of ``md`` as the README links it)."""
    lines = _speed_header(json.loads(_read(md.with_suffix(".json")) or "{}"))
    lines += ["", md.read_text().strip(), ""]
    if md.with_suffix(".png").is_file():
        lines += [f"![{md.stem}]({rel}/{md.stem}.png)", ""]
    return lines


def _cuda_section(folder: Path) -> list[str]:
    """The GPU's results (``bash scripts/gpu_check.sh``, copied to ``docs/bench/cuda``): device, tests, speed."""
    tables = sorted(folder.glob("speed*.md"), key=lambda md: (md.stem != "speed", md.stem))  # MiniLM first
    if not tables:
        return []
    parts = ["### On a GPU (CUDA, measured)", ""]
    parts.append(
        "Written by `bash scripts/gpu_check.sh` on a CUDA machine (its `bench/` output copied to `docs/bench/cuda/`; "
        "the commands below name the machine's output folder)."
    )
    # nvidia-smi's CSV header ("name, driver_version, ...") left out
    gpu = [ln.strip() for ln in (_read(folder / "gpu.txt") or "").splitlines() if ln.strip() and ln[:5] != "name,"]
    if gpu:
        parts[-1] += " Device and versions: " + "; ".join(f"`{ln}`" for ln in gpu) + "."
    tests = [ln.strip() for ln in (_read(folder / "cuda-tests.txt") or "").splitlines() if ln.strip()]
    if tests:
        parts[-1] += f" `{tests[0].lstrip('$ ')}`: **{tests[-1]}**."
    parts.append("")
    for md in tables:
        name = md.stem.removeprefix("speed").removeprefix("-") or "minilm"
        parts += [f"#### Speed on the GPU, {name}", ""] + _speed_table(md, "docs/bench/cuda")
    return parts


def _accuracy_section(folder: Path, title: str) -> list[str] | None:
    """The README lines of one accuracy report folder (``summary.json`` / ``summary.md`` / plots), or None."""
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    meta = summary["meta"]
    rel = f"docs/bench/{folder.name}"
    parts = [
        f"### {title}",
        "",
        f"Command: `{meta['command']}` (resumable; `--report-only` rewrites the reports). Hardware: "
        f"{meta['hardware']}. **{meta['finished']} of {meta['planned']} planned runs are in** "
        f"({meta['failed']} failed); cells show mean ± sample std over the seeds finished so far."
        + (f" **Data: {meta['data_note']}.**" if meta.get("data_note") else ""),
        "",
    ]
    findings = _accuracy_findings(summary)
    if findings:
        parts += [f"- {f}" for f in findings] + [""]
    parts += [(folder / "summary.md").read_text().strip(), ""]
    for png in sorted(folder.glob("accuracy_vs_params_*.png")):
        parts.append(f"![{png.stem}]({rel}/{png.name})")
    parts.append("")
    return parts


def render(root: Path) -> str:
    docs = root / "docs" / "bench"
    parts: list[str] = [
        "Every number below is read from the benchmark output files under `docs/bench/` by "
        "`python -m structpeft.bench.readme`; re-run the command named with each table to reproduce it.",
        "",
    ]
    accuracy = _accuracy_section(docs / "accuracy", "Accuracy (real models, real data)")
    parts += accuracy or ["### Accuracy", "", "Not run yet: `structpeft bench accuracy --suite minilm`.", ""]
    # further sweeps written with --out docs/bench/accuracy-NAME (e.g. a partial re-run), each under its own heading
    for folder in sorted(p.parent for p in docs.glob("accuracy-*/summary.json")):
        parts += _accuracy_section(folder, f"Accuracy, {folder.name.removeprefix('accuracy-')}") or []

    approx_md = _read(docs / "approx.md")
    if approx_md is not None:
        approx = json.loads(_read(docs / "approx.json") or "{}")
        parts += ["### Matrix approximation (the SURM paper's experiment)", ""]
        where = ""
        if approx.get("wall_time_s"):
            cores = (approx.get("machine") or {}).get("cpu_count")
            where = f" ({approx['wall_time_s']:.0f} s" + (f" on {cores} CPU cores)" if cores else ")")
        parts += [f"Command: `{approx.get('command') or 'structpeft bench approx'}`{where}.", ""]
        parts += [f"- {f}" for f in _approx_findings(approx)]
        main_table = approx_md.split("\n## ", 1)[0].strip()
        main_table = "\n".join(ln for ln in main_table.splitlines() if not ln.startswith("# "))
        parts += ["", main_table.strip(), "", "Every budget, with exact parameter counts: "]
        parts[-1] += "[docs/bench/approx.md](docs/bench/approx.md)."
        parts += ["", "![approximation error vs parameters](docs/bench/approx.png)", ""]
    else:
        parts += ["### Matrix approximation", "", "Not run yet: `structpeft bench approx`.", ""]

    if (docs / "speed.md").is_file():
        parts += ["### Speed (measured)", ""] + _speed_table(docs / "speed.md")
        parts += ["How the fast paths work and what was tried: [Speed](#speed).", ""]
    else:
        parts += ["### Speed (measured)", "", "Not run yet: `structpeft bench speed --out docs/bench`.", ""]
    for md in sorted(docs.glob("speed-*.md")):  # other models: structpeft bench speed --model NAME --out docs/bench
        parts += [f"### Speed, {md.stem.removeprefix('speed-')} (measured)", ""] + _speed_table(md)
    parts += _cuda_section(docs / "cuda")
    return "\n".join(parts).rstrip() + "\n"


def update(readme: Path, body: str) -> tuple[str, str]:
    text = readme.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: needs a '{BEGIN}' line followed by an '{END}' line")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return text, f"{head}{BEGIN}\n{body}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m structpeft.bench.readme", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = p.parse_args(argv)
    readme = args.root / "README.md"
    old, new = update(readme, render(args.root))
    if args.check:
        if old != new:
            print(f"{readme} is out of date; run python -m structpeft.bench.readme")
            return 1
        return 0
    if old != new:
        tmp = readme.with_name(readme.name + ".tmp")
        tmp.write_text(new)
        os.replace(tmp, readme)
        print(f"updated the results section of {readme}")
    else:
        print(f"{readme} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
