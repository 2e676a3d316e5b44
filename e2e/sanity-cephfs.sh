#!/usr/bin/env bash
# csi-sanity against the CephFS driver (Identity, Controller and Node services;
# the node mounts with ceph-fuse as the csi-cephfs user) on the throwaway
# cluster. Usage: sanity-cephfs.sh
set -euo pipefail
. "$(dirname "$0")/lib.sh"
SANITY=${CSI_SANITY:-$(go env GOPATH)/bin/csi-sanity}
ceph_env
prepare_work /tmp/rookzmq-sanity-cephfs
rm -f "$WORK/driver.log"
# The provisioning user: ceph-csi's caps plus the MDS 'p' flag, which setting
# quotas and layouts directly (not through the mgr) needs.
user=rookzmq-cephfs-prov
ceph auth get-or-create "client.$user" mon 'allow r' mgr 'allow rw' \
	osd "allow rw tag cephfs metadata=$ROOKZMQ_CEPH_FS_NAME, allow rw tag cephfs data=$ROOKZMQ_CEPH_FS_NAME" \
	mds "allow rwps fsname=$ROOKZMQ_CEPH_FS_NAME path=/volumes" >/dev/null
key=$(ceph auth get-key "client.$user")
mkdir -p "$WORK/creds/c1"
(umask 077 && printf '%s' "$user" >"$WORK/creds/c1/userID" && printf '%s' "$key" >"$WORK/creds/c1/userKey")
(umask 077 && {
	for s in CreateVolumeSecret DeleteVolumeSecret ControllerValidateVolumeCapabilitiesSecret ControllerExpandVolumeSecret; do
		printf '%s:\n  adminID: "%s"\n  adminKey: "%s"\n' "$s" "$user" "$key"
	done
	for s in NodeStageVolumeSecret NodePublishVolumeSecret; do # the mount user
		printf '%s:\n  userID: "%s"\n  userKey: "%s"\n' "$s" "$ROOKZMQ_CEPH_CEPHFS_USER" "$ROOKZMQ_CEPH_CEPHFS_KEY"
	done
} >"$WORK/secrets.yaml")
printf "clusterID: c1\nfsName: %s\n" "$ROOKZMQ_CEPH_FS_NAME" >"$WORK/params.yaml"
trap stop_driver EXIT
start_driver --type=cephfs --drivername=cephfs.rookzmq.io --default-mounter=fuse --credentials-dir "$WORK/creds"

log "csi-sanity, CephFS Identity, Controller and Node services"
start=$SECONDS
set +e
"$SANITY" --csi.endpoint "unix://$WORK/csi.sock" \
	--csi.stagingdir "$WORK/staging" --csi.mountdir "$WORK/mount" \
	--csi.secrets "$WORK/secrets.yaml" --csi.testvolumeparameters "$WORK/params.yaml" \
	--csi.testvolumesize 536870912 --csi.testvolumeexpandsize 1073741824 \
	--ginkgo.timeout 10m --ginkgo.no-color >"$WORK/sanity.log" 2>&1
rc=$?
set -e
grep -E '^(Ran |SUCCESS|FAIL|  \[FAIL\])|Passed \|' "$WORK/sanity.log" || tail -40 "$WORK/sanity.log"
if [ $rc -ne 0 ]; then
	grep -B2 -A25 '\[FAILED\]' "$WORK/sanity.log" | head -150
	echo "--- driver log tail"; tail -30 "$WORK/driver.log"
	exit $rc
fi
log "csi-sanity (CephFS) passed in $((SECONDS - start))s"
