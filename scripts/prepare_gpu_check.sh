#!/usr/bin/env bash
# Prepare the folder the GPU check carries to a CUDA machine that has PyTorch, transformers,
# peft and accelerate but no network, no diffusers and no Ray: the pinned diffusers wheel
# (pyproject.toml) and a wheel of this project, both installed there with --no-deps.
#
#   bash scripts/prepare_gpu_check.sh [FOLDER]   (default gpu_wheels/, git-ignored)
#
#   PYTHON=...   the Python whose pip downloads and builds (default: .venv/bin/python, else python3)
#
# Then, on the GPU machine, from a copy of this checkout that includes FOLDER:
#   pip install --no-deps gpu_wheels/*.whl && python bench/gpu_check.py
# (and pip install --no-deps gpu_wheels/fallback/*.whl first if the check says requests is missing)
set -euo pipefail
cd "$(dirname "$0")/.."

DIR="${1:-gpu_wheels}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DIFFUSERS="$(sed -n 's/^ *"diffusers==\([^"]*\)".*/\1/p' pyproject.toml)"
if [ -z "$DIFFUSERS" ]; then
  echo "error: no diffusers==<version> pin found in pyproject.toml" >&2
  exit 1
fi

rm -rf "$DIR"
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "diffusers==$DIFFUSERS"
"$PY" -m pip wheel -q --no-deps -w "$DIR" .
# diffusers imports requests, which transformers 5 no longer brings: pure-Python fallbacks, at
# the versions installed here, for a GPU machine whose preflight says requests is missing.
FALLBACK=()
for pkg in requests urllib3 idna certifi charset-normalizer; do
  FALLBACK+=("$pkg==$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.10 \
  --implementation py -d "$DIR/fallback" "${FALLBACK[@]}"
echo "GPU check wheels in $DIR/ (diffusers $DIFFUSERS, selma_ray; fallback/: requests and its dependencies):"
ls -1 "$DIR" "$DIR/fallback"
