#!/usr/bin/env bash
# Builds (or reuses from the cache) the binaries of the e2e run: kube-apiserver from the k8s.io/kubernetes
# module at the release pinned in build/go.mod, and e2ehelper (embedded etcd + raw etcd reads + a KMS v2
# Status client). Binaries are cached under $KMS_TEST_CACHE_DIR/k8s/<hash of the inputs>/, so a second run
# costs nothing; the Go build cache (~/.cache/go-build) makes a rebuild after a helper edit quick.
#
# Usage: build.sh   -> prints the directory that holds kube-apiserver, e2ehelper (and kubectl if the
#                     machine has none)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KMS_TEST_CACHE_DIR:-$HOME/.cache/kms-plugin}/k8s"
cd "$here/build"

k8s_version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' go.mod)"
[[ -n "$k8s_version" ]] || { echo "build.sh: k8s.io/kubernetes not found in build/go.mod" >&2; exit 1; }
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"

hash_of() { sha256sum "$@" | sha256sum | cut -c1-16; }
inputs_hash="$( { go version; echo "$ldflags"; cat go.mod go.sum "$here/build.sh"; } | sha256sum | cut -c1-16)"
apiserver_dir="$cache/kube-apiserver-$k8s_version-$inputs_hash"
helper_dir="$cache/e2ehelper-$(hash_of go.mod go.sum e2ehelper/*.go)"

log() { echo "build.sh: $*" >&2; }

if [[ ! -x "$apiserver_dir/kube-apiserver" ]]; then
  log "building kube-apiserver $k8s_version (cold: ~15-30 min on 2 cores; cached afterwards)"
  start=$SECONDS
  mkdir -p "$apiserver_dir.tmp"
  go mod download
  go build -trimpath -ldflags "$ldflags" -o "$apiserver_dir.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  rm -rf "$apiserver_dir" && mv "$apiserver_dir.tmp" "$apiserver_dir"
  log "kube-apiserver built in $((SECONDS - start))s"
fi
if [[ ! -x "$helper_dir/e2ehelper" ]]; then
  log "building e2ehelper"
  start=$SECONDS
  mkdir -p "$helper_dir.tmp"
  go build -trimpath -ldflags "-s -w" -o "$helper_dir.tmp/e2ehelper" ./e2ehelper
  rm -rf "$helper_dir" && mv "$helper_dir.tmp" "$helper_dir"
  log "e2ehelper built in $((SECONDS - start))s"
fi

# kubectl: the machine's own if there is one, else built from the same release (a few more minutes, cached).
bin="$cache/bin"
mkdir -p "$bin"
if { [[ -n "${KMS_E2E_BUILD_KUBECTL:-}" ]] || ! command -v kubectl >/dev/null; } && [[ ! -x "$apiserver_dir/kubectl" ]]; then
  log "no kubectl on PATH: building kubectl $k8s_version"
  start=$SECONDS
  go build -trimpath -ldflags "$ldflags" -o "$apiserver_dir/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
  mv "$apiserver_dir/kubectl.tmp" "$apiserver_dir/kubectl"
  log "kubectl built in $((SECONDS - start))s"
fi
if [[ -x "$apiserver_dir/kubectl" ]]; then ln -sfn "$apiserver_dir/kubectl" "$bin/kubectl"; else rm -f "$bin/kubectl"; fi

# One stable directory with the binaries, for the run script and for people.
ln -sfn "$apiserver_dir/kube-apiserver" "$bin/kube-apiserver"
ln -sfn "$helper_dir/e2ehelper" "$bin/e2ehelper"
# Drop binaries of older inputs.
for d in "$cache"/kube-apiserver-* "$cache"/e2ehelper-*; do
  [[ "$d" == "$apiserver_dir" || "$d" == "$helper_dir" ]] || rm -rf "$d"
done
echo "$bin"
