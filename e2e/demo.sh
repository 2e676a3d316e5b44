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
log "walking one volume through its life on cluster $ROOKZMQ_CEPH_FSID as client.$ROOKZMQ_CEPH_RBD_USER"
"$BIN" demo --endpoint "unix://$WORK/csi.sock" --cluster-id c1 --pool rbd \
	--user "$ROOKZMQ_CEPH_RBD_USER" --keyfile "$WORK/rbd.key" --mounter rbd-fuse --workdir "$WORK"
