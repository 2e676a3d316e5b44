package csi

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
)

// KeyFsType is the volume context key of the StorageClass filesystem (ceph-csi's),
// used when the capability names none.
const KeyFsType = "fsType"

// Node serves the CSI Node service of one driver: the volume-agnostic part
// (stage records with the boot ID, per-volume locks, events, flush and ack,
// publish bind mounts, bounded stats and health probes) around the driver's
// Stager. A is the driver's Attachment type (see StageRecord).
type Node[A any] struct {
	csi.UnimplementedNodeServer
	nodeID        string
	stager        Stager[A]
	check         CapabilityCheck
	defaultFsType string
	mounts        mount.Interface
	state         stateStore[A]
	events        EventSink
	locks         KeyLocks
	acks          ackTimers
	caps          []csi.NodeServiceCapability_RPC_Type
	// recovering is Recover's state (recoverNone, Running, Done).
	recovering atomic.Int32
}

// NodeConfig configures NewNode.
type NodeConfig struct {
	NodeID string
	// StateDir holds stage records and the volumes' work directories; it
	// must survive a restart of the driver (a host path).
	StateDir string
	// Events receives the volume events; nil discards them.
	Events EventSink
	// Mounts mounts and unmounts; nil: mount-utils' default.
	Mounts mount.Interface
	// CheckCapability says why the driver cannot serve a capability ("" if it can).
	CheckCapability CapabilityCheck
	// DefaultFsType is a mount volume's filesystem when neither the
	// capability nor the volume context (KeyFsType) names one.
	DefaultFsType string
	// Capabilities are the RPCs NodeGetCapabilities lists; nil: stage and
	// unstage, expand, stats, health and single-node multi-writer.
	Capabilities []csi.NodeServiceCapability_RPC_Type
}

// NewNode makes the state directory and the node service around s.
func NewNode[A any](cfg NodeConfig, s Stager[A]) (*Node[A], error) {
	if cfg.NodeID == "" {
		return nil, errors.New("node ID is required")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	n := &Node[A]{
		nodeID: cfg.NodeID, stager: s, check: cfg.CheckCapability, defaultFsType: cfg.DefaultFsType,
		mounts: cfg.Mounts, state: stateStore[A]{dir: cfg.StateDir}, events: cfg.Events, caps: cfg.Capabilities,
	}
	if n.mounts == nil {
		n.mounts = mount.New("")
	}
	if n.events == nil {
		n.events = NoEvents{}
	}
	if n.check == nil {
		n.check = func(*csi.VolumeCapability) string { return "" }
	}
	if n.caps == nil {
		n.caps = []csi.NodeServiceCapability_RPC_Type{
			csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
			csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
			csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
			csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
			csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		}
	}
	return n, nil
}

// cleanupTimeout bounds a clean-up (teardown, undoing a failed stage), which
// runs to its end even when the call's own deadline has passed.
const cleanupTimeout = 2 * time.Minute

// lock serialises calls for one volume on this node.
func (n *Node[A]) lock(ctx context.Context, volumeID string) (func(), error) {
	unlock, err := n.locks.Lock(ctx, volumeID)
	if err != nil {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %q is already in progress", volumeID)
	}
	return unlock, nil
}

// begin locks a volume for one call and loads its stage record (nil if it
// has none); the caller defers unlock.
func (n *Node[A]) begin(ctx context.Context, volumeID string) (*StageRecord[A], func(), error) {
	unlock, err := n.lock(ctx, volumeID)
	if err != nil {
		return nil, nil, err
	}
	rec, err := n.state.load(volumeID)
	if err != nil {
		unlock()
		return nil, nil, status.Error(codes.Internal, err.Error())
	}
	return rec, unlock, nil
}

// stale says why a staged record no longer describes the node ("" if it
// does). Only positive evidence makes a stage stale: another boot ID, the
// driver's Check finding what the stage made gone, the staging path missing
// from the mount table. A check that fails or hangs is an error: the caller
// must not treat the stage as gone.
func (n *Node[A]) stale(ctx context.Context, rec *StageRecord[A]) (string, error) {
	boot, err := bootID()
	if err != nil {
		return "", err
	}
	if rec.BootID != boot {
		return "the node rebooted since", nil
	}
	if err := n.stager.Check(ctx, rec); IsGone(err) {
		return err.Error(), nil
	} else if err != nil && !errors.Is(err, ErrCorruptRecord) {
		return "", status.Errorf(Code(err), "cannot tell whether volume %s is still mapped: %v", rec.VolumeID, err)
	}
	if !rec.Block {
		mnt, err := IsMountPoint(ctx, n.mounts, rec.StagingPath)
		if errors.Is(err, os.ErrNotExist) || (err == nil && !mnt) {
			return "the staging path is not mounted", nil
		}
		if err != nil {
			return "", status.Errorf(Code(err), "cannot tell whether volume %s is still mounted: %v", rec.VolumeID, err)
		}
	}
	return "", nil
}

// clearStale removes what a dead stage left: the staging mount and what the
// driver made (their device may be dead, so nothing is flushed). It fails
// rather than forget what it could not remove: staging again would map twice.
func (n *Node[A]) clearStale(ctx context.Context, rec *StageRecord[A]) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if !rec.Block {
		if err := mount.CleanupMountPoint(rec.StagingPath, n.mounts, true); err != nil {
			return status.Errorf(codes.Internal, "unmounting the stale staging path %s: %v", rec.StagingPath, err)
		}
	}
	if err := n.stager.Unstage(ctx, rec); err != nil {
		return status.Errorf(Code(err), "clearing the stale stage of volume %s: %v", rec.VolumeID, err)
	}
	var zero A
	rec.Attachment = zero
	return nil
}

