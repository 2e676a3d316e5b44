#!/usr/bin/env bash
# install-deps.sh — install what rookzmq's make targets need on a fresh Debian 12
# machine: Ceph Pacific (16.2.x) daemons, clients and development libraries,
# ZeroMQ, filesystem tools and FUSE from apt; the pinned Go tools (csi-sanity,
# staticcheck; helm for the Kubernetes targets) with `go install`.
#
# Idempotent: every package is checked with dpkg-query first and only the
# missing ones are installed; `apt-get update` runs only when something is
# missing.
#
# Usage: e2e/install-deps.sh --apt-only | --tools DIR | --k8s DIR
#   --apt-only   only the Debian packages (make build, make demo, cluster.sh)
#   --tools DIR  the Debian packages, then every pinned Go tool built into DIR
#                from a throwaway module cache: each pin is fetched from the
#                module proxy on every run, so a pin the proxy refuses fails
#                here (in CI) rather than on a newcomer's machine. Only the
#                build cache is shared, so unchanged tools do not recompile.
#   --k8s DIR    only what the Kubernetes targets add: debootstrap, and the
#                K8S_GO_TOOLS (helm) built into DIR the same way (the cluster's
#                own packages are installed by e2e/k8s/cluster.sh)
set -euo pipefail

APT_PACKAGES=(
	ceph-mon ceph-osd ceph-mgr ceph-mds ceph-fuse rbd-fuse rbd-nbd ceph-common
	librbd-dev librados-dev libcephfs-dev libzmq3-dev
	e2fsprogs xfsprogs uuid-runtime util-linux python3-zmq fuse3
)
# Pinned Go tools: NAME PACKAGE VERSION. Versions are exact semantic versions,
# the only form the module proxy serves (not a project's own release names).
GO_TOOLS=(
	"csi-sanity github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity v5.6.0"
	"staticcheck honnef.co/go/tools/cmd/staticcheck v0.6.1"
)
# Pinned Go tools only the Kubernetes targets need (make k8s-deps), same format.
K8S_GO_TOOLS=(
	"helm helm.sh/helm/v3/cmd/helm v3.17.3"
)

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

usage() { sed -n '2,21s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

tools_dir=
k8s=0
case "${1:-}" in
--apt-only) ;;
--tools | --k8s)
	tools_dir=${2:-}
	[[ -n $tools_dir ]] || die "$1 needs a directory"
	[[ $1 == --k8s ]] && k8s=1
	;;
-h | --help)
	usage
	exit 0
	;;
*)
	usage >&2
	die "unknown argument: ${1:-(none)}"
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

# install_go_tools DIR TOOL...: `go install PACKAGE@VERSION` of every pinned
# tool ("NAME PACKAGE VERSION") into DIR, through a module cache made for this
# run and removed afterwards.
install_go_tools() {
	local dir=$1 modcache line name pkg version t
	shift
	command -v go >/dev/null 2>&1 || die "go not found in PATH: install Go first"
	mkdir -p "$dir"
	dir=$(cd "$dir" && pwd)
	# The cache is emptied before and after, but its path is fixed: the build
	# cache keys on source paths, so a new path each run would recompile all.
	modcache=$dir/.modcache
	rm -rf "$modcache"
	# shellcheck disable=SC2064
	trap "rm -rf '$modcache'" EXIT
	for line in "$@"; do
		read -r name pkg version <<<"$line"
		t=${EPOCHREALTIME/./}
		log "go: go install $pkg@$version (fresh module cache) ..."
		# GOFLAGS is replaced so project-wide flags (-tags) do not apply;
		# -modcacherw lets the throwaway cache be removed.
		rm -f "$dir/$name"
		GOFLAGS=-modcacherw GOMODCACHE="$modcache" GOBIN="$dir" go install "$pkg@$version" ||
			die "go install $pkg@$version failed: is the pin an exact version the module proxy serves?"
		[[ -x "$dir/$name" ]] || die "go install succeeded but $dir/$name is missing"
		log "go: $dir/$name ($version) in $(((${EPOCHREALTIME/./} - t) / 1000)) ms"
	done
}

if [[ $k8s -eq 1 ]]; then
	command -v debootstrap >/dev/null 2>&1 || {
		as_root apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 debootstrap ||
			die "apt-get install debootstrap failed"
	}
	install_go_tools "$tools_dir" "${K8S_GO_TOOLS[@]}"
else
	install_apt
	[[ -n $tools_dir ]] && install_go_tools "$tools_dir" "${GO_TOOLS[@]}"
fi
log "done"
