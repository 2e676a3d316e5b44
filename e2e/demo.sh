#!/usr/bin/env bash
# make demo: a real RBD volume created, staged, published, written, read back,
# expanded, unpublished, unstaged and deleted through the driver's CSI API.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
ceph_env
prepare_work /tmp/rookzmq-demo
trap stop_driver EXIT
log "starting the driver (controller + node, mounter rbd-fuse); log: $WORK/driver.log"
start_driver
"$BIN" events --dir "$WORK/events" subscribe >"$WORK/events.log" 2>&1 &
SUB=$!
trap 'kill $SUB 2>/dev/null; stop_driver' EXIT
# The journal outlives demo runs: show only this run's events.
since=$("$BIN" events --dir "$WORK/events" replay --since 999999999999 2>/dev/null | sed -n 's/.*last sequence on the node: \([0-9]*\).*/\1/p')
log "walking one volume through its life on cluster $ROOKZMQ_CEPH_FSID as client.$ROOKZMQ_CEPH_RBD_USER"
"$BIN" demo --endpoint "unix://$WORK/csi.sock" --cluster-id c1 --pool rbd \
	--user "$ROOKZMQ_CEPH_RBD_USER" --keyfile "$WORK/rbd.key" --mounter rbd-fuse --workdir "$WORK" \
	--events-dir "$WORK/events"
sleep 0.5
log "what a subscriber on the node's event socket saw (rookzmq events subscribe):"
awk -v since="${since:-0}" '$1 > since' "$WORK/events.log"
