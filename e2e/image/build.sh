#!/usr/bin/env bash
# build.sh — build the rookzmq container image without Docker or a registry.
#
#   1. debootstrap a minimal Debian root and install only the runtime client
#      packages into it. Default: bookworm, Ceph Pacific 16.2.15 (end of life).
#      ROOKZMQ_IMAGE_SUITE=trixie gives Reef 18.2.7, and the image builds, but
#      trixie's rbd-fuse 18.2.7 (with libfuse3 3.17) segfaults in
#      fuse_opt_parse before it mounts anything (seen 2026-11-30), and rbd-fuse
#      is the mounter that works without kernel modules;
#   2. copy it to a build root, add the -dev packages and a C compiler there,
#      and build bin/rookzmq inside that chroot (host Go toolchain and module
#      cache bind-mounted), so the binary links the image's own libraries;
#   3. strip docs, man pages, locales and apt caches from the runtime root;
#   4. assemble the image (runtime root + a layer with the binary) with
#      go-containerregistry (e2e/image/main.go) as a docker-save tarball.
#
# Roots are cached under ROOKZMQ_IMAGE_CACHE (/var/cache/rookzmq-image), keyed
# by suite and package list, so only the binary is rebuilt when nothing else
# changed.
#
# Usage: e2e/image/build.sh rookzmq OUT.tar TAG
#        e2e/image/build.sh sidecars OUTDIR     csi-provisioner and csi-resizer images
#        e2e/image/build.sh e2e-images OUTDIR   images Kubernetes' storage e2e tests run
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SUITE=${ROOKZMQ_IMAGE_SUITE:-bookworm}
MIRROR=${ROOKZMQ_IMAGE_MIRROR:-http://deb.debian.org/debian}
CACHE=${ROOKZMQ_IMAGE_CACHE:-/var/cache/rookzmq-image}
RUNTIME_PACKAGES=(ceph-common rbd-nbd rbd-fuse ceph-fuse fuse3 e2fsprogs xfsprogs util-linux mount kmod libzmq5 ca-certificates)
BUILD_PACKAGES=(librados-dev librbd-dev libcephfs-dev libzmq3-dev gcc libc6-dev pkg-config)
# The sidecars the chart runs, from the Go module proxy at pinned versions.
SIDECARS=(
	csi-provisioner=github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner@v6.3.0
	csi-resizer=github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer@v2.3.0
)
SIDECAR_REPO=${ROOKZMQ_SIDECAR_REPO:-rookzmq.local}

START_US=${EPOCHREALTIME/./}
elapsed() {
	local d=$((${EPOCHREALTIME/./} - START_US))
	printf '%3d.%01ds' $((d / 1000000)) $((d % 1000000 / 100000))
}
log() { printf '[%s] image: %s\n' "$(elapsed)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

# Bump when roots() changes what it makes.
ROOTS_REVISION=1
KEY=$(printf '%s\n' "$SUITE" "${RUNTIME_PACKAGES[*]}" "${BUILD_PACKAGES[*]}" "$ROOTS_REVISION" | sha256sum | cut -c1-12)
ROOTS=$CACHE/$SUITE-$KEY
RT=$ROOTS/runtime
BR=$ROOTS/build

MOUNTS=()
cleanup() {
	local i
	for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
	MOUNTS=()
}
trap cleanup EXIT
bind() { # SRC DST [ro]
	mkdir -p "$2"
	mount --bind "$1" "$2"
	MOUNTS+=("$2")
	[[ ${3:-} == ro ]] && mount -o remount,bind,ro "$2"
	return 0
}
in_chroot() { # ROOT CMD...: run with /proc, /dev, /sys and resolv.conf in place
	local r=$1
	shift
	mount -t proc proc "$r/proc"
	MOUNTS+=("$r/proc")
	bind /dev "$r/dev"
	bind /sys "$r/sys" ro
	cp /etc/resolv.conf "$r/etc/resolv.conf"
	local rc=0
	chroot "$r" /usr/bin/env -i PATH=/usr/local/go/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive "$@" || rc=$?
	cleanup
	return $rc
}

roots() {
	if [[ -f $ROOTS/.complete ]]; then
		log "cached roots: $ROOTS"
		return 0
	fi
	command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null
	rm -rf "$ROOTS"
	mkdir -p "$ROOTS"
	log "debootstrap --variant=minbase $SUITE ..."
	debootstrap --variant=minbase "$SUITE" "$RT" "$MIRROR" >"$ROOTS/debootstrap.log" 2>&1 ||
		die "debootstrap $SUITE failed: $(tail -3 "$ROOTS/debootstrap.log")"
	log "debootstrap done; apt-get install ${RUNTIME_PACKAGES[*]} ..."
	# No docs or man pages, ever (dpkg excludes them at unpack time).
	cat >"$RT/etc/dpkg/dpkg.cfg.d/01-rookzmq-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
	in_chroot "$RT" sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends ${RUNTIME_PACKAGES[*]}" >"$ROOTS/apt-runtime.log" 2>&1 ||
		die "apt-get install in the runtime root failed: $(tail -5 "$ROOTS/apt-runtime.log")"
	log "runtime packages installed: ceph $(chroot "$RT" dpkg-query -W -f='${Version}' librados2)"
	log "build root: copy + ${BUILD_PACKAGES[*]} ..."
	cp -a "$RT" "$BR"
	in_chroot "$BR" sh -c "apt-get install -y -q --no-install-recommends ${BUILD_PACKAGES[*]}" >"$ROOTS/apt-build.log" 2>&1 ||
		die "apt-get install in the build root failed: $(tail -5 "$ROOTS/apt-build.log")"
	log "stripping the runtime root ..."
	rm -rf "$RT"/var/lib/apt/lists/* "$RT"/var/cache/apt/* "$RT"/var/cache/debconf/*-old "$RT"/var/log/* \
		"$RT"/usr/share/doc "$RT"/usr/share/man "$RT"/usr/share/info "$RT"/usr/share/locale "$RT"/usr/share/lintian \
		"$RT"/var/cache/ldconfig/aux-cache
	find "$RT" -xdev -name '__pycache__' -type d -prune -exec rm -rf {} +
	: >"$RT/etc/resolv.conf"
	touch "$ROOTS/.complete"
	log "roots ready: $(du -sh --apparent-size "$RT" | cut -f1) runtime"
}

# build_binary OUT: bin/rookzmq built in the build root against its libraries.
build_binary() {
	local out=$1 goroot gomodcache version tags=""
	goroot=$(GOFLAGS= go env GOROOT)
	gomodcache=$(GOFLAGS= go env GOMODCACHE)
	version=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo dev)
	# go-ceph's build tags name the oldest Ceph whose API it may use.
	case $SUITE in bookworm) tags=pacific ;; esac
	(cd "$ROOT" && GOFLAGS= go mod download) || die "go mod download failed"
	mkdir -p "$CACHE/gocache-$SUITE" "$BR/src" "$BR/out"
	bind "$goroot" "$BR/usr/local/go" ro
	bind "$gomodcache" "$BR/gomod" ro
	bind "$CACHE/gocache-$SUITE" "$BR/gocache"
	bind "$ROOT" "$BR/src" ro
	bind "$(dirname "$out")" "$BR/out"
	log "go build (chroot $SUITE, tags '${tags}') ..."
	in_chroot "$BR" sh -c "cd /src && GOMODCACHE=/gomod GOCACHE=/gocache GOPROXY=off GOFLAGS=-buildvcs=false CGO_ENABLED=1 \
		go build -tags '$tags' -trimpath -ldflags '-s -w -X main.version=$version' -o /out/$(basename "$out") ./cmd/rookzmq" ||
		die "go build in the build root failed"
	log "bin/rookzmq built against $SUITE's libraries"
}

image_tool() {
	(cd "$HERE" && GOFLAGS= go build -o "$CACHE/image-tool" .) || die "building the image tool failed"
	echo "$CACHE/image-tool"
}

rookzmq_image() {
	local out=$1 tag=$2 tool layer
	[[ $EUID -eq 0 ]] || die "must run as root (debootstrap, chroot)"
	roots
	layer=$(mktemp -d)
	mkdir -p "$layer/usr/local/bin"
	build_binary "$layer/usr/local/bin/rookzmq"
	chroot "$RT" true # the runtime root is a usable root
	# The binary runs against the runtime root's libraries (no -dev packages there).
	cp "$layer/usr/local/bin/rookzmq" "$RT/tmp/rookzmq-check"
	chroot "$RT" /tmp/rookzmq-check version >/dev/null || die "the binary does not run in the runtime root"
	rm -f "$RT/tmp/rookzmq-check"
	tool=$(image_tool)
	"$tool" -o "$out" -tag "$tag" -dir "$RT" -dir "$layer" -entrypoint /usr/local/bin/rookzmq \
		-env "ROOKZMQ_IMAGE_SUITE=$SUITE" || die "assembling the image failed"
	rm -rf "$layer"
}

sidecars() {
	local outdir=$1 s name mod version bin tool root
	mkdir -p "$outdir" "$CACHE/sidecars"
	tool=$(image_tool)
	for s in "${SIDECARS[@]}"; do
		name=${s%%=*} mod=${s#*=} version=${s##*@}
		bin=$CACHE/sidecars/$name-$version
		if [[ ! -x $bin ]]; then
			# Built from a copy of the module: some sidecars' go.mod carry
			# replace directives, which `go install mod@version` refuses.
			log "go build $mod ..."
			local dir
			dir=$(GOFLAGS= go mod download -json "${mod%%/cmd/*}@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
			[[ -d $dir ]] || die "go mod download ${mod%%/cmd/*}@$version failed"
			root=$(mktemp -d)
			cp -r "$dir" "$root/src"
			chmod -R u+w "$root/src"
			(cd "$root/src" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version" \
				-o "$bin.tmp" "./cmd/$name") || die "building $mod failed"
			mv "$bin.tmp" "$bin"
			rm -rf "$root"
		fi
		root=$(mktemp -d)
		cp "$bin" "$root/$name"
		"$tool" -o "$outdir/$name-image.tar" -tag "$SIDECAR_REPO/$name:$version" -dir "$root" -entrypoint "/$name" ||
			die "assembling $name failed"
		rm -rf "$root"
	done
}

# The images Kubernetes' storage e2e tests start (e2e/k8s/upstream), under
# E2E_REPO, which KUBE_TEST_REPO_LIST (e2e/k8s/upstream/repo-list.yaml) makes
# the framework use instead of registry.k8s.io (not reachable here):
#   busybox:1.37.0-1  BusyBox from Debian's busybox-static (Debian ships 1.35.0);
#   agnhost:2.56      agnhost built from the k8s.io/kubernetes that e2e.test
#                     is built from (its VERSION says 2.56), on that busybox;
#   nginx:1.14-4      the busybox image again: the storage tests only run a
#                     shell in it (volumes' exec check), never nginx;
#   pause:3.10.1      the cluster's pause program.
E2E_REPO=rookzmq.local/e2e-test-images
e2e_images() {
	local outdir=$1 tool deb root agnhost upstream
	mkdir -p "$outdir" "$CACHE/e2e"
	tool=$(image_tool)
	deb=$(compgen -G "$CACHE/e2e/busybox-static_*.deb" | head -1 || true)
	if [[ -z $deb ]]; then
		log "apt-get download busybox-static ..."
		(cd "$CACHE/e2e" && apt-get download busybox-static >/dev/null 2>&1) ||
			{ apt-get update -q >/dev/null && (cd "$CACHE/e2e" && apt-get download busybox-static >/dev/null 2>&1); } ||
			die "apt-get download busybox-static failed"
		deb=$(ls "$CACHE"/e2e/busybox-static_*.deb | head -1)
	fi
	root=$(mktemp -d)
	dpkg-deb -x "$deb" "$root/x"
	mkdir -p "$root/bb/bin" "$root/bb/usr" "$root/bb/etc" "$root/bb/tmp" "$root/bb/root"
	chmod 1777 "$root/bb/tmp"
	cp "$root/x/bin/busybox" "$root/bb/bin/busybox"
	local a
	for a in $("$root/bb/bin/busybox" --list); do
		[[ $a == busybox ]] || ln -s busybox "$root/bb/bin/$a"
	done
	ln -s bin "$root/bb/sbin"
	ln -s ../bin "$root/bb/usr/bin"
	ln -s ../bin "$root/bb/usr/sbin"
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/bb/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/bb/etc/group"
	"$tool" -o "$outdir/e2e-busybox-image.tar" -tag "$E2E_REPO/busybox:1.37.0-1" -dir "$root/bb" -cmd sh ||
		die "assembling busybox failed"
	"$tool" -o "$outdir/e2e-nginx-image.tar" -tag "$E2E_REPO/nginx:1.14-4" -dir "$root/bb" -cmd sh ||
		die "assembling the nginx stand-in failed"
	upstream=$ROOT/e2e/k8s/upstream
	agnhost=$CACHE/e2e/agnhost-$(cat "$upstream/go.sum" | sha256sum | cut -c1-12)
	if [[ ! -x $agnhost ]]; then
		log "go build k8s.io/kubernetes/test/images/agnhost ..."
		(cd "$upstream" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -ldflags "-s -w" -o "$agnhost.tmp" \
			k8s.io/kubernetes/test/images/agnhost) || die "building agnhost failed"
		mv "$agnhost.tmp" "$agnhost"
	fi
	mkdir -p "$root/ag"
	cp "$agnhost" "$root/ag/agnhost"
	"$tool" -o "$outdir/e2e-agnhost-image.tar" -tag "$E2E_REPO/agnhost:2.56" -dir "$root/bb" -dir "$root/ag" -entrypoint /agnhost ||
		die "assembling agnhost failed"
	rm -rf "$root"
}

case "${1:-}" in
rookzmq)
	[[ $# -eq 3 ]] || die "usage: $0 rookzmq OUT.tar TAG"
	rookzmq_image "$2" "$3"
	;;
roots) roots ;;
sidecars)
	[[ $# -eq 2 ]] || die "usage: $0 sidecars OUTDIR"
	sidecars "$2"
	;;
e2e-images)
	[[ $# -eq 2 ]] || die "usage: $0 e2e-images OUTDIR"
	e2e_images "$2"
	;;
*)
	sed -n '2,23s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
	exit 2
	;;
esac
log "done"
