#!/usr/bin/env bash
# The GPU checks of issue #8 in one command, for a session that is lent a CUDA machine (about 7 minutes on an H200: 2026-12-04, 17 s of tests, 3.5 min of speed tables, 3.5 min of memory probes):
#   1. python -m pytest -m cuda tests/cuda: every structure and PMSS on the GPU in float32 / float16 / bfloat16,
#      against float64 references (tests/cuda/test_cuda.py says what is checked);
#   2. structpeft bench speed --device cuda on MiniLM's shape, then on SmolLM2's: the GPU speed tables.
# Each step has its own time limit, so a slow step still leaves the others' results.
#
# Where the repository is not installed (a bare GPU machine) it runs from src/ (PYTHONPATH). peft must be 0.21.x
# (pyproject.toml); if the machine has another, put the wheel in .whl first, here, and carry it:
#   echo /.whl/ >> .git/info/exclude && python -m pip download --no-deps -d .whl peft==0.21.2
# With the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=580).
# Results go to $OUT (the device tool's output folder) or ./gpu-check: steps.log, and under bench/ the device line
# (gpu.txt), the CUDA tests' output (cuda-tests.txt) and the speed reports: copy bench/ to docs/bench/cuda/ and
# regenerate the README with python -m structpeft.bench.readme.
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out/bench"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import sys, torch, peft, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "peft", peft.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee "$out/bench/gpu.txt"
status=0
step() {  # step SECONDS COMMAND...: run with a time limit, its output's end into steps.log, remember a failure
  local limit=$1
  shift
  echo "\$ $*" | tee -a "$out/steps.log"
  timeout "$limit" "$@" 2>&1 | tail -n 80 | tee -a "$out/steps.log"
  status=$((status | PIPESTATUS[0]))
}
step 40 python3 -m pytest -q -m cuda tests/cuda -p no:cacheprovider  # 17 s on an H200
cp "$out/steps.log" "$out/bench/cuda-tests.txt"
speed=(python3 -m structpeft.cli bench speed --device cuda --reps 20 --layer-reps 50 --out "$out/bench")
step 170 "${speed[@]}" --no-memory
step 130 "${speed[@]}" --model smollm2 --no-compile --no-memory
step 220 "${speed[@]}" --memory-only  # MiniLM's peak CUDA memory per method (a fresh process each, ~14 s each on an H200; 15 methods)
exit "$status"
