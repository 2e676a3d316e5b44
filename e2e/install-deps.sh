#!/usr/bin/env bash
# install-deps.sh — install what the rookzmq end-to-end tests need on a fresh
# Debian 12 machine: Ceph Pacific (16.2.x) daemons, clients and development
# libraries, ZeroMQ, filesystem tools, FUSE, and csi-sanity.
#
# Idempotent: every package is checked with dpkg-query first and only the
# missing ones are installed; `apt-get update` runs only when something is
# missing; csi-sanity is built only when its binary is absent.
#
# Usage: e2e/install-deps.sh [--apt-only | --go-only | --k8s]
#   --apt-only   only the Debian packages (used by e2e/ceph/cluster.sh)
#   --go-only    only the Go tools (csi-sanity, staticcheck)
#   --k8s        only what the Kubernetes targets add: helm (the cluster's own
#                packages are installed by e2e/k8s/cluster.sh, the image's by
#                e2e/image/build.sh)
set -euo pipefail

APT_PACKAGES=(
	ceph-mon ceph-osd ceph-mgr ceph-mds ceph-fuse rbd-fuse rbd-nbd ceph-common
	librbd-dev librados-dev libcephfs-dev libzmq3-dev
	e2fsprogs xfsprogs uuid-runtime util-linux python3-zmq fuse3
)
CSI_SANITY_PKG=github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
CSI_SANITY_VERSION=v5.6.0
HELM_PKG=helm.sh/helm/v3/cmd/helm
HELM_VERSION=v3.17.3
STATICCHECK_PKG=honnef.co/go/tools/cmd/staticcheck
STATICCHECK_VERSION=v0.6.1 # = release 2025.1.1; the proxy serves only the vX.Y.Z name

export DEBIAN_FRONTEND="${DEBIAN_FRONTEND:-noninteractive}"

START_US=${EPOCHREALTIME/./}

# elapsed: seconds since the script started, e.g. "  3.2s".
elapsed() {
	local d=$((${EPOCHREALTIME/./} - START_US))
	printf '%3d.%01ds' $((d / 1000000)) $((d % 1000000 / 100000))
}
log() { printf '[%s] %s\n' "$(elapsed)" "$*"; }
die() {
	printf '[%s] install-deps.sh: ERROR: %s\n' "$(elapsed)" "$*" >&2
	exit 1
}

usage() { sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

do_apt=1
do_go=1
case "${1:-}" in
"") ;;
--apt-only) do_go=0 ;;
--go-only) do_apt=0 ;;
--k8s)
	do_apt=0 do_go=0
	go_install_k8s=1
	;;
-h | --help)
	usage
	exit 0
	;;
*)
	usage >&2
	die "unknown argument: $1"
	;;
esac

# as_root CMD...: run CMD as root (directly, or through sudo if available).
as_root() {
	if [[ $EUID -eq 0 ]]; then
		"$@"
	elif command -v sudo >/dev/null 2>&1; then
		sudo env DEBIAN_FRONTEND="$DEBIAN_FRONTEND" "$@"
	else
		die "must run as root (or have sudo) to run: $*"
	fi
}

is_installed() {
	[[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

install_apt() {
	if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
		die "dpkg-query/apt-get not found: this script supports Debian 12 (bookworm) only"
	fi

	local missing=() p
	for p in "${APT_PACKAGES[@]}"; do
		is_installed "$p" || missing+=("$p")
	done
	if [[ ${#missing[@]} -eq 0 ]]; then
		log "apt: all ${#APT_PACKAGES[@]} packages already installed"
		return 0
	fi
	log "apt: missing: ${missing[*]}"

	log "apt: apt-get update ..."
	as_root apt-get update -q ||
		die "apt-get update failed (is the network to the Debian mirror up?)"
	log "apt: apt-get update done"

	log "apt: apt-get install -y --no-install-recommends ${missing[*]} ..."
	as_root apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" ||
		die "apt-get install failed for: ${missing[*]}"

	local still=()
	for p in "${missing[@]}"; do
		is_installed "$p" || still+=("$p")
	done
	[[ ${#still[@]} -eq 0 ]] || die "still not installed after apt-get install: ${still[*]}"
	log "apt: installed ${#missing[@]} package(s)"
}

# go_install NAME PKG VERSION: a pinned `go install`, skipped when NAME exists.
go_install() {
	local name=$1 pkg=$2 version=$3 gopath bindir
	command -v go >/dev/null 2>&1 ||
		die "go not found in PATH: install Go first (needed to build $name)"
	gopath=$(go env GOPATH) || die "go env GOPATH failed"
	bindir="${gopath%%:*}/bin"
	if [[ -x "$bindir/$name" ]]; then
		log "go: $bindir/$name already present"
		return 0
	fi
	log "go: go install $pkg@$version ..."
	# GOFLAGS is cleared so that project-wide flags (e.g. -mod=vendor) do not
	# apply; GOBIN is pinned so the binary lands where we check for it.
	GOFLAGS='' GOBIN="$bindir" go install "$pkg@$version" ||
		die "go install of $name failed (is the Go module proxy reachable?)"
	[[ -x "$bindir/$name" ]] || die "go install succeeded but $bindir/$name is missing"
	log "go: installed $bindir/$name"
}

install_go_tools() {
	go_install csi-sanity "$CSI_SANITY_PKG" "$CSI_SANITY_VERSION"
	go_install staticcheck "$STATICCHECK_PKG" "$STATICCHECK_VERSION"
}

if [[ ${go_install_k8s:-0} -eq 1 ]]; then
	command -v debootstrap >/dev/null 2>&1 || {
		as_root apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 debootstrap ||
			die "apt-get install debootstrap failed"
	}
	go_install helm "$HELM_PKG" "$HELM_VERSION"
fi
[[ $do_apt -eq 1 ]] && install_apt
[[ $do_go -eq 1 ]] && install_go_tools
log "done"
