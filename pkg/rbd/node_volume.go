package rbd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/mount-utils"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// What the stager does to a staged RBD volume: check, flush, expand, unstage.

// unknownMounter is the error for a record naming a mounter this driver lacks.
func unknownMounter(rec *rcsi.StageRecord[Mapping]) error {
	return fmt.Errorf("stage record of volume %s names an unknown mounter %q: %w", rec.VolumeID, rec.Attachment.Mounter, rcsi.ErrCorruptRecord)
}

// Check asks the mounter whether the mapping still works.
func (s *stager) Check(ctx context.Context, rec *rcsi.StageRecord[Mapping]) error {
	m := s.mounters[rec.Attachment.Mounter]
	if m == nil {
		return unknownMounter(rec)
	}
	return m.Check(ctx, rec.Attachment)
}

// Unstage unmaps the image (a record naming no known mounter maps nothing).
func (s *stager) Unstage(ctx context.Context, rec *rcsi.StageRecord[Mapping]) error {
	m := s.mounters[rec.Attachment.Mounter]
	if m == nil {
		return nil
	}
	if err := m.Unmap(ctx, rec.Attachment); err != nil {
		return rcsi.Coded(rcsi.Code(err), "unmapping %s: %v", rec.Attachment.Device, err)
	}
	return nil
}

// Flush writes everything cached for the volume through to Ceph: syncfs on a
// mounted filesystem, fsync on a block device. Either reaches the image
// through the device (krbd and rbd-nbd flush to the OSDs; for rbd-fuse the
// loop device passes the fsync to rbd-fuse, which flushes librbd).
func (s *stager) Flush(ctx context.Context, rec *rcsi.StageRecord[Mapping]) (uint64, error) {
	dev := rec.Attachment.Device
	switch {
	case !rec.Block:
		if err := rcsi.SyncMounted(ctx, s.mounts, rec.StagingPath); err != nil {
			return 0, err
		}
	case dev != "":
		if _, err := os.Stat(dev); errors.Is(err, os.ErrNotExist) {
			return 0, rcsi.ErrNothingToFlush
		} else if err != nil {
			return 0, err
		}
		if err := syncDevice(dev); err != nil {
			return 0, err
		}
	default:
		return 0, rcsi.ErrNothingToFlush
	}
	return sectorsWritten(dev), nil
}

// syncDevice flushes a block device's cache down to the image (fsync(2)).
func syncDevice(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
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

// Expand makes the device see the grown image and grows the filesystem online.
func (s *stager) Expand(ctx context.Context, rec *rcsi.StageRecord[Mapping], requiredBytes int64) (int64, error) {
	m := s.mounters[rec.Attachment.Mounter]
	if m == nil {
		return 0, status.Error(codes.Internal, unknownMounter(rec).Error())
	}
	dev := rec.Attachment.Device
	if err := m.Refresh(ctx, rec.Attachment, requiredBytes); err != nil {
		return 0, status.Errorf(codes.Internal, "refreshing device size: %v", err)
	}
	if !rec.Block {
		if _, err := mount.NewResizeFs(s.mounts.Exec).Resize(dev, rec.StagingPath); err != nil {
			if rec.FsType == "ext4" && strings.Contains(err.Error(), "Permission denied to resize") {
				// ext4's online resize ioctl demands CAP_SYS_RESOURCE.
				return 0, status.Errorf(codes.FailedPrecondition,
					"growing ext4 on %s online needs CAP_SYS_RESOURCE, which this node plugin lacks (run it privileged): %v", dev, err)
			}
			return 0, status.Errorf(codes.Internal, "growing %s filesystem on %s: %v", rec.FsType, dev, err)
		}
	}
	size, err := rcsi.DeviceSize(dev)
	if err != nil {
		return 0, status.Errorf(codes.Internal, "reading size of %s: %v", dev, err)
	}
	return size, nil
}

// BlockDevice is the mapped device.
func (s *stager) BlockDevice(rec *rcsi.StageRecord[Mapping]) string { return rec.Attachment.Device }
