package rbd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
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
func (n *Node) flush(ctx context.Context, rec *stageRecord) (rcsi.VolumeEvent, error) {
	start := time.Now()
	var err error
	switch {
	case !rec.Block:
		mnt, merr := isMountPoint(ctx, n.mounts, rec.StagingPath)
		if errors.Is(merr, os.ErrNotExist) || (merr == nil && !mnt) {
			return rcsi.VolumeEvent{}, errNothingToFlush
		}
		if merr != nil {
			return rcsi.VolumeEvent{}, merr
		}
		err = syncFS(rec.StagingPath)
	case rec.Device != "":
		if _, serr := os.Stat(rec.Device); errors.Is(serr, os.ErrNotExist) {
			return rcsi.VolumeEvent{}, errNothingToFlush
		} else if serr != nil {
			return rcsi.VolumeEvent{}, serr
		}
		err = syncDevice(rec.Device)
	default:
		return rcsi.VolumeEvent{}, errNothingToFlush
	}
	if err != nil {
		return rcsi.VolumeEvent{}, err
	}
	ev := n.ackEvent(rec, time.Since(start))
	ev.DeviceWrites = sectorsWritten(rec.Device)
	return ev, nil
}

// sectorsWritten is a block device's count of sectors written since boot
// (0 if unknown): the bridge journals no new ack for a flush that wrote nothing.
func sectorsWritten(dev string) uint64 {
	var st unix.Stat_t
	if dev == "" || unix.Stat(dev, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/stat", unix.Major(st.Rdev), unix.Minor(st.Rdev)))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 7 {
		return 0
	}
	n, _ := strconv.ParseUint(f[6], 10, 64)
	return n
}

func (n *Node) ackEvent(rec *stageRecord, took time.Duration) rcsi.VolumeEvent {
	return rcsi.VolumeEvent{
		Kind: rcsi.EventAck, VolumeID: rec.VolumeID, VolumeContext: rec.Context,
		AccessType: accessType(rec), FsType: rec.FsType, ReadOnly: rec.ReadOnly,
		FlushMs: float64(took.Microseconds()) / 1000,
	}
}

// FlushVolume flushes a staged volume and emits its ack while it still holds
// the volume, so no detach can come between the flush and its ack. A volume
// allowed refuses is reported as not staged.
func (n *Node) FlushVolume(ctx context.Context, volumeID, trigger string, allowed func(namespace, volumeID string) bool) (uint64, float64, error) {
	rec, unlock, err := n.begin(ctx, volumeID)
	if err != nil {
		return 0, 0, err
	}
	defer unlock()
	if rec == nil || !rec.Staged || (allowed != nil && !allowed(rec.Context[ParamPVCNamespace], volumeID)) {
		return 0, 0, errNotStaged(volumeID)
	}
	ev, err := n.flush(ctx, rec)
	if err != nil {
		return 0, 0, status.Errorf(codes.Internal, "flushing volume %s: %v", volumeID, err)
	}
	ev.Trigger = trigger
	seq, err := n.events.VolumeEvent(ctx, ev)
	if err != nil {
		return 0, 0, err
	}
	return seq, ev.FlushMs, nil
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

// StagedVolumes lists the staged volumes with their PVC and, for volumes
// without provisioner metadata, the namespace of a pod they are published to.
func (n *Node) StagedVolumes() []rcsi.StagedVolume {
	recs, _ := n.state.all()
	var out []rcsi.StagedVolume
	for _, r := range recs {
		if !r.Staged {
			continue
		}
		v := rcsi.StagedVolume{VolumeID: r.VolumeID, PVC: r.Context[ParamPVCName], Namespace: r.Context[ParamPVCNamespace],
			Unstaging: r.UnstageAcked}
		for _, pub := range r.Targets {
			v.PodNamespace = pub.Context[rcsi.KeyPodNamespace]
			break
		}
		out = append(out, v)
	}
	return out
}

// PodVolumes lists the volumes published to a pod (by pod UID).
func (n *Node) PodVolumes(podUID string) []string {
	recs, _ := n.state.all()
	var ids []string
	for _, r := range recs {
		for _, pub := range r.Targets {
			if pub.Context[rcsi.KeyPodUID] == podUID {
				ids = append(ids, r.VolumeID)
				break
			}
		}
	}
	return ids
}
