#!/usr/bin/env bash
# Builds (or reuses from the cache) the binaries of the e2e run: kube-apiserver from the k8s.io/kubernetes
# module, and e2ehelper (embedded etcd + raw etcd reads + a KMS v2 Status client).
#   - the default release is the one pinned in build/go.mod (shared with e2ehelper);
#   - any other release comes from apiserver/<version>/go.mod (written by gen-apiserver-mod.sh).
# Binaries are cached under $KMS_TEST_CACHE_DIR/k8s/<name>-<version>-<hash of the inputs>/, so a second run
# costs nothing; the Go build cache (~/.cache/go-build) makes a rebuild after a helper edit quick.
#
# Usage: build.sh [VERSION]   -> prints a directory that holds kube-apiserver (of VERSION), e2ehelper (and
#                               kubectl if the machine has none)
#        build.sh --default-version -> prints the release pinned in build/go.mod
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KMS_TEST_CACHE_DIR:-$HOME/.cache/kms-plugin}/k8s"
cd "$here/build"

default_version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' go.mod)"
[[ -n "$default_version" ]] || { echo "build.sh: k8s.io/kubernetes not found in build/go.mod" >&2; exit 1; }
if [[ "${1:-}" == --default-version ]]; then echo "$default_version"; exit 0; fi
k8s_version="${1:-$default_version}"
apiserver_mod="$here/build"
if [[ "$k8s_version" != "$default_version" ]]; then
  apiserver_mod="$here/apiserver/$k8s_version"
  [[ -f "$apiserver_mod/go.mod" ]] || {
    echo "build.sh: no module for kube-apiserver $k8s_version: run tests/k8s/e2e/gen-apiserver-mod.sh $k8s_version" >&2
    exit 1
  }
fi
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
# 1.27 and older: the in-tree cloud providers do not build with current Go; nothing here needs them.
tags=""
((minor <= 27)) && tags="providerless"

hash_of() { sha256sum "$@" | sha256sum | cut -c1-16; }
# The build's inputs (not this script's text, so editing the script does not throw away a 30-minute build).
inputs_hash="$( { go version; echo "$ldflags"; echo "tags=$tags"; cat "$apiserver_mod/go.mod" "$apiserver_mod/go.sum"; } |
  sha256sum | cut -c1-16)"
apiserver_dir="$cache/kube-apiserver-$k8s_version-$inputs_hash"
helper_dir="$cache/e2ehelper-$(hash_of go.mod go.sum e2ehelper/*.go)"
standin_src="$here/../standin"
standin_dir="$cache/standin-$(hash_of "$standin_src"/go.mod "$standin_src"/go.sum "$standin_src"/*.go)"

log() { echo "build.sh: $*" >&2; }

if [[ ! -x "$apiserver_dir/kube-apiserver" ]]; then
  log "building kube-apiserver $k8s_version (cold: ~15-30 min on 2 cores; cached afterwards)"
  start=$SECONDS
  mkdir -p "$apiserver_dir.tmp"
  (cd "$apiserver_mod" && go mod download &&
    go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$apiserver_dir.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
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
if [[ ! -x "$standin_dir/standin" ]]; then
  log "building standin (the original Akeyless plugin's stand-in for the swap flow)"
  start=$SECONDS
  mkdir -p "$standin_dir.tmp"
  (cd "$standin_src" && go build -trimpath -ldflags "-s -w" -o "$standin_dir.tmp/standin" .)
  rm -rf "$standin_dir" && mv "$standin_dir.tmp" "$standin_dir"
  log "standin built in $((SECONDS - start))s"
fi

# kubectl: the machine's own if there is one, else built from the default release (any release here serves
# the few requests the run makes; a few more minutes, cached).
bin="$cache/bin-$k8s_version"
mkdir -p "$bin"
kubectl_dir="$cache/kubectl-$default_version-$(hash_of go.mod go.sum)"
if { [[ -n "${KMS_E2E_BUILD_KUBECTL:-}" ]] || ! command -v kubectl >/dev/null; } && [[ ! -x "$kubectl_dir/kubectl" ]]; then
  log "no kubectl on PATH: building kubectl $default_version"
  start=$SECONDS
  mkdir -p "$kubectl_dir"
  dflags="${ldflags//$k8s_version/$default_version}"
  dminor="${default_version#v1.}"; dflags="${dflags//gitMinor=$minor/gitMinor=${dminor%%.*}}"
  go build -trimpath -ldflags "$dflags" -o "$kubectl_dir/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl
  mv "$kubectl_dir/kubectl.tmp" "$kubectl_dir/kubectl"
  log "kubectl built in $((SECONDS - start))s"
fi
if [[ -x "$kubectl_dir/kubectl" ]]; then ln -sfn "$kubectl_dir/kubectl" "$bin/kubectl"; else rm -f "$bin/kubectl"; fi

# One stable directory with the binaries, for the run script and for people.
ln -sfn "$apiserver_dir/kube-apiserver" "$bin/kube-apiserver"
ln -sfn "$helper_dir/e2ehelper" "$bin/e2ehelper"
ln -sfn "$standin_dir/standin" "$bin/standin"
# Drop binaries of older inputs of this release (other releases are the matrix; *.tmp may be another build).
for d in "$cache"/kube-apiserver-"$k8s_version"-* "$cache"/e2ehelper-* "$cache"/kubectl-* "$cache"/standin-*; do
  [[ "$d" == "$apiserver_dir" || "$d" == "$helper_dir" || "$d" == "$kubectl_dir" || "$d" == "$standin_dir" || "$d" == *.tmp ]] || rm -rf "$d"
done
echo "$bin"
