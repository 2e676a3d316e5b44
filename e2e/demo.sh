#!/usr/bin/env bash
# make demo: a real RBD volume created, staged, published, written, read back,
# expanded, unpublished, unstaged and deleted through the driver's CSI API;
# then a CephFS volume published at two target paths at once (two "pods"),
# written through one and read through the other.
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
last_seq() { "$BIN" events --dir "$1" replay --since 999999999999 2>/dev/null | sed -n 's/.*last sequence on the node: \([0-9]*\).*/\1/p'; }
since=$(last_seq "$WORK/events")
log "walking one volume through its life on cluster $ROOKZMQ_CEPH_FSID as client.$ROOKZMQ_CEPH_RBD_USER"
"$BIN" demo --endpoint "unix://$WORK/csi.sock" --cluster-id c1 --pool rbd \
	--user "$ROOKZMQ_CEPH_RBD_USER" --keyfile "$WORK/rbd.key" --mounter rbd-fuse --workdir "$WORK" \
	--events-dir "$WORK/events"
sleep 0.5
log "what a subscriber on the node's event socket saw (rookzmq events subscribe):"
awk -v since="${since:-0}" '$1 > since' "$WORK/events.log"
kill $SUB 2>/dev/null || true
stop_driver

# CephFS: its own driver (--type=cephfs), state and event journal.
RBD_WORK=$WORK
prepare_work "$RBD_WORK/cephfs"
prov=rookzmq-cephfs-prov # the provisioner: ceph-csi's caps plus the MDS 'p' flag (docs/cephfs.md)
ceph auth get-or-create "client.$prov" mon 'allow r' mgr 'allow rw' \
	osd "allow rw tag cephfs metadata=$ROOKZMQ_CEPH_FS_NAME, allow rw tag cephfs data=$ROOKZMQ_CEPH_FS_NAME" \
	mds "allow rwps fsname=$ROOKZMQ_CEPH_FS_NAME path=/volumes" >/dev/null
(umask 077 && ceph auth get-key "client.$prov" >"$WORK/prov.key" && printf '%s\n' "$ROOKZMQ_CEPH_CEPHFS_KEY" >"$WORK/cephfs.key")
log "starting the CephFS driver (controller + node, mounter fuse); log: $WORK/driver.log"
start_driver --type=cephfs --drivername=cephfs.rookzmq.io --default-mounter=fuse
"$BIN" events --dir "$WORK/events" subscribe >"$WORK/events.log" 2>&1 &
SUB=$!
since=$(last_seq "$WORK/events")
log "one CephFS volume, two pods at once, as client.$prov (provisioning) and client.$ROOKZMQ_CEPH_CEPHFS_USER (mounting)"
"$BIN" demo --type cephfs --endpoint "unix://$WORK/csi.sock" --cluster-id c1 --fs-name "$ROOKZMQ_CEPH_FS_NAME" \
	--admin-user "$prov" --admin-keyfile "$WORK/prov.key" \
	--user "$ROOKZMQ_CEPH_CEPHFS_USER" --keyfile "$WORK/cephfs.key" --workdir "$WORK" --events-dir "$WORK/events"
sleep 0.5
log "the CephFS volume's events (two publish, two unpublish: one per pod):"
awk -v since="${since:-0}" '$1 > since' "$WORK/events.log"
