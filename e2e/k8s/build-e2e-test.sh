#!/usr/bin/env bash
# build-e2e-test.sh — build Kubernetes' e2e.test (its storage suites only, see
# upstream/e2e_test.go) from the Go module proxy into a cache directory outside
# the repository, keyed by the Go toolchain and the upstream module's files, so
# a second run does not rebuild. Cold: ~5.5 min on 2 cores; cached: instant.
#
# Usage: e2e/k8s/build-e2e-test.sh      prints the path of e2e.test on stdout
# Env:   ROOKZMQ_K8S_CACHE (/var/cache/rookzmq-k8s)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$HERE/upstream
CACHE=${ROOKZMQ_K8S_CACHE:-/var/cache/rookzmq-k8s}
GOVERSION=$(GOFLAGS= go env GOVERSION)
KEY=$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC/e2e_test.go" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)
OUT=$CACHE/e2e-test-$GOVERSION-$KEY

START_US=${EPOCHREALTIME/./}
elapsed() {
	local d=$((${EPOCHREALTIME/./} - START_US))
	printf '%3d.%01ds' $((d / 1000000)) $((d % 1000000 / 100000))
}
log() { printf '[%s] build-e2e-test: %s\n' "$(elapsed)" "$*" >&2; }

if [[ -x $OUT/e2e.test ]]; then
	log "cached: $OUT/e2e.test"
	echo "$OUT/e2e.test"
	exit 0
fi
mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9
if [[ ! -x $OUT/e2e.test ]]; then
	log "go test -c k8s.io/kubernetes/test/e2e storage suites (cold: ~5.5 min on 2 cores) ..."
	# Default build settings (cgo, no -trimpath): `make vet` compiles the same
	# packages the same way, so each is compiled once.
	(cd "$SRC" && GOFLAGS=-mod=readonly go test -c -ldflags "-s -w" -o "$OUT/e2e.test.tmp" .) >&2 ||
		{ log "ERROR: building e2e.test failed"; exit 1; }
	mv "$OUT/e2e.test.tmp" "$OUT/e2e.test"
	log "built in $(elapsed): $OUT/e2e.test"
fi
echo "$OUT/e2e.test"
