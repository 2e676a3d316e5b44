package csi

import (
	"context"
	"errors"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// Stager is what a driver adds to the node skeleton (Node): how a volume of
// its kind is staged on this node, checked, flushed, expanded and unstaged.
// Node does the rest: stage records, per-volume locks, events and acks,
// publish bind mounts, stats and health probes. Its methods are called
// under the volume's lock.
type Stager[A any] interface {
	// CheckVolumeID validates the volume ID of a stage or publish request
	// (InvalidArgument naming the problem).
	CheckVolumeID(volumeID string) error
	// PrepareStage validates the rest of a NodeStageVolume request (Node has
	// checked the volume ID, the staging path and the capability) before the
	// volume is locked, and returns the function that stages it.
	PrepareStage(ctx context.Context, req *csi.NodeStageVolumeRequest) (StageFunc[A], error)
	// Check returns nil while what the stage made works, a Gone error on
	// positive evidence that it is lost, and any other error when it cannot
	// tell (wrapping ErrCorruptRecord when the record names something the
	// driver does not know). Node checks the boot ID and the staging mount.
	Check(ctx context.Context, rec *StageRecord[A]) error
	// Flush writes everything the node caches of the volume through to Ceph
	// and returns its device's count of sectors written since boot (0 if
	// unknown); ErrNothingToFlush when no filesystem or device is there.
	Flush(ctx context.Context, rec *StageRecord[A]) (deviceWrites uint64, err error)
	// Expand makes the node see the volume's new size (at least
	// requiredBytes; 0: whatever it is now), grows its filesystem if it has
	// one, and returns the size.
	Expand(ctx context.Context, rec *StageRecord[A], requiredBytes int64) (int64, error)
	// Unstage undoes what the stage made, once Node has flushed the volume
	// and unmounted the staging path (mount volumes); also for a stage that
	// failed half way or went stale. It succeeds if all of it is gone
	// already, and fails (never succeeds) when it cannot tell.
	Unstage(ctx context.Context, rec *StageRecord[A]) error
	// BlockDevice is the device a staged block volume is published as.
	BlockDevice(rec *StageRecord[A]) string
}

// StageFunc stages one volume; Node calls it under the volume's lock once it
// found the volume not staged (or cleared a stale stage). rec is the new
// record, with everything but the Attachment set; the Attachment is what a
// stage that crashed half way made (zero if none). It must call save before
// it makes anything that needs undoing, and again whenever the Attachment
// gains something to undo. A mount volume must end mounted at
// rec.StagingPath. If it fails after a save (and not in one), Node tears down
// what the record describes. It returns key/value pairs for the log line.
type StageFunc[A any] func(ctx context.Context, rec *StageRecord[A], save func() error) (logValues []any, err error)

// ErrNothingToFlush is Stager.Flush's answer when the volume has no mounted
// filesystem or device (yet): nothing of it is cached here.
var ErrNothingToFlush = errors.New("nothing to flush")

// ErrCorruptRecord marks a stage record naming something its driver does not
// know (e.g. an unknown mounter).
var ErrCorruptRecord = errors.New("corrupt stage record")

// Remounter is what a Stager adds when it can repair a lost stage in place
// without a CSI call (a FUSE daemon that died while the node kept running):
// Node.Recover calls Remount, under the volume's lock, for a staged volume
// whose Check answers Gone, then binds the staging path into its targets
// again.
type Remounter[A any] interface {
	// Remount makes the stage work again at rec.StagingPath with what the
	// record (and the driver's files in rec.WorkDir) hold.
	Remount(ctx context.Context, rec *StageRecord[A]) error
}

// UsageReporter is what a Stager adds when its volumes know their usage
// better than statfs(2) of a path tells (CephFS: the quota and recursive
// statistics). NodeGetVolumeStats runs Usage as a shared probe of the path,
// bounded by ProbeTimeout; a path that does not exist is os.ErrNotExist.
type UsageReporter interface {
	Usage(path string) ([]*csi.VolumeUsage, error)
}

// Keeper is what a Stager adds when a working stage runs processes that must
// be made to outlive the driver's container (rbd-fuse daemons moved out of
// its cgroup): Node.Recover calls Keep, under the volume's lock, for every
// staged volume that works (after a remount too), before the node is ready.
type Keeper[A any] interface {
	// Keep returns key/value pairs for the volume's log line.
	Keep(ctx context.Context, rec *StageRecord[A]) (logValues []any, err error)
}
