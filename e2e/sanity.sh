#!/usr/bin/env bash
# csi-sanity (the CSI conformance suite) against the real driver on the
# throwaway cluster. Usage: sanity.sh mount|block
set -euo pipefail
. "$(dirname "$0")/lib.sh"
access=${1:?usage: sanity.sh mount|block}
SANITY=${CSI_SANITY:-$(go env GOPATH)/bin/csi-sanity}
ceph_env
prepare_work "${SANITY_WORK:-/tmp/rookzmq-sanity-$access}"
rm -f "$WORK/driver.log"
# Credentials for the calls that carry no secrets (ListVolumes, GetCapacity), as
# a mounted Secret would provide them.
mkdir -p "$WORK/creds/c1"
(umask 077 && printf '%s' "$ROOKZMQ_CEPH_RBD_USER" >"$WORK/creds/c1/userID" && printf '%s' "$ROOKZMQ_CEPH_RBD_KEY" >"$WORK/creds/c1/userKey")
trap stop_driver EXIT
start_driver --credentials-dir "$WORK/creds"

secrets() { # every secret csi-sanity can pass, all the csi-rbd user
	for s in CreateVolumeSecret DeleteVolumeSecret ControllerValidateVolumeCapabilitiesSecret \
		NodeStageVolumeSecret ControllerExpandVolumeSecret NodePublishVolumeSecret \
		CreateSnapshotSecret DeleteSnapshotSecret ListSnapshotsSecret; do
		printf '%s:\n  userID: "%s"\n  userKey: "%s"\n' "$s" "$ROOKZMQ_CEPH_RBD_USER" "$ROOKZMQ_CEPH_RBD_KEY"
	done
}
(umask 077 && secrets >"$WORK/secrets.yaml")
printf "clusterID: c1\npool: rbd\nmounter: rbd-fuse\ncsi.storage.k8s.io/fstype: xfs\n" >"$WORK/params.yaml"

log "csi-sanity, access type $access"
start=$SECONDS
set +e
"$SANITY" --csi.endpoint "unix://$WORK/csi.sock" \
	--csi.stagingdir "$WORK/staging" --csi.mountdir "$WORK/mount" \
	--csi.secrets "$WORK/secrets.yaml" --csi.testvolumeparameters "$WORK/params.yaml" \
	--csi.testvolumeaccesstype "$access" \
	--csi.testvolumesize 536870912 --csi.testvolumeexpandsize 1073741824 \
	--ginkgo.timeout 20m --ginkgo.no-color >"$WORK/sanity.log" 2>&1
rc=$?
set -e
grep -E '^(Ran |SUCCESS|FAIL|  \[FAIL\])|Passed \|' "$WORK/sanity.log" || tail -40 "$WORK/sanity.log"
if [ $rc -ne 0 ]; then
	grep -B2 -A25 '\[FAILED\]' "$WORK/sanity.log" | head -150
	echo "--- driver log tail"; tail -30 "$WORK/driver.log"
	exit $rc
fi
log "csi-sanity ($access) passed in $((SECONDS - start))s"
