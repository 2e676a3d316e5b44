package cephfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// What the stager does to a staged CephFS volume: check, flush, expand,
// unstage, remount after a restart, report usage.

// unknownMounter is the error for a record naming a mounter this driver lacks.
func unknownMounter(rec *rcsi.StageRecord[Mount]) error {
	return fmt.Errorf("stage record of volume %s names an unknown mounter %q: %w", rec.VolumeID, rec.Attachment.Mounter, rcsi.ErrCorruptRecord)
}

// Check asks the mounter whether the staging mount answers: an rcsi.Gone
// error when it is lost (ceph-fuse died, the client was evicted, nothing
// mounted), another error when it cannot tell (it hangs).
func (s *stager) Check(ctx context.Context, rec *rcsi.StageRecord[Mount]) error {
	m := s.mounters[rec.Attachment.Mounter]
	if m == nil {
		return unknownMounter(rec)
	}
	return m.Healthy(ctx, rec.StagingPath)
}

// Flush makes every write completed through the volume's mount durable in
// RADOS (the mounter's Flush: for ceph-fuse a syncfs and an fsync of every
// file and directory). A lost mount has nothing left to flush: its cache
// died with its daemon (ErrNothingToFlush, so no ack claims otherwise).
func (s *stager) Flush(ctx context.Context, rec *rcsi.StageRecord[Mount]) (uint64, error) {
	m := s.mounters[rec.Attachment.Mounter]
	if m == nil {
		return 0, rcsi.ErrNothingToFlush
	}
	err := m.Flush(ctx, rec.StagingPath)
	if errors.Is(err, ErrNotMounted) || deadMount(err) {
		return 0, rcsi.ErrNothingToFlush
	}
	return 0, err
}

// Expand has nothing to grow on the node (ControllerExpandVolume sets the
// subvolume's quota, which the mount enforces at once); it reads the quota
// back, so the expand event carries the size the node sees.
func (s *stager) Expand(ctx context.Context, rec *rcsi.StageRecord[Mount], requiredBytes int64) (int64, error) {
	v, err := rcsi.Probe(ctx, "quota\x00"+rec.StagingPath, func() (any, error) { return xattrInt(rec.StagingPath, xattrQuota) })
	if err != nil {
		return 0, rcsi.ProbeError(err, "reading the quota of", rec.StagingPath)
	}
	quota := v.(int64)
	if quota == 0 {
		return 0, status.Errorf(codes.FailedPrecondition, "subvolume %s has no quota: its size is the file system's", rec.Attachment.Path)
	}
	if quota < requiredBytes {
		return 0, status.Errorf(codes.FailedPrecondition, "the quota of subvolume %s is %d bytes, less than %d: ControllerExpandVolume sets it", rec.Attachment.Path, quota, requiredBytes)
	}
	return quota, nil
}