// NodeStageVolume stages the volume with the driver's StageFunc, then
// records it staged and emits attach (once).
func (n *Node[A]) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	if err := n.stager.CheckVolumeID(req.GetVolumeId()); err != nil {
		return nil, err
	}
	staging := req.GetStagingTargetPath()
	if err := Required("staging_target_path", staging); err != nil {
		return nil, err
	}
	vc := req.GetVolumeCapability()
	if err := Capability(vc, n.check); err != nil {
		return nil, err
	}
	stage, err := n.stager.PrepareStage(ctx, req)
	if err != nil {
		return nil, err
	}
	rec, unlock, err := n.begin(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	want := n.newRecord(req.GetVolumeId(), staging, vc, req.GetVolumeContext())
	if rec != nil && rec.Staged {
		reason, err := n.stale(ctx, rec)
		if err != nil {
			return nil, err
		}
		if reason != "" {
			// Staged before a reboot or crash that took the mapping or mount
			// along: clear what is left of it and stage again.
			klog.InfoS("stage record is stale: staging again", "volumeID", rec.VolumeID, "reason", reason)
			if err := n.clearStale(ctx, rec); err != nil {
				return nil, err
			}
			rec.Staged = false
		}
	}
	if rec != nil && rec.Staged {
		if rec.StagingPath != staging {
			return nil, status.Errorf(codes.FailedPrecondition, "volume is already staged at %s", rec.StagingPath)
		}
		if rec.Block != want.Block || rec.ReadOnly != want.ReadOnly || (!rec.Block && rec.FsType != want.FsType) {
			return nil, status.Errorf(codes.AlreadyExists, "volume is already staged at %s with a different capability", staging)
		}
		return &csi.NodeStageVolumeResponse{}, nil
	}
	start := time.Now()
	if rec != nil {
		// A stage that crashed half way: keep what it made, redo the rest,
		// and remember an attach already announced (unstage owes its detach).
		want.Attachment = rec.Attachment
		want.Announced = rec.Announced
	}
	if want.BootID, err = bootID(); err != nil {
		return nil, err
	}
	var saved bool
	var saveErr error
	save := func() error {
		if saveErr = n.state.save(want); saveErr != nil {
			saveErr = status.Error(codes.Internal, saveErr.Error())
			return saveErr
		}
		saved = true
		return nil
	}
	logValues, err := stage(ctx, want, save)
	if err != nil {
		if saved && (saveErr == nil || !errors.Is(err, saveErr)) {
			n.undoStage(ctx, want)
		}
		return nil, err
	}
	// Record that attach is announced, then emit, then record success: a crash
	// in between repeats the event (at least once) rather than losing it, and
	// an unstage after it still emits ack and detach.
	want.Announced = true
	if err := n.state.save(want); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := n.emit(ctx, EventAttach, want, want.Context); err != nil {
		return nil, err // kubelet retries; the retry finds the mapping and mount and emits
	}
	CrashPoint("stage-after-attach")
	want.Staged = true
	if err := n.state.save(want); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	n.acks.start(want.VolumeID, want.Context, n.intervalFlush)
	klog.InfoS("volume staged", append(append([]any{"volumeID", req.GetVolumeId()}, logValues...), "total", time.Since(start))...)
	return &csi.NodeStageVolumeResponse{}, nil
}

func (n *Node[A]) newRecord(volumeID, staging string, vc *csi.VolumeCapability, volCtx map[string]string) *StageRecord[A] {
	r := &StageRecord[A]{
		VolumeID:    volumeID,
		StagingPath: staging,
		Block:       vc.GetBlock() != nil,
		ReadOnly:    isReadOnlyMode(vc),
		Mode:        vc.GetAccessMode().GetMode().String(),
		Context:     volCtx,
		WorkDir:     n.state.workDir(volumeID),
	}
	if !r.Block {
		r.FsType = vc.GetMount().GetFsType()
		if r.FsType == "" {
			r.FsType = volCtx[KeyFsType]
		}
		if r.FsType == "" {
			r.FsType = n.defaultFsType
		}
	}
	return r
}

