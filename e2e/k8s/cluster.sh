#!/usr/bin/env bash
# cluster.sh — a throwaway single-node Kubernetes for rookzmq's e2e tests, with
# no Docker: Kubernetes built from the Go module proxy (build-kubernetes.sh),
# containerd, runc, CNI plugins and etcd from Debian. Everything listens on
# 127.0.0.1; see ../../../shared/notes/local-kubernetes.md for why each setting.
#
# Usage: e2e/k8s/cluster.sh up|env|status|down|import TARBALL...
#   up       build (cached) and start etcd, containerd, the control plane and
#            kubelet; idempotent: running parts are left alone
#   env      print exports: KUBECONFIG, ROOKZMQ_K8S_CTR (ctr with the address)
#   status   which parts run; exit 1 if any does not
#   down     stop everything and remove all it created (never what it did not)
#   import   import docker-save tarballs into the cluster's containerd
#   restart-kubelet   stop and start kubelet (its pods keep running)
# Env: K8S_VERSION (v1.34.4), ROOKZMQ_K8S_DIR (/var/tmp/rookzmq-k8s),
#      ROOKZMQ_K8S_CACHE (/var/cache/rookzmq-k8s), ROOKZMQ_K8S_NODE (hostname;
#      must resolve to 127.0.0.1)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
K8S_VERSION=${K8S_VERSION:-v1.34.4}
BASE=${ROOKZMQ_K8S_DIR:-/var/tmp/rookzmq-k8s}
CACHE=${ROOKZMQ_K8S_CACHE:-/var/cache/rookzmq-k8s}
RUN=/run/rookzmq-k8s
KUBELET_DIR=/var/lib/kubelet
NODE=${ROOKZMQ_K8S_NODE:-$(hostname)}
PKI=$BASE/pki
LOGS=$BASE/logs
SOCK=$RUN/containerd.sock
PAUSE_IMAGE=rookzmq.local/pause:1
ETCD_PORT=12379
CNI_BRIDGE=rzk8s0
APT_PACKAGES=(containerd runc containernetworking-plugins etcd-server openssl iproute2)
# What identifies each component's process in /proc/PID/cmdline: our own
# files, never the binary's path (it depends on the build cache's location).
M_APISERVER="--tls-cert-file $PKI/apiserver.crt"
M_CONTROLLER="kube-controller-manager --kubeconfig $BASE/admin.kubeconfig"
M_SCHEDULER="kube-scheduler --kubeconfig $BASE/admin.kubeconfig"
M_KUBELET="kubelet --config $BASE/kubelet.yaml"
# Kernel settings kubelet changes at start: saved on first up, restored on down.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

