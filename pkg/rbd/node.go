package rbd

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Node serves the CSI Node service for RBD images.
type Node struct {
	csi.UnimplementedNodeServer
	nodeID         string
	clusters       *rcsi.Clusters
	mounters       map[string]Mounter
	defaultMounter string
	mounts         *mount.SafeFormatAndMount
	state          stateStore
	events         rcsi.EventSink
	locks          rcsi.KeyLocks
	acks           ackTimers
	// conns reaches Ceph to resolve ceph-csi volume IDs (cephcsi.go).
	conns *rcsi.Conns
}

// NodeConfig configures NewNode.
type NodeConfig struct {
	NodeID         string
	Clusters       *rcsi.Clusters
	DefaultMounter string
	// StateDir holds stage records and rbd-fuse mount points; it must survive
	// a restart of the driver (a host path).
	StateDir string
	Events   rcsi.EventSink
	// Conns caches Ceph connections (for ceph-csi volume IDs); nil: a private cache.
	Conns *rcsi.Conns
}

// NewNode builds the node service with all three mounters.
func NewNode(cfg NodeConfig) (*Node, error) {
	def, err := ParseMounterName(cfg.DefaultMounter)
	if err != nil {
		return nil, err
	}
	if cfg.NodeID == "" {
		return nil, errors.New("node ID is required")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	// Versions before 0.2 wrote short-lived key files here (keys now go to
	// tools as memfds): clear any a crash left behind.
	os.RemoveAll(filepath.Join(cfg.StateDir, "keys"))
	// rbd-nbd's short-lived key files (tmpfs, one directory per state
	// directory): clear any a crash left behind.
	sum := sha256.Sum256([]byte(cfg.StateDir))
	tmpfsKeys := filepath.Join(tmpfsKeyRoot, "rookzmq-keys-"+hex.EncodeToString(sum[:6]))
	os.RemoveAll(tmpfsKeys)
	mounts := &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}
	events := cfg.Events
	if events == nil {
		events = rcsi.NoEvents{}
	}
	n := &Node{
		nodeID:   cfg.NodeID,
		clusters: cfg.Clusters,
		mounters: map[string]Mounter{
			MounterKRBD: newKRBD(),
			MounterNBD:  newNBD(tmpfsKeys),
			MounterFuse: &fuseMounter{mounts: mounts},
		},
		defaultMounter: def,
		mounts:         mounts,
		state:          stateStore{dir: cfg.StateDir},
		events:         events,
		conns:          cfg.Conns,
	}
	if n.conns == nil {
		n.conns = &rcsi.Conns{}
	}
	return n, nil
}

// lock serialises calls for one volume on this node.
func (n *Node) lock(ctx context.Context, volumeID string) (func(), error) {
	unlock, err := n.locks.Lock(ctx, volumeID)
	if err != nil {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %q is already in progress", volumeID)
	}
	return unlock, nil
}

// tmpfsKeyRoot holds the directories of short-lived key files (tmpfs).
const tmpfsKeyRoot = "/dev/shm"

// cleanupTimeout bounds a clean-up (teardown, undoing a failed stage), which
// runs to its end even when the call's own deadline has passed.
const cleanupTimeout = 2 * time.Minute

// stale says why a staged record no longer describes the node ("" if it
// does). Only positive evidence makes a stage stale: another boot ID, the
// image missing from a successful device listing, the FUSE mount answering
// ENOTCONN or ECONNABORTED, the staging path missing from the mount table.
// A check that fails or hangs is an error: the caller must not treat the
// stage as gone.
func (n *Node) stale(ctx context.Context, rec *stageRecord) (string, error) {
	boot, err := bootID()
	if err != nil {
		return "", err
	}
	if rec.BootID != boot {
		return "the node rebooted since", nil
	}
	if m := n.mounters[rec.Mounter]; m != nil {
		if err := m.Check(ctx, rec.Mapping); isGone(err) {
			return err.Error(), nil
		} else if err != nil {
			return "", status.Errorf(rcsi.Code(err), "cannot tell whether volume %s is still mapped: %v", rec.VolumeID, err)
		}
	}
	if !rec.Block {
		mnt, err := isMountPoint(ctx, n.mounts, rec.StagingPath)
		if errors.Is(err, os.ErrNotExist) || (err == nil && !mnt) {
			return "the staging path is not mounted", nil
		}
		if err != nil {
			return "", status.Errorf(rcsi.Code(err), "cannot tell whether volume %s is still mounted: %v", rec.VolumeID, err)
		}
	}
	return "", nil
}

// clearStale removes what a dead stage left: the staging mount and the
// mapping (their device may be dead, so nothing is flushed). It fails rather
// than forget a mapping it could not remove: staging again would map twice.
func (n *Node) clearStale(ctx context.Context, rec *stageRecord) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if !rec.Block {
		if err := mount.CleanupMountPoint(rec.StagingPath, n.mounts, true); err != nil {
			return status.Errorf(codes.Internal, "unmounting the stale staging path %s: %v", rec.StagingPath, err)
		}
	}
	if m := n.mounters[rec.Mounter]; m != nil {
		if err := m.Unmap(ctx, rec.Mapping); err != nil {
			return status.Errorf(rcsi.Code(err), "unmapping the stale mapping of volume %s: %v", rec.VolumeID, err)
		}
	}
	rec.Mapping = Mapping{}
	return nil
}

