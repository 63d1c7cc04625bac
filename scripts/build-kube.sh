#!/usr/bin/env bash
# Build a real Kubernetes control plane for the operator tests from the Go module proxy:
# etcd, kube-apiserver and kube-controller-manager at pinned versions, version-stamped, cached.
#
#   bash scripts/build-kube.sh            # prints the bin directory; builds only what is missing
#   bash scripts/build-kube.sh --where    # prints the bin directory only (the tests ask it this)
#
# Binaries go to ${FEDTUNE_KUBE_CACHE:-~/.cache/fedtune/kube}/k8s-<version>-etcd-<version>/bin.
# `go install k8s.io/kubernetes/cmd/...@version` cannot work: kubernetes' go.mod points its staging
# modules (k8s.io/api, k8s.io/apiserver, ...) at ./staging with replace directives, which only hold
# inside its own repository. So a throwaway module of ours requires k8s.io/kubernetes and pins every
# staging module to the matching v0.X.Y, the list read from that release's own go.mod. etcd builds
# from go.etcd.io/etcd/server/v3 through a three-line main calling etcdmain.Main.
# Measured on 2 cores (Go 1.26.8) in a fresh clone's CI run with empty Go caches (module downloads
# included): etcd 50 s, kube-apiserver 3 min 26 s, then kube-controller-manager 52 s (it shares most
# packages); a second run finds all three and prints the directory at once.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
GO=${GO:-go}
CACHE=${FEDTUNE_KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune/kube}
BIN="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION/bin"
WANT=(etcd kube-apiserver kube-controller-manager)
if [ "${1:-}" = "--where" ]; then
  echo "$BIN"
  exit 0
fi

missing=()
for b in "${WANT[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$BIN"
  exit 0
fi
command -v "$GO" >/dev/null || { echo "build-kube: Go is needed (1.26+): https://go.dev/dl/" >&2; exit 1; }
mkdir -p "$BIN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod GOTOOLCHAIN=local

build_etcd() {
  mkdir -p "$work/etcd" && cd "$work/etcd"
  printf '%s\n' 'package main' '' 'import (' '	"os"' '' '	"go.etcd.io/etcd/server/v3/etcdmain"' ')' '' \
    'func main() { etcdmain.Main(os.Args) }' >main.go
  "$GO" mod init fedtune.local/etcd >/dev/null 2>&1
  "$GO" get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
  "$GO" mod tidy >/dev/null
  "$GO" build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" -o "$BIN/etcd.tmp" .
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  cd - >/dev/null
}

kube_module() {
  mkdir -p "$work/kube" && cd "$work/kube"
  local mod staging
  mod=$("$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  staging="v0.${K8S_VERSION#v1.}"
  {
    printf 'module fedtune.local/kube\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
    sed -n 's|^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*|\t\1 => \1 '"$staging"'|p' "$mod"
    printf ')\n'
  } >go.mod
  printf '%s\n' '//go:build tools' '' 'package tools' '' 'import (' \
    '	_ "k8s.io/kubernetes/cmd/kube-apiserver"' '	_ "k8s.io/kubernetes/cmd/kube-controller-manager"' ')' >tools.go
  "$GO" mod tidy >/dev/null
  cd - >/dev/null
}

build_kube() {
  local name=$1 minor
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  cd "$work/kube"
  "$GO" build -trimpath -o "$BIN/$name.tmp" -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/component-base/version.gitTreeState=clean" "k8s.io/kubernetes/cmd/$name"
  mv "$BIN/$name.tmp" "$BIN/$name"
  cd - >/dev/null
}

for b in "${missing[@]}"; do
  start=$SECONDS
  echo "build-kube: building $b ($([ "$b" = etcd ] && echo "$ETCD_VERSION" || echo "$K8S_VERSION"); the first build takes minutes)" >&2
  case $b in
    etcd) build_etcd ;;
    *) [ -f "$work/kube/go.mod" ] || kube_module; build_kube "$b" ;;
  esac
  echo "build-kube: $b built in $((SECONDS - start)) s" >&2
done
echo "$BIN"
