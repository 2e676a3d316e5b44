package rbd

import (
	"context"
	"errors"
	"os"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// errNothingToFlush: the volume has no mounted filesystem or device (yet).
var errNothingToFlush = errors.New("nothing to flush")

// flush writes everything cached for the volume through to Ceph: syncfs on a
// mounted filesystem, fsync on a block device. Either reaches the image
// through the device (krbd and rbd-nbd flush to the OSDs; for rbd-fuse the
// loop device passes the fsync to rbd-fuse, which flushes librbd). It returns
// the ack event.
func (n *Node) flush(rec *stageRecord) (rcsi.VolumeEvent, error) {
	start := time.Now()
	var err error
	switch {
	case !rec.Block:
		if notMnt, merr := n.mounts.IsLikelyNotMountPoint(rec.StagingPath); merr != nil || notMnt {
			return rcsi.VolumeEvent{}, errNothingToFlush
		}
		err = syncFS(rec.StagingPath)
	case rec.Device != "":
		if _, serr := os.Stat(rec.Device); serr != nil {
			return rcsi.VolumeEvent{}, errNothingToFlush
		}
		err = syncDevice(rec.Device)
	default:
		return rcsi.VolumeEvent{}, errNothingToFlush
	}
	if err != nil {
		return rcsi.VolumeEvent{}, err
	}
	return rcsi.VolumeEvent{
		Kind: rcsi.EventAck, VolumeID: rec.VolumeID, VolumeContext: rec.Context,
		AccessType: accessType(rec), FsType: rec.FsType, ReadOnly: rec.ReadOnly,
		FlushMs: float64(time.Since(start).Microseconds()) / 1000,
	}, nil
}

// FlushVolume flushes a staged volume for the event bridge and returns its ack.
func (n *Node) FlushVolume(ctx context.Context, volumeID string) (rcsi.VolumeEvent, error) {
	unlock, err := n.lock(ctx, volumeID)
	if err != nil {
		return rcsi.VolumeEvent{}, err
	}
	defer unlock()
	rec, err := n.state.load(volumeID)
	if err != nil {
		return rcsi.VolumeEvent{}, err
	}
	if rec == nil || !rec.Staged {
		return rcsi.VolumeEvent{}, errNotStaged(volumeID)
	}
	ev, err := n.flush(rec)
	if err != nil {
		return ev, status.Errorf(codes.Internal, "flushing volume %s: %v", volumeID, err)
	}
	return ev, nil
}

// StagedContext returns the volume context of a volume staged on this node.
func (n *Node) StagedContext(volumeID string) (map[string]string, bool) {
	rec, err := n.state.load(volumeID)
	if err != nil || rec == nil || !rec.Staged {
		return nil, false
	}
	return rec.Context, true
}

// VolumeByPVC finds the staged volume of a PVC.
func (n *Node) VolumeByPVC(namespace, pvc string) (string, bool) {
	recs, err := n.state.all()
	if err != nil {
		return "", false
	}
	for _, r := range recs {
		if r.Staged && r.Context[ParamPVCName] == pvc && r.Context[ParamPVCNamespace] == namespace {
			return r.VolumeID, true
		}
	}
	return "", false
}

// PodVolumes lists the volumes published to a pod (by pod UID).
func (n *Node) PodVolumes(podUID string) []string {
	recs, _ := n.state.all()
	var ids []string
	for _, r := range recs {
		for _, pc := range r.Pods {
			if pc["csi.storage.k8s.io/pod.uid"] == podUID {
				ids = append(ids, r.VolumeID)
				break
			}
		}
	}
	return ids
}
