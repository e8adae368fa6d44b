#!/usr/bin/env bash
# Writes tests/k8s/e2e/apiserver/<version>/go.mod (+ go.sum): a module whose only content is a `tool`
# directive for k8s.io/kubernetes/cmd/kube-apiserver at <version>, with every staging module the
# kubernetes module requires as v0.0.0 replaced by the matching published v0.x.y. build.sh builds from it.
# Needs the Go module proxy once. Usage: gen-apiserver-mod.sh v1.31.14
set -euo pipefail
version="${1:?usage: gen-apiserver-mod.sh v1.MINOR.PATCH}"
[[ "$version" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || { echo "gen-apiserver-mod.sh: bad version $version" >&2; exit 2; }
staging="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="$here/apiserver/$version"
mkdir -p "$dir"
cd "$dir"
gomod="$(go mod download -json "k8s.io/kubernetes@$version" | awk -F'"' '$2 == "GoMod" { print $4 }')"
[[ -f "$gomod" ]] || { echo "gen-apiserver-mod.sh: the module proxy did not serve k8s.io/kubernetes@$version" >&2; exit 1; }
{
  echo "// kube-apiserver $version for the e2e version matrix (build.sh); written by ../../gen-apiserver-mod.sh."
  echo "module kms-plugin.test/k8s/e2e/apiserver/$version"
  echo
  echo "go 1.26.0"
  echo
  echo "replace ("
  awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print "\t" $1 " => " $1 " '"$staging"'" }' "$gomod"
  echo ")"
} >go.mod
rm -f go.sum
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$version"
go mod tidy
echo "$dir"