// begin locks a volume for one call and loads its stage record (nil if it
// has none); the caller defers unlock.
func (n *Node) begin(ctx context.Context, volumeID string) (*stageRecord, func(), error) {
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

// NodeStageVolume maps the image, makes a filesystem on a blank device and mounts
// it at the staging path (block volumes keep just the device).
func (n *Node) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, cephID, err := parseHandle(req.GetVolumeId(), false)
	if err != nil {
		return nil, err
	}
	staging := req.GetStagingTargetPath()
	if err := rcsi.Required("staging_target_path", staging); err != nil {
		return nil, err
	}
	vc := req.GetVolumeCapability()
	if err := rcsi.Capability(vc, checkCapability); err != nil {
		return nil, err
	}
	if fs := req.GetVolumeContext()[ctxFsType]; fs != "" && vc.GetMount() != nil {
		if err := CheckFsType(fs); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "volume_context %s: %v", ctxFsType, err)
		}
	}
	creds, err := rcsi.CredentialsFromSecrets(req.GetSecrets(), SecretUserID, SecretUserKey)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cluster, err := n.clusters.Get(id.ClusterID)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	mounterName, err := ParseMounterName(req.GetVolumeContext()[ParamMounter])
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if req.GetVolumeContext()[ParamMounter] == "" {
		mounterName = n.defaultMounter
	}
	mounter := n.mounters[mounterName]
	rec, unlock, err := n.begin(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	want := newRecord(req.GetVolumeId(), staging, vc, req.GetVolumeContext())
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
	if err := mounter.Available(); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "mounter %s cannot work on node %s: %v", mounterName, n.nodeID, err)
	}
	if cephID != nil {
		if id, err = n.resolveForStage(ctx, *cephID, cluster, creds); err != nil {
			return nil, err
		}
		// What ceph-csi's journal says reaches tools' command lines too.
		for _, f := range [][2]string{{"pool", id.Pool}, {"namespace", id.Namespace}, {"image", id.Name}} {
			if err := rcsi.CheckName(f[0], f[1]); err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "ceph-csi volume %s: %v", req.GetVolumeId(), err)
			}
		}
	}
	start := time.Now()
	if rec != nil {
		// A stage that crashed half way: keep what it mapped, redo the rest,
		// and remember an attach already announced (unstage owes its detach).
		want.Mapping = rec.Mapping
		want.Announced = rec.Announced
	}
	want.Mounter = mounterName
	if want.BootID, err = bootID(); err != nil {
		return nil, err
	}
	if err := n.state.save(want); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	spec := ImageSpec{Pool: id.Pool, Namespace: id.Namespace, Image: id.Name, Monitors: cluster.MonHost(), Creds: creds, ReadOnly: want.ReadOnly}
	m, err := mounter.Map(ctx, spec, n.state.workDir(req.GetVolumeId()))
	if err != nil {
		want.Mapping = m // what the failed map made, for the clean-up
		n.undoStage(ctx, want)
		return nil, status.Errorf(rcsi.Code(err), "mapping %s/%s with %s: %v", id.Pool, id.Name, mounterName, err)
	}
	want.Mapping = m
	if err := n.state.save(want); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	mapped := time.Since(start)
	if !want.Block {
		if err := n.mountStaging(ctx, want, vc.GetMount().GetMountFlags()); err != nil {
			n.undoStage(ctx, want)
			return nil, err
		}
	}
	// Record that attach is announced, then emit, then record success: a crash
	// in between repeats the event (at least once) rather than losing it, and
	// an unstage after it still emits ack and detach.
	want.Announced = true
	if err := n.state.save(want); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := n.emit(ctx, rcsi.EventAttach, want, want.Context); err != nil {
		return nil, err // kubelet retries; the retry finds the mapping and mount and emits
	}
	rcsi.CrashPoint("stage-after-attach")
	want.Staged = true
	if err := n.state.save(want); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	n.acks.start(n, want)
	klog.InfoS("volume staged", "volumeID", req.GetVolumeId(), "mounter", mounterName, "device", m.Device,
		"map", mapped, "total", time.Since(start))
	return &csi.NodeStageVolumeResponse{}, nil
}

