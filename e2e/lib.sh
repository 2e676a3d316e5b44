#!/usr/bin/env bash
# Shared helpers for the e2e scripts: cluster env, clusters file, key file, and
# starting/stopping the driver binary. Source it; it defines functions only.

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$E2E_DIR/.." && pwd)
BIN=${BIN:-$ROOT/bin/rookzmq}

log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }

# ceph_env loads the throwaway cluster's exports (the cluster must be up).
ceph_env() {
	local env
	env=$("$E2E_DIR/ceph/cluster.sh" env) || return 1
	eval "$env"
}

# prepare_work DIR: clusters file and a 0600 key file for the csi-rbd user.
prepare_work() {
	WORK=$1
	mkdir -p "$WORK"
	chmod 700 "$WORK"
	cat >"$WORK/config.json" <<JSON
[{"clusterID":"c1","monitors":["$ROOKZMQ_CEPH_MONITORS"],"rbd":{"radosNamespace":""},"cephFS":{"subvolumeGroup":"csi"}}]
JSON
	(umask 077 && printf '%s\n' "$ROOKZMQ_CEPH_RBD_KEY" >"$WORK/rbd.key")
}

# start_driver [extra flags]: runs the driver (controller+node, rbd-fuse default)
# on $WORK/csi.sock, logging to $WORK/driver.log; waits for the socket.
start_driver() {
	rm -f "$WORK/csi.sock"
	"$BIN" --controller --node --registration-dir= --endpoint "unix://$WORK/csi.sock" --nodeid "$(hostname)" \
		--clusters "$WORK/config.json" --default-mounter rbd-fuse --statedir "$WORK/state" \
		--events-dir "$WORK/events" --events-endpoint "unix://$WORK/events-csi.sock" \
		-v=4 "$@" >>"$WORK/driver.log" 2>&1 &
	DRIVER_PID=$!
	for _ in $(seq 100); do
		[ -S "$WORK/csi.sock" ] && return 0
		kill -0 "$DRIVER_PID" 2>/dev/null || { tail -20 "$WORK/driver.log"; return 1; }
		sleep 0.1
	done
	echo "driver did not create its socket" >&2
	return 1
}

stop_driver() {
	[ -n "${DRIVER_PID:-}" ] || return 0
	kill "$DRIVER_PID" 2>/dev/null || true
	wait "$DRIVER_PID" 2>/dev/null || true
	DRIVER_PID=
}