// Unstage runs once the skeleton has flushed and unmounted the staging path:
// it removes any mount left there, waits for the ceph-fuse daemon to exit
// (it writes back its cache and closes its MDS session first) and removes the
// keyring.
func (s *stager) Unstage(ctx context.Context, rec *rcsi.StageRecord[Mount]) error {
	if m := s.mounters[rec.Attachment.Mounter]; m != nil {
		if err := m.Unmount(ctx, rec.StagingPath); err != nil {
			return err
		}
		if rec.Attachment.Mounter == MounterFuse {
			pid, err := rcsi.DaemonPid(fuseProg, rec.StagingPath)
			if err != nil {
				return err
			}
			if pid > 0 {
				if err := rcsi.WaitExit(ctx, pid, fuseExitTimeout); err != nil {
					return rcsi.Coded(rcsi.Code(err), "ceph-fuse of %s: %v", rec.StagingPath, err)
				}
			}
		}
	}
	if err := os.Remove(filepath.Join(rec.WorkDir, keyringFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return rcsi.Coded(codes.Internal, "removing the keyring of volume %s: %v", rec.VolumeID, err)
	}
	os.Remove(filepath.Join(rec.WorkDir, keyringFile+".tmp"))
	return nil
}

// BlockDevice: CephFS volumes are never block volumes.
func (s *stager) BlockDevice(*rcsi.StageRecord[Mount]) string { return "" }

// Remount mounts the subvolume again at the staging path with the kept key,
// replacing a lost mount (Node.Recover calls it at start).
func (s *stager) Remount(ctx context.Context, rec *rcsi.StageRecord[Mount]) error {
	a := rec.Attachment
	m := s.mounters[a.Mounter]
	if m == nil {
		return unknownMounter(rec)
	}
	if !a.Keyring {
		return fmt.Errorf("the record of volume %s keeps no key to remount with", rec.VolumeID)
	}
	cluster, err := s.clusters.Get(a.ClusterID)
	if err != nil {
		return err
	}
	creds, err := readKeyring(rec.WorkDir, a.UserID)
	if err != nil {
		return err
	}
	spec := MountSpec{Monitors: cluster.Monitors, FsName: a.FsName, Path: a.Path, Creds: creds, Options: a.Options, ReadOnly: rec.ReadOnly}
	if err := m.Mount(ctx, rec.StagingPath, spec); err != nil {
		return fmt.Errorf("mounting %s at %s: %s", a.Path, rec.StagingPath, creds.Redact(err.Error()))
	}
	return nil
}

// Keep moves the ceph-fuse daemon of a working stage into the daemons' cgroup
// if it is elsewhere (started by a plugin that stopped before it could move
// it), so it outlives this plugin too. Node.Recover calls it at start.
func (s *stager) Keep(_ context.Context, rec *rcsi.StageRecord[Mount]) ([]any, error) {
	f, ok := s.mounters[rec.Attachment.Mounter].(*fuseMounter)
	if !ok || !f.daemons.Enabled() {
		return []any{"mounter", rec.Attachment.Mounter}, nil
	}
	pid, _, err := rcsi.FindDaemon(fuseProg, rec.StagingPath)
	if err != nil {
		return nil, err
	}
	if err := f.daemons.Keep(pid, "ceph-fuse mount "+rec.StagingPath); err != nil {
		return nil, err
	}
	return []any{"mounter", MounterFuse, "pid", pid}, nil
}

// Usage reports the volume's bytes from the subvolume's quota (total) and
// recursive statistics (ceph.dir.rbytes: used, exact, where statfs through
// ceph-fuse rounds to 4 MiB), and its files (ceph.dir.rentries); a path that
// is not a CephFS mount gets statfs's figures.
func (s *stager) Usage(path string) ([]*csi.VolumeUsage, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, &os.PathError{Op: "statfs", Path: path, Err: err}
	}
	bs := int64(st.Bsize)
	total, avail, used := int64(st.Blocks)*bs, int64(st.Bavail)*bs, int64(st.Blocks-st.Bfree)*bs
	inodes := &csi.VolumeUsage{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)}
	if rbytes, err := xattrInt(path, xattrRbytes); err == nil {
		used = rbytes
		if quota, err := xattrInt(path, xattrQuota); err == nil && quota > 0 {
			total = quota
		}
		avail = max(total-used, 0)
		if files, err := xattrInt(path, xattrRentries); err == nil {
			// CephFS has no inode table to run out of: the files are the used inodes.
			inodes = &csi.VolumeUsage{Unit: csi.VolumeUsage_INODES, Used: files}
		}
	} else if !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.EOPNOTSUPP) {
		return nil, err
	}
	return []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: total, Available: avail, Used: used}, inodes}, nil
}

// CephFS virtual extended attributes the node reads.
const (
	xattrRbytes   = "ceph.dir.rbytes"
	xattrRentries = "ceph.dir.rentries"
)

// xattrInt reads a numeric extended attribute (0 when it is unset: ENODATA
// for ceph.quota.max_bytes means no quota).
func xattrInt(path, name string) (int64, error) {
	buf := make([]byte, 64)
	n, err := unix.Getxattr(path, name, buf)
	if errors.Is(err, unix.ENODATA) && name == xattrQuota {
		return 0, nil
	}
	if err != nil {
		return 0, &os.PathError{Op: "getxattr " + name, Path: path, Err: err}
	}
	v, err := strconv.ParseInt(strings.TrimSpace(strings.TrimRight(string(buf[:n]), "\x00")), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s of %s is %q: %w", name, path, buf[:n], err)
	}
	return v, nil
}
