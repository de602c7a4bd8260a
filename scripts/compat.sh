#!/usr/bin/env bash
# Runs the default test suite in a fresh virtual environment against the lowest ("floor": constraints/floor.txt)
# or the newest ("latest") dependency versions that pyproject.toml allows. Opt-in, not part of .ci/run: it
# downloads a CUDA build of torch from PyPI (several GB).
#   usage: bash scripts/compat.sh floor|latest [PYTHON]      (PYTHON: the interpreter, default python3)
# A pip constraint set in pip's own configuration (PIP_CONSTRAINT, pip.conf) still applies; clear it
# (PIP_CONSTRAINT=/dev/null) to reach releases that it caps.
set -euo pipefail
mode=${1:-}
python=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
case "$mode" in
  floor) pins=(-c "$root/constraints/floor.txt") ;;
  latest) pins=() ;;
  *) echo "usage: bash scripts/compat.sh floor|latest [PYTHON] (got mode '$mode')" >&2; exit 2 ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT  # the environment holds a few GB of torch and CUDA libraries
env="$tmp/venv"
"$python" -m venv "$env"
"$env/bin/python" -m pip install -q ${pins[@]+"${pins[@]}"} torch
"$env/bin/python" -m pip install -q ${pins[@]+"${pins[@]}"} -e "$root[test]"
"$env/bin/python" - <<'PY'
import platform
from importlib.metadata import version

names = ["torch", "peft", "transformers", "accelerate", "safetensors", "tqdm", "matplotlib", "numpy", "pytest"]
print("python", platform.python_version(), "|", ", ".join(f"{n} {version(n)}" for n in names))
PY
cd "$root"
"$env/bin/python" -m pytest -q -p no:cacheprovider
