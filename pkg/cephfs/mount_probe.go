package cephfs

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"k8s.io/mount-utils"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// The mounters' view of the node: the mount table, bounded probes of a mount
// (rcsi.ProbeDir, shared with the node skeleton's probes) and the daemons.

// probeDir opens dir within rcsi.ProbeTimeout (see rcsi.ProbeDir).
func probeDir(ctx context.Context, dir string) error { return rcsi.ProbeDir(ctx, dir) }

// deadMount says whether a probe's error shows the mount lost for good:
// ENOTCONN or ECONNABORTED (a FUSE daemon that exited), ESHUTDOWN (a client
// the cluster evicted and blocklisted) or ESTALE.
func deadMount(err error) bool { return rcsi.MountLost(err) }

// probeError turns a probe's failure that is not evidence of a lost mount
// into a status naming the path.
func probeError(err error, path string) error {
	if errors.Is(err, rcsi.ErrHung) {
		return coded(codes.Unavailable, "mount %s did not answer within %s (hung mount?)", path, rcsi.ProbeTimeout)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return coded(codes.DeadlineExceeded, "checking mount %s: %v", path, err)
	}
	return coded(codes.Internal, "checking mount %s: %v", path, err)
}

// mountAt returns the topmost mount at dir (nil if none); a mount table that
// cannot be read is an error, never "not mounted".
func mountAt(dir string) (*mount.MountInfo, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, coded(codes.Internal, "reading the mount table: %v", err)
	}
	var top *mount.MountInfo
	for i := range infos {
		if infos[i].MountPoint == dir {
			top = &infos[i] // later entries are mounted on top
		}
	}
	return top, nil
}

// hasOption says whether a mount's per-mount options contain opt.
func hasOption(mi *mount.MountInfo, opt string) bool {
	for _, o := range mi.MountOptions {
		if o == opt {
			return true
		}
	}
	return false
}
