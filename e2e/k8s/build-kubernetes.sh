#!/usr/bin/env bash
# build-kubernetes.sh — build the Kubernetes binaries e2e/k8s/cluster.sh runs
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl)
# from the Go module proxy, at an exact version, into a cache directory
# outside the repository keyed by that version and the Go toolchain.
#
# k8s.io/kubernetes is not `go install`-able (its go.mod replaces the staging
# modules with ./staging paths), so a small wrapper module requires it and
# replaces each staging module with its published v0.X.Y.
#
# Usage: e2e/k8s/build-kubernetes.sh         prints the bin directory on stdout
# Env:   K8S_VERSION (v1.34.4), ROOKZMQ_K8S_CACHE (/var/cache/rookzmq-k8s)
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
STAGING_VERSION=v0.${K8S_VERSION#v1.}
CACHE=${ROOKZMQ_K8S_CACHE:-/var/cache/rookzmq-k8s}
GOVERSION=$(GOFLAGS= go env GOVERSION)
OUT=$CACHE/kubernetes-$K8S_VERSION-$GOVERSION
CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

START_US=${EPOCHREALTIME/./}
elapsed() {
	local d=$((${EPOCHREALTIME/./} - START_US))
	printf '%3d.%01ds' $((d / 1000000)) $((d % 1000000 / 100000))
}
log() { printf '[%s] build-kubernetes: %s\n' "$(elapsed)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

complete() {
	local c
	for c in "${CMDS[@]}"; do [[ -x $OUT/bin/$c ]] || return 1; done
	[[ -f $OUT/bin/.complete ]]
}

if complete; then
	log "cached: $OUT/bin"
	echo "$OUT/bin"
	exit 0
fi

mkdir -p "$OUT/src"
exec 9>"$OUT/.lock"
flock 9
if complete; then
	echo "$OUT/bin"
	exit 0
fi
cd "$OUT/src"
export GOFLAGS=-mod=mod
log "wrapper module for k8s.io/kubernetes $K8S_VERSION ..."
modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
[[ -f $modfile ]] || die "go mod download k8s.io/kubernetes@$K8S_VERSION failed (Go module proxy reachable?)"
{
	echo "module rookzmq.local/k8sbuild"
	echo
	echo "go $(sed -n 's/^go //p' "$modfile")"
	echo
	echo "require k8s.io/kubernetes $K8S_VERSION"
	echo
	# One replace per staging module: take the list from kubernetes' own go.mod.
	awk -v v="$STAGING_VERSION" '$2 == "=>" && $3 ~ /^\.\/staging/ {print "replace " $1 " => " $1 " " v}' "$modfile"
} >go.mod
pkgs=()
for c in "${CMDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c@$K8S_VERSION"); done
# Pinned @version: without it go silently moves to a newer kubernetes.
go get "${pkgs[@]}" >&2 || die "go get failed"
grep -q "k8s.io/kubernetes $K8S_VERSION\$" go.mod || die "go get moved k8s.io/kubernetes off $K8S_VERSION: $(grep 'k8s.io/kubernetes ' go.mod)"
log "go build ${CMDS[*]} (cold: ~6 min on 2 cores) ..."
mkdir -p "$OUT/bin"
build_pkgs=()
for c in "${CMDS[@]}"; do build_pkgs+=("k8s.io/kubernetes/cmd/$c"); done
CGO_ENABLED=0 go build -trimpath -o "$OUT/bin/" \
	-ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${K8S_VERSION#v1.}" \
	"${build_pkgs[@]}" >&2 || die "go build failed"
touch "$OUT/bin/.complete"
log "built in $(elapsed): $OUT/bin"
echo "$OUT/bin"