func newRecord(volumeID, staging string, vc *csi.VolumeCapability, volCtx map[string]string) *stageRecord {
	r := &stageRecord{
		VolumeID:    volumeID,
		StagingPath: staging,
		Block:       vc.GetBlock() != nil,
		ReadOnly:    isReadOnlyMode(vc),
		Mode:        vc.GetAccessMode().GetMode().String(),
		Context:     volCtx,
	}
	if !r.Block {
		r.FsType = vc.GetMount().GetFsType()
		if r.FsType == "" {
			r.FsType = volCtx[ctxFsType]
		}
		if r.FsType == "" {
			r.FsType = DefaultFsType
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

// mountStaging makes a filesystem if the device is blank and mounts it.
func (n *Node) mountStaging(ctx context.Context, rec *stageRecord, flags []string) error {
	if err := os.MkdirAll(rec.StagingPath, 0o750); err != nil {
		return status.Errorf(codes.Internal, "creating staging path: %v", err)
	}
	notMnt, err := isLikelyNotMountPoint(ctx, n.mounts, rec.StagingPath)
	if err != nil {
		return status.Errorf(rcsi.Code(err), "checking staging path: %v", err)
	}
	if !notMnt {
		return nil // a retry after the mount succeeded
	}
	opts := mountOptions(flags, rec.ReadOnly)
	if rec.ReadOnly {
		if rec.FsType == "ext4" {
			opts = append(opts, "noload") // no journal replay on a read-only device
		}
	}
	start := time.Now()
	if err := n.mounts.FormatAndMount(rec.Device, rec.StagingPath, rec.FsType, opts); err != nil {
		return status.Errorf(codes.Internal, "formatting and mounting %s (%s) at %s: %v", rec.Device, rec.FsType, rec.StagingPath, err)
	}
	klog.V(3).InfoS("filesystem mounted", "device", rec.Device, "fsType", rec.FsType, "path", rec.StagingPath, "duration", time.Since(start))
	return nil
}

// mountOptions puts "ro" last, after the caller's flags, so that no "rw"
// among them can make a read-only mount writable.
func mountOptions(flags []string, readOnly bool) []string {
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

// undoStage releases what a failed stage made, logging what it cannot. An
// attach announced by this or an earlier try gets its ack and detach.
func (n *Node) undoStage(ctx context.Context, rec *stageRecord) {
	if err := n.teardown(ctx, rec, rec.Announced); err != nil {
		klog.ErrorS(err, "cleaning up a failed stage; NodeUnstageVolume will retry", "volumeID", rec.VolumeID)
	}
}

// NodeUnstageVolume flushes and unmounts the filesystem and unmaps the image.
func (n *Node) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	staging := req.GetStagingTargetPath()
	if err := rcsi.Required("staging_target_path", staging); err != nil {
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

// teardown flushes (emitting ack), unmounts, unmaps (emitting detach) and
// forgets the volume. The record goes last, so a crash anywhere is retried
// from the start; the ack is emitted once per staging (the record says it
// was), so only a crash between an event and the record's update repeats one.
// It runs to its end (within cleanupTimeout) even if ctx has ended: a
// clean-up cut short half way would leave a mapping behind.
func (n *Node) teardown(ctx context.Context, rec *stageRecord, events bool) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if !events || !rec.UnstageAcked {
		ack, err := n.flush(ctx, rec)
		if errors.Is(err, errNothingToFlush) {
			// The mount or device is already gone: nothing of it is cached here.
			ack, err = n.ackEvent(rec, 0), nil
			ack.NothingFlushed = true
		}
		if err != nil {
			return status.Errorf(rcsi.Code(err), "flushing volume %s: %v", rec.VolumeID, err)
		}
		if events { // detach always follows the ack of the last flush
			ack.Trigger = rcsi.TriggerUnstage
			if _, err := n.events.VolumeEvent(ctx, ack); err != nil {
				return err
			}
			rec.UnstageAcked = true
			if err := n.state.save(rec); err != nil {
				return status.Error(codes.Internal, err.Error())
			}
			rcsi.CrashPoint("unstage-after-ack")
		}
	}
	if !rec.Block {
		if err := mount.CleanupMountPoint(rec.StagingPath, n.mounts, true); err != nil {
			return status.Errorf(codes.Internal, "unmounting %s: %v", rec.StagingPath, err)
		}
	}
	if m := n.mounters[rec.Mounter]; m != nil {
		if err := m.Unmap(ctx, rec.Mapping); err != nil {
			return status.Errorf(rcsi.Code(err), "unmapping %s: %v", rec.Device, err)
		}
	}
	if events {
		rcsi.PausePoint("unstage-before-detach")
		if err := n.emit(ctx, rcsi.EventDetach, rec, rec.Context); err != nil {
			return err
		}
	}
	if err := n.state.remove(rec.VolumeID); err != nil {
		return status.Errorf(codes.Internal, "removing stage record: %v", err)
	}
	return nil
}

// syncFS flushes the filesystem mounted at path (syncfs(2)).
func syncFS(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
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

// emit records a volume event; an error (Unavailable) fails the CSI call.
func (n *Node) emit(ctx context.Context, kind string, rec *stageRecord, volCtx map[string]string) error {
	ev := rcsi.VolumeEvent{
		Kind: kind, VolumeID: rec.VolumeID, VolumeContext: volCtx,
		AccessType: accessType(rec), FsType: rec.FsType, ReadOnly: rec.ReadOnly,
	}
	if kind == rcsi.EventExpand {
		ev.SizeBytes = rec.Size
	}
	_, err := n.events.VolumeEvent(ctx, ev)
	return err
}

// errNotStaged is the error for calls on a volume this node has not staged.
func errNotStaged(volumeID string) error {
	return status.Errorf(codes.NotFound, "volume %s is not staged on this node", volumeID)
}