START_US=${EPOCHREALTIME/./}
elapsed() {
	local d=$((${EPOCHREALTIME/./} - START_US))
	printf '%3d.%01ds' $((d / 1000000)) $((d % 1000000 / 100000))
}
log() { printf '[%s] k8s: %s\n' "$(elapsed)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}
usage() { sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

kubectl_() { "$BIN/kubectl" --kubeconfig "$BASE/admin.kubeconfig" "$@"; }
ctr_() { ctr --address "$SOCK" -n k8s.io "$@"; }

# ---------- processes ----------

pidfile() { echo "$RUN/$1.pid"; }
running() {
	local p
	p=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
	[[ -n $p ]] && kill -0 "$p" 2>/dev/null && [[ $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) == *"$2"* ]]
}
# start NAME MATCH CMD...: run CMD detached (own session), log to $LOGS/NAME.log.
start() {
	local name=$1 match=$2
	shift 2
	if running "$name" "$match"; then
		log "$name already running (pid $(cat "$(pidfile "$name")"))"
		return 0
	fi
	# The daemon keeps no descriptor of ours beyond 0-2 (e.g. a caller's
	# `flock FILE make test` lock, which kubelet would otherwise hold forever).
	(
		for fd in $(ls "/proc/$BASHPID/fd"); do
			[[ $fd -gt 2 ]] && eval "exec $fd>&-"
		done 2>/dev/null
		exec setsid "$@"
	) >>"$LOGS/$name.log" 2>&1 </dev/null &
	local pid=$!
	echo $pid >"$(pidfile "$name")"
	sleep 0.3
	kill -0 $pid 2>/dev/null || die "$name exited at once: $(tail -3 "$LOGS/$name.log")"
	log "$name started (pid $pid, log $LOGS/$name.log)"
}
stop() {
	local name=$1 match=$2 p i
	running "$name" "$match" || {
		rm -f "$(pidfile "$name")"
		return 0
	}
	p=$(cat "$(pidfile "$name")")
	kill "$p" 2>/dev/null || true
	for i in $(seq 100); do
		kill -0 "$p" 2>/dev/null || break
		sleep 0.1
	done
	kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null || true
	rm -f "$(pidfile "$name")"
	log "$name stopped"
}
# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds.
wait_for() {
	local what=$1 secs=$2 i
	shift 2
	for ((i = 0; i < secs * 5; i++)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	die "$what not ready after ${secs}s (logs: $LOGS)"
}

# ---------- prerequisites ----------

is_installed() { [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]; }
install_apt() {
	local missing=() p
	for p in "${APT_PACKAGES[@]}"; do is_installed "$p" || missing+=("$p"); done
	[[ ${#missing[@]} -eq 0 ]] && return 0
	log "apt-get install ${missing[*]} ..."
	DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}" >/dev/null
	# Debian's containerd package would start a daemon under systemd; ours is
	# separate (own socket, root and state), so nothing else is touched.
}

build() {
	BIN=$("$HERE/build-kubernetes.sh") || die "building Kubernetes failed"
}
bin_if_built() {
	BIN=$CACHE/kubernetes-$K8S_VERSION-$(GOFLAGS= go env GOVERSION 2>/dev/null)/bin
}

pause_image() {
	local out=$CACHE/pause-image.tar
	if [[ ! -f $out || $HERE/../image/pause/main.go -nt $out ]]; then
		log "building the pause image ..."
		local tmp
		tmp=$(mktemp -d)
		(cd "$ROOT/e2e/image" && GOFLAGS= CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$tmp/root/pause" ./pause &&
			GOFLAGS= go run . -o "$out.tmp" -tag "$PAUSE_IMAGE" -dir "$tmp/root" -entrypoint /pause >&2) || die "pause image build failed"
		mv "$out.tmp" "$out"
		rm -rf "$tmp"
	fi
	ctr_ images ls -q | grep -qx "$PAUSE_IMAGE" || ctr_ images import "$out" >/dev/null
}

# ---------- certificates ----------

cert() { # NAME CN O [SANs]
	local name=$1 cn=$2 o=$3 san=${4:-}
	[[ -f $PKI/$name.crt ]] && return 0
	openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
	local subj="/CN=$cn"
	[[ -n $o ]] && subj="/O=$o$subj"
	openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=serverAuth,clientAuth"
		[[ -n $san ]] && echo "subjectAltName=$san"
	} >"$PKI/$name.ext"
	openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
		-days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
	rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
kubeconfig() { # FILE CERTNAME
	cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: rookzmq-e2e
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$PKI/ca.crt"}
users:
- name: $2
  user: {client-certificate: "$PKI/$2.crt", client-key: "$PKI/$2.key"}
contexts:
- name: rookzmq-e2e
  context: {cluster: rookzmq-e2e, user: $2}
current-context: rookzmq-e2e
EOF
}
pki() {
	mkdir -p "$PKI"
	chmod 700 "$PKI"
	if [[ ! -f $PKI/ca.crt ]]; then
		openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 3650 \
			-subj "/CN=rookzmq-e2e-ca" 2>/dev/null
	fi
	cert apiserver kube-apiserver "" "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$NODE,IP:127.0.0.1,IP:10.96.0.1"
	cert admin kubernetes-admin system:masters
	cert kubelet "system:node:$NODE" system:nodes "DNS:$NODE,DNS:localhost,IP:127.0.0.1"
	[[ -f $PKI/sa.key ]] || {
		openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
		openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
	}
	kubeconfig "$BASE/admin.kubeconfig" admin
	kubeconfig "$BASE/kubelet.kubeconfig" kubelet
}

# ---------- configuration ----------

configs() {
	mkdir -p "$BASE/containerd/root" "$BASE/containerd/opt" "$BASE/cni/net.d" "$BASE/cni/ipam" "$BASE/cni/cache" "$BASE/pod-logs"
	cat >"$BASE/containerd/config.toml" <<EOF
version = 2
root = "$BASE/containerd/root"
state = "$RUN/containerd"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$RUN/containerd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$BASE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$BASE/cni/net.d"
EOF
	cat >"$BASE/cni/net.d/10-rookzmq-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "rookzmq-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "$CNI_BRIDGE", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$BASE/cni/ipam", "ranges": [[{"subnet": "10.244.77.0/24"}]]}},
    {"type": "loopback"}
  ]
}
EOF
	cat >"$BASE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
address: 127.0.0.1
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix://$SOCK
podLogsDir: $BASE/pod-logs
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
EOF
}

# ---------- up ----------

record_created() { # PATH: remember PATH as ours when it does not exist yet
	grep -qxF "$1" "$BASE/created" 2>/dev/null && return 0
	[[ -e $1 ]] || echo "$1" >>"$BASE/created"
}

up() {
	[[ $EUID -eq 0 ]] || die "must run as root"
	getent hosts "$NODE" | grep -q '^127\.0\.0\.1' || die "node name $NODE must resolve to 127.0.0.1 (set ROOKZMQ_K8S_NODE)"
	if [[ -e $KUBELET_DIR ]] && ! grep -qxF "$KUBELET_DIR" "$BASE/created" 2>/dev/null; then
		die "$KUBELET_DIR exists and was not created by this script: another kubelet? refusing"
	fi
	if [[ -S /run/containerd/containerd.sock ]] && pgrep -x containerd >/dev/null && ! running containerd "$BASE/containerd/config.toml"; then
		log "note: a system containerd runs; this cluster uses its own ($SOCK) and leaves it alone"
	fi
	install_apt
	build
	mkdir -p "$BASE" "$RUN" "$LOGS"
	if [[ ! -f $BASE/created ]]; then
		: >"$BASE/created"
		for p in "$KUBELET_DIR" /var/log/containers /var/log/pods /var/lib/cni /run/netns /etc/kubernetes; do record_created "$p"; done
		for c in /sys/fs/cgroup/*/; do [[ -e ${c}kubepods ]] || echo "${c}kubepods" >>"$BASE/created"; done
		ip link show "$CNI_BRIDGE" >/dev/null 2>&1 || echo "link:$CNI_BRIDGE" >>"$BASE/created"
		ip netns list 2>/dev/null | awk '{print $1}' >"$BASE/netns-before"
		local s
		for s in "${SYSCTLS[@]}"; do echo "$s=$(sysctl -n "$s" 2>/dev/null)" >>"$BASE/sysctls-before"; done
	fi
	# The node plugin moves its rbd-fuse daemons into this cgroup (chart value
	# node.fuseCgroup): ours to remove (rmdir, so only once empty) unless it
	# was there before.
	local c
	for c in /sys/fs/cgroup/*/; do record_created "${c}rookzmq-fuse"; done
	pki
	configs
	log "certificates and configuration ready"

	start etcd "$BASE/etcd" etcd --name rookzmq-e2e --data-dir "$BASE/etcd" \
		--listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
		--initial-cluster "rookzmq-e2e=http://127.0.0.1:$((ETCD_PORT + 1))" --listen-metrics-urls "" --log-level warn
	start containerd "$BASE/containerd/config.toml" containerd --config "$BASE/containerd/config.toml"
	start kube-apiserver "$M_APISERVER" "$BIN/kube-apiserver" \
		--etcd-servers "http://127.0.0.1:$ETCD_PORT" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port 6443 \
		--endpoint-reconciler-type none --authorization-mode Node,RBAC --allow-privileged=true \
		--enable-admission-plugins NodeRestriction \
		--client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
		--kubelet-client-certificate "$PKI/admin.crt" --kubelet-client-key "$PKI/admin.key" \
		--kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types Hostname,InternalIP \
		--service-account-issuer https://kubernetes.default.svc.cluster.local \
		--service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
		--service-cluster-ip-range 10.96.0.0/24 --profiling=false
	wait_for containerd 30 ctr --address "$SOCK" version
	pause_image
	wait_for kube-apiserver 60 kubectl_ get --raw /readyz
	log "kube-apiserver ready"
	start kube-controller-manager "$M_CONTROLLER" "$BIN/kube-controller-manager" \
		--kubeconfig "$BASE/admin.kubeconfig" --authentication-kubeconfig "$BASE/admin.kubeconfig" \
		--authorization-kubeconfig "$BASE/admin.kubeconfig" --bind-address 127.0.0.1 --leader-elect=false \
		--service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" --use-service-account-credentials \
		--cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" --profiling=false
	start kube-scheduler "$M_SCHEDULER" "$BIN/kube-scheduler" \
		--kubeconfig "$BASE/admin.kubeconfig" --authentication-kubeconfig "$BASE/admin.kubeconfig" \
		--authorization-kubeconfig "$BASE/admin.kubeconfig" --bind-address 127.0.0.1 --leader-elect=false --profiling=false
	start kubelet "$M_KUBELET" "$BIN/kubelet" --config "$BASE/kubelet.yaml" --kubeconfig "$BASE/kubelet.kubeconfig" \
		--hostname-override "$NODE" --root-dir "$KUBELET_DIR"
	wait_for "node $NODE" 90 node_ready
	wait_for "default service account" 60 kubectl_ -n default get serviceaccount default
	log "cluster up: node $NODE Ready ($K8S_VERSION); export KUBECONFIG=$BASE/admin.kubeconfig"
}

node_ready() {
	[[ $(kubectl_ get node "$NODE" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

# ---------- status / env ----------

COMPONENTS=(etcd:"$BASE/etcd" containerd:"$BASE/containerd/config.toml" kube-apiserver:"$M_APISERVER"
	kube-controller-manager:"$M_CONTROLLER" kube-scheduler:"$M_SCHEDULER" kubelet:"$M_KUBELET")
status() {
	local c bad=0
	for c in "${COMPONENTS[@]}"; do
		if running "${c%%:*}" "${c#*:}"; then
			printf '%-24s running (pid %s)\n' "${c%%:*}" "$(cat "$(pidfile "${c%%:*}")")"
		else
			printf '%-24s not running\n' "${c%%:*}"
			bad=1
		fi
	done
	if [[ $bad -eq 0 ]]; then
		bin_if_built
		kubectl_ get nodes -o wide 2>&1 || bad=1
	fi
	return $bad
}

env_() {
	[[ -f $BASE/admin.kubeconfig ]] || die "no cluster: run $0 up"
	bin_if_built
	echo "export KUBECONFIG=$BASE/admin.kubeconfig"
	echo "export ROOKZMQ_K8S_BIN=$BIN"
	echo "export ROOKZMQ_K8S_NODE=$NODE"
	echo "export ROOKZMQ_K8S_CTR='ctr --address $SOCK -n k8s.io'"
	echo "export PATH=$BIN:\$PATH"
}

import() {
	local t
	for t in "$@"; do
		[[ -f $t ]] || die "import: $t: no such file"
		log "importing $t ..."
		ctr_ images import "$t" >&2 || die "ctr images import $t failed"
	done
}

# ---------- down ----------

down() {
	[[ -d $BASE ]] || {
		log "nothing to remove ($BASE absent)"
		return 0
	}
	bin_if_built
	if running kube-apiserver "$M_APISERVER" && running kubelet "$M_KUBELET"; then
		log "deleting all pods (kubelet tears their mounts and networks down) ..."
		kubectl_ delete daemonsets,deployments,statefulsets,replicasets,jobs --all --all-namespaces --wait=false >/dev/null 2>&1 || true
		kubectl_ delete pods --all --all-namespaces --grace-period=5 --timeout=60s >/dev/null 2>&1 || true
	fi
	local c
	stop kube-scheduler "$M_SCHEDULER"
	stop kube-controller-manager "$M_CONTROLLER"
	stop kubelet "$M_KUBELET"
	stop kube-apiserver "$M_APISERVER"
	if running containerd "$BASE/containerd/config.toml"; then
		local id
		for id in $(ctr_ tasks ls -q 2>/dev/null); do
			ctr_ tasks kill -s KILL "$id" >/dev/null 2>&1 || true
		done
		sleep 1
		for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true; done
		for id in $(ctr_ containers ls -q 2>/dev/null); do ctr_ containers delete "$id" >/dev/null 2>&1 || true; done
	fi
	stop containerd "$BASE/containerd/config.toml"
	# Shims still running for our containerd (a crash may leave some).
	local p
	for p in $(pgrep -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
	stop etcd "$BASE/etcd"
	# Mounts under what we created, deepest first.
	local m
	for m in $(findmnt -rn -o TARGET | grep -E "^($KUBELET_DIR|$BASE|$RUN)(/|$)" | sort -r); do
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
	done
	# Network namespaces the CRI made (only those absent before the first up).
	local ns
	for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cni-' || true); do
		grep -qxF "$ns" "$BASE/netns-before" 2>/dev/null || ip netns delete "$ns" 2>/dev/null || true
	done
	if [[ -f $BASE/sysctls-before ]]; then
		local kv
		while IFS= read -r kv; do [[ -n ${kv#*=} ]] && sysctl -q -w "$kv" >/dev/null 2>&1 || true; done <"$BASE/sysctls-before"
	fi
	if [[ -f $BASE/created ]]; then
		local path
		while IFS= read -r path; do
			case $path in
			link:*) ip link delete "${path#link:}" 2>/dev/null || true ;;
			/sys/fs/cgroup/*)
				# cgroup directories: remove children first (rmdir only).
				[[ -d $path ]] && find "$path" -depth -type d -exec rmdir {} \; 2>/dev/null || true
				;;
			*) [[ -e $path ]] && rm -rf --one-file-system "$path" ;;
			esac
		done <"$BASE/created"
	fi
	rm -rf --one-file-system "$RUN" "$BASE"
	log "removed everything the cluster created (build cache kept: $CACHE)"
}

main() {
	case "${1:-}" in
	up) up ;;
	env) env_ ;;
	status) status ;;
	down) down ;;
	import)
		shift
		import "$@"
		;;
	restart-kubelet)
		running kubelet "$M_KUBELET" || die "kubelet is not running (up first)"
		stop kubelet "$M_KUBELET"
		up
		;;
	-h | --help) usage ;;
	*)
		usage >&2
		exit 2
		;;
	esac
}
main "$@"
