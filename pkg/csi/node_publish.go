package csi

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
)

// NodePublishVolume bind-mounts the staged filesystem (or the device, for block
// volumes) at the pod's target path.
func (n *Node[A]) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	if err := n.stager.CheckVolumeID(req.GetVolumeId()); err != nil {
		return nil, err
	}
	target := req.GetTargetPath()
	if err := Required("target_path", target); err != nil {
		return nil, err
	}
	if err := Required("staging_target_path", req.GetStagingTargetPath()); err != nil {
		return nil, err
	}
	vc := req.GetVolumeCapability()
	if err := Capability(vc, n.check); err != nil {
		return nil, err
	}
	rec, unlock, err := n.begin(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec == nil || !rec.Staged || rec.StagingPath != req.GetStagingTargetPath() {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", req.GetVolumeId(), req.GetStagingTargetPath())
	}
	reason, err := n.stale(ctx, rec)
	if err != nil {
		return nil, err
	}
	if reason != "" && n.canRemountInPlace(rec) {
		// A stage lost while the node ran (its FUSE daemon died): kubelet
		// will not stage it again for a new pod, so mount it again in
		// place where the driver can, and bind the other targets again.
		if err := n.remount(ctx, rec, reason); err != nil {
			klog.ErrorS(err, "cannot repair a lost stage for a publish", "volumeID", rec.VolumeID)
		} else {
			if _, err := n.rebindTargets(ctx, rec, true); err != nil {
				klog.ErrorS(err, "binding the targets of a remounted volume again", "volumeID", rec.VolumeID)
			}
			reason = ""
		}
	}
	if reason != "" {
		// Never bind an empty staging directory (the node's own disk) or a
		// device path that now names another image into a pod.
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s must be staged again: %s", req.GetVolumeId(), reason)
	}
	if (vc.GetBlock() != nil) != rec.Block {
		return nil, status.Errorf(codes.InvalidArgument, "volume was staged with access type %s, publish asks for the other", accessType(rec.Block))
	}
	// A bind whose mount died (its FUSE daemon exited and the stage was
	// mounted again since) is removed, then made again below.
	if perr := StatPath(ctx, target); MountLost(perr) {
		klog.InfoS("the target's mount is lost: binding it again", "volumeID", req.GetVolumeId(), "target", target, "err", perr)
		if err := detachAll(target); err != nil {
			return nil, err
		}
	}
	readOnly := req.GetReadonly() || rec.ReadOnly
	if pub, ok := rec.Targets[target]; ok {
		if pub.ReadOnly != readOnly {
			return nil, status.Errorf(codes.AlreadyExists, "volume is published at %s with read_only=%v", target, !readOnly)
		}
		if mnt, err := IsMountPoint(ctx, n.mounts, target); err == nil && mnt {
			return &csi.NodePublishVolumeResponse{}, nil
		}
	} else if vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER && len(rec.Targets) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume is SINGLE_NODE_SINGLE_WRITER and already published at %s", firstTarget(rec))
	}
	var flags []string
	source := rec.StagingPath
	if rec.Block {
		source = n.stager.BlockDevice(rec)
		if err := makeFile(target); err != nil {
			return nil, status.Errorf(codes.Internal, "creating target file %s: %v", target, err)
		}
	} else {
		flags = vc.GetMount().GetMountFlags()
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "creating target directory %s: %v", target, err)
		}
	}
	start := time.Now()
	// A crash after the mount but before the record was saved: keep that mount.
	// IsMountPoint reads the mount table: bind mounts can share the parent's device.
	// "ro" goes last: no "rw" among the mount flags can undo it.
	opts := append([]string{"bind"}, MountOptions(flags, readOnly)...)
	mnt, err := IsMountPoint(ctx, n.mounts, target)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(Code(err), "checking target path %s: %v", target, err)
	}
	if !mnt {
		if err := n.mounts.Mount(source, target, "", opts); err != nil {
			return nil, status.Errorf(codes.Internal, "bind-mounting %s at %s: %v", source, target, err)
		}
	}
	// Emit before recording: a crash in between repeats the event, never loses it.
	pub := *rec
	pub.ReadOnly = readOnly
	if err := n.emit(ctx, EventPublish, &pub, mergeContext(rec.Context, req.GetVolumeContext())); err != nil {
		return nil, err // kubelet retries; the retry finds the mount and emits
	}
	if rec.Targets == nil {
		rec.Targets = map[string]Publication{}
	}
	rec.Targets[target] = Publication{ReadOnly: readOnly, Context: req.GetVolumeContext(), Flags: flags}
	if err := n.state.save(rec); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.InfoS("volume published", "volumeID", req.GetVolumeId(), "target", target, "readOnly", readOnly, "duration", time.Since(start))
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts and removes the target path.
func (n *Node[A]) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if err := Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target := req.GetTargetPath()
	if err := Required("target_path", target); err != nil {
		return nil, err
	}
	rec, unlock, err := n.begin(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := mount.CleanupMountPoint(target, n.mounts, true); err != nil {
		return nil, status.Errorf(codes.Internal, "unmounting %s: %v", target, err)
	}
	if rec == nil {
		return &csi.NodeUnpublishVolumeResponse{}, nil // already unpublished
	}
	pub, published := rec.Targets[target]
	if !published {
		return &csi.NodeUnpublishVolumeResponse{}, nil // already unpublished
	}
	if err := n.emit(ctx, EventUnpublish, rec, mergeContext(rec.Context, pub.Context)); err != nil {
		return nil, err
	}
	delete(rec.Targets, target)
	if err := n.state.save(rec); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.InfoS("volume unpublished", "volumeID", req.GetVolumeId(), "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// firstTarget names one target the volume is published at (for messages).
func firstTarget[A any](rec *StageRecord[A]) string {
	for t := range rec.Targets {
		return t
	}
	return ""
}

func accessType(block bool) string {
	if block {
		return "block"
	}
	return "mount"
}

// makeFile creates an empty file (a bind-mount target for a device).
func makeFile(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE, 0o640)
	if err != nil {
		return err
	}
	return f.Close()
}

func mergeContext(a, b map[string]string) map[string]string {
	out := make(map[string]string, len(a)+len(b))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// MountOptions puts "ro" last, after the caller's flags, so that no "rw"
// among them can make a read-only mount writable.
func MountOptions(flags []string, readOnly bool) []string {
	var opts []string
	for _, f := range flags {
		if !readOnly || f != "rw" {
			opts = append(opts, f)
		}
	}
	if readOnly {
		opts = append(opts, "ro")
	}
	return opts
}

// canRemountInPlace says whether a lost stage can be mounted again where it
// is: the driver is a Remounter and the stage is of this boot (after a
// reboot kubelet stages again).
func (n *Node[A]) canRemountInPlace(rec *StageRecord[A]) bool {
	if _, ok := n.stager.(Remounter[A]); !ok {
		return false
	}
	boot, err := bootID()
	return err == nil && rec.BootID == boot
}