func isReadOnlyMode(vc *csi.VolumeCapability) bool {
	switch vc.GetAccessMode().GetMode() {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		return true
	}
	return false
}

// undoStage releases what a failed stage made, logging what it cannot. An
// attach announced by this or an earlier try gets its ack and detach.
func (n *Node[A]) undoStage(ctx context.Context, rec *StageRecord[A]) {
	if err := n.teardown(ctx, rec, rec.Announced); err != nil {
		klog.ErrorS(err, "cleaning up a failed stage; NodeUnstageVolume will retry", "volumeID", rec.VolumeID)
	}
}

// NodeUnstageVolume flushes and unmounts the volume and has the driver undo its stage.
func (n *Node[A]) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if err := Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	staging := req.GetStagingTargetPath()
	if err := Required("staging_target_path", staging); err != nil {
		return nil, err
	}
	rec, unlock, err := n.begin(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec == nil {
		// Nothing recorded: at most a stray mount is left to remove.
		if err := mount.CleanupMountPoint(staging, n.mounts, true); err != nil {
			return nil, status.Errorf(codes.Internal, "unmounting %s: %v", staging, err)
		}
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	if rec.StagingPath != staging {
		return nil, status.Errorf(codes.InvalidArgument, "volume is staged at %s, not %s", rec.StagingPath, staging)
	}
	start := time.Now()
	n.acks.stop(rec.VolumeID)
	if err := n.teardown(ctx, rec, rec.Staged || rec.Announced); err != nil {
		return nil, err
	}
	klog.InfoS("volume unstaged", "volumeID", req.GetVolumeId(), "duration", time.Since(start))
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// teardown flushes (emitting ack), unmounts, has the driver unstage (emitting
// detach) and forgets the volume. The record goes last, so a crash anywhere
// is retried from the start; the ack is emitted once per staging (the record
// says it was), so only a crash between an event and the record's update
// repeats one. It runs to its end (within cleanupTimeout) even if ctx has
// ended: a clean-up cut short half way would leave a mapping behind.
func (n *Node[A]) teardown(ctx context.Context, rec *StageRecord[A], events bool) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if !events || !rec.UnstageAcked {
		ack, err := n.flush(ctx, rec)
		if err != nil && !errors.Is(err, ErrNothingToFlush) {
			// A flush through a mapping or mount that died (its FUSE daemon
			// killed) fails for ever: what it held is lost, and the volume
			// must still go.
			if reason, serr := n.stale(ctx, rec); serr == nil && reason != "" {
				klog.ErrorS(err, "flush failed on a volume whose stage is gone: what it had not flushed is lost",
					"volumeID", rec.VolumeID, "reason", reason)
				err = ErrNothingToFlush
			}
		}
		if errors.Is(err, ErrNothingToFlush) {
			// The mount or device is already gone: nothing of it is cached here.
			ack, err = n.ackEvent(rec, 0), nil
			ack.NothingFlushed = true
		}
		if err != nil {
			return status.Errorf(Code(err), "flushing volume %s: %v", rec.VolumeID, err)
		}
		if events { // detach always follows the ack of the last flush
			ack.Trigger = TriggerUnstage
			if _, err := n.events.VolumeEvent(ctx, ack); err != nil {
				return err
			}
			rec.UnstageAcked = true
			if err := n.state.save(rec); err != nil {
				return status.Error(codes.Internal, err.Error())
			}
			CrashPoint("unstage-after-ack")
		}
	}
	if !rec.Block {
		if err := mount.CleanupMountPoint(rec.StagingPath, n.mounts, true); err != nil {
			return status.Errorf(codes.Internal, "unmounting %s: %v", rec.StagingPath, err)
		}
	}
	if err := n.stager.Unstage(ctx, rec); err != nil {
		return status.Errorf(Code(err), "%v", err)
	}
	if events {
		PausePoint("unstage-before-detach")
		if err := n.emit(ctx, EventDetach, rec, rec.Context); err != nil {
			return err
		}
	}
	if err := n.state.remove(rec.VolumeID); err != nil {
		return status.Errorf(codes.Internal, "removing stage record: %v", err)
	}
	return nil
}

// emit records a volume event; an error (Unavailable) fails the CSI call.
func (n *Node[A]) emit(ctx context.Context, kind string, rec *StageRecord[A], volCtx map[string]string) error {
	ev := VolumeEvent{
		Kind: kind, VolumeID: rec.VolumeID, VolumeContext: volCtx,
		AccessType: accessType(rec.Block), FsType: rec.FsType, ReadOnly: rec.ReadOnly,
	}
	if kind == EventExpand {
		ev.SizeBytes = rec.Size
	}
	_, err := n.events.VolumeEvent(ctx, ev)
	return err
}

// errNotStaged is the error for calls on a volume this node has not staged.
func errNotStaged(volumeID string) error {
	return status.Errorf(codes.NotFound, "volume %s is not staged on this node", volumeID)
}
