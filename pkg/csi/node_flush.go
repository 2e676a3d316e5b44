package csi

import (
	"context"
	"errors"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"
)

// flush has the driver write everything cached for the volume through to
// Ceph, and returns the ack event.
func (n *Node[A]) flush(ctx context.Context, rec *StageRecord[A]) (VolumeEvent, error) {
	start := time.Now()
	writes, err := n.stager.Flush(ctx, rec)
	if err != nil {
		return VolumeEvent{}, err
	}
	ev := n.ackEvent(rec, time.Since(start))
	ev.DeviceWrites = writes
	return ev, nil
}

// SyncMounted flushes the filesystem mounted at path (syncfs(2)), or answers
// ErrNothingToFlush when nothing is mounted there (a bounded probe says so).
func SyncMounted(ctx context.Context, m mount.Interface, path string) error {
	mnt, err := IsMountPoint(ctx, m, path)
	if errors.Is(err, os.ErrNotExist) || (err == nil && !mnt) {
		return ErrNothingToFlush
	}
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

func (n *Node[A]) ackEvent(rec *StageRecord[A], took time.Duration) VolumeEvent {
	return VolumeEvent{
		Kind: EventAck, VolumeID: rec.VolumeID, VolumeContext: rec.Context,
		AccessType: accessType(rec.Block), FsType: rec.FsType, ReadOnly: rec.ReadOnly,
		FlushMs: float64(took.Microseconds()) / 1000,
	}
}

// FlushVolume flushes a staged volume and emits its ack while it still holds
// the volume, so no detach can come between the flush and its ack. A volume
// allowed refuses is reported as not staged.
func (n *Node[A]) FlushVolume(ctx context.Context, volumeID, trigger string, allowed func(namespace, volumeID string) bool) (uint64, float64, error) {
	rec, unlock, err := n.begin(ctx, volumeID)
	if err != nil {
		return 0, 0, err
	}
	defer unlock()
	if rec == nil || !rec.Staged || (allowed != nil && !allowed(rec.Context[KeyPVCNamespace], volumeID)) {
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
func (n *Node[A]) VolumeByPVC(namespace, pvc string) (string, bool) {
	recs, err := n.state.all()
	if err != nil {
		return "", false
	}
	for _, r := range recs {
		if r.Staged && r.Context[KeyPVCName] == pvc && r.Context[KeyPVCNamespace] == namespace {
			return r.VolumeID, true
		}
	}
	return "", false
}

// StagedVolumes lists the staged volumes with their PVC and, for volumes
// without provisioner metadata, the namespace of a pod they are published to.
func (n *Node[A]) StagedVolumes() []StagedVolume {
	recs, _ := n.state.all()
	var out []StagedVolume
	for _, r := range recs {
		if !r.Staged {
			continue
		}
		v := StagedVolume{VolumeID: r.VolumeID, PVC: r.Context[KeyPVCName], Namespace: r.Context[KeyPVCNamespace],
			Unstaging: r.UnstageAcked}
		for _, pub := range r.Targets {
			v.PodNamespace = pub.Context[KeyPodNamespace]
			break
		}
		out = append(out, v)
	}
	return out
}

// PodVolumes lists the volumes published to a pod (by pod UID).
func (n *Node[A]) PodVolumes(podUID string) []string {
	recs, _ := n.state.all()
	var ids []string
	for _, r := range recs {
		for _, pub := range r.Targets {
			if pub.Context[KeyPodUID] == podUID {
				ids = append(ids, r.VolumeID)
				break
			}
		}
	}
	return ids
}
