package rbd

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Node serves the CSI Node service for RBD images: the shared node skeleton
// (rcsi.Node) around this package's stager, which maps an image with a
// Mounter, makes a filesystem on a blank device and mounts it.
type Node struct {
	*rcsi.Node[Mapping]
}

// stager is RBD's rcsi.Stager: the Mapping is the stage record's attachment.
type stager struct {
	nodeID         string
	clusters       *rcsi.Clusters
	mounters       map[string]Mounter
	defaultMounter string
	mounts         *mount.SafeFormatAndMount
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
	// Daemons, if set, is where rbd-fuse daemons go so they outlive the node
	// plugin's container; nil: they stay in the plugin's cgroup.
	Daemons *rcsi.DaemonCgroup
}

// NewNode builds the node service with all three mounters.
func NewNode(cfg NodeConfig) (*Node, error) {
	def, err := ParseMounterName(cfg.DefaultMounter)
	if err != nil {
		return nil, err
	}
	mounts := &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}
	// rbd-nbd's short-lived key files (tmpfs, one directory per state directory).
	sum := sha256.Sum256([]byte(cfg.StateDir))
	tmpfsKeys := filepath.Join(tmpfsKeyRoot, "rookzmq-keys-"+hex.EncodeToString(sum[:6]))
	s := &stager{
		nodeID:   cfg.NodeID,
		clusters: cfg.Clusters,
		mounters: map[string]Mounter{
			MounterKRBD: newKRBD(),
			MounterNBD:  newNBD(tmpfsKeys),
			MounterFuse: &fuseMounter{mounts: mounts, daemons: cfg.Daemons},
		},
		defaultMounter: def,
		mounts:         mounts,
		conns:          cfg.Conns,
	}
	if s.conns == nil {
		s.conns = &rcsi.Conns{}
	}
	n, err := rcsi.NewNode(rcsi.NodeConfig{
		NodeID: cfg.NodeID, StateDir: cfg.StateDir, Events: cfg.Events, Mounts: mounts,
		CheckCapability: checkCapability, DefaultFsType: DefaultFsType,
	}, rcsi.Stager[Mapping](s))
	if err != nil {
		return nil, err
	}
	// Versions before 0.2 wrote short-lived key files here (keys now go to
	// tools as memfds): clear any a crash left behind.
	os.RemoveAll(filepath.Join(cfg.StateDir, "keys"))
	// Nor may rbd-nbd's, on tmpfs.
	os.RemoveAll(tmpfsKeys)
	return &Node{Node: n}, nil
}

// tmpfsKeyRoot holds the directories of short-lived key files (tmpfs).
const tmpfsKeyRoot = "/dev/shm"

// CheckVolumeID parses the volume ID (ours or ceph-csi's).
func (s *stager) CheckVolumeID(volumeID string) error {
	_, _, err := parseHandle(volumeID, false)
	return err
}

// PrepareStage checks the filesystem, secrets, cluster and mounter of a
// stage request and returns the stage: map the image, then (mount volumes)
// make a filesystem on a blank device and mount it at the staging path.
func (s *stager) PrepareStage(_ context.Context, req *csi.NodeStageVolumeRequest) (rcsi.StageFunc[Mapping], error) {
	id, cephID, err := parseHandle(req.GetVolumeId(), false)
	if err != nil {
		return nil, err
	}
	vc := req.GetVolumeCapability()
	if fs := req.GetVolumeContext()[ctxFsType]; fs != "" && vc.GetMount() != nil {
		if err := CheckFsType(fs); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "volume_context %s: %v", ctxFsType, err)
		}
	}
	creds, err := rcsi.CredentialsFromSecrets(req.GetSecrets(), SecretUserID, SecretUserKey)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cluster, err := s.clusters.Get(id.ClusterID)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	mounterName, err := ParseMounterName(req.GetVolumeContext()[ParamMounter])
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if req.GetVolumeContext()[ParamMounter] == "" {
		mounterName = s.defaultMounter
	}
	mounter := s.mounters[mounterName]
	return func(ctx context.Context, rec *rcsi.StageRecord[Mapping], save func() error) ([]any, error) {
		if err := mounter.Available(); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "mounter %s cannot work on node %s: %v", mounterName, s.nodeID, err)
		}
		if cephID != nil {
			if id, err = s.resolveForStage(ctx, *cephID, cluster, creds); err != nil {
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
		rec.Attachment.Mounter = mounterName
		if err := save(); err != nil {
			return nil, err
		}
		spec := ImageSpec{Pool: id.Pool, Namespace: id.Namespace, Image: id.Name, Monitors: cluster.MonHost(), Creds: creds, ReadOnly: rec.ReadOnly}
		m, err := mounter.Map(ctx, spec, rec.WorkDir)
		rec.Attachment = m // on failure: what the failed map made, for the clean-up
		if err != nil {
			return nil, status.Errorf(rcsi.Code(err), "mapping %s/%s with %s: %v", id.Pool, id.Name, mounterName, err)
		}
		if err := save(); err != nil {
			return nil, err
		}
		mapped := time.Since(start)
		if !rec.Block {
			if err := s.mountStaging(ctx, rec, vc.GetMount().GetMountFlags()); err != nil {
				return nil, err
			}
		}
		return []any{"mounter", mounterName, "device", m.Device, "map", mapped}, nil
	}, nil
}

// mountStaging makes a filesystem if the device is blank and mounts it.
func (s *stager) mountStaging(ctx context.Context, rec *rcsi.StageRecord[Mapping], flags []string) error {
	if err := os.MkdirAll(rec.StagingPath, 0o750); err != nil {
		return status.Errorf(codes.Internal, "creating staging path: %v", err)
	}
	notMnt, err := rcsi.IsLikelyNotMountPoint(ctx, s.mounts, rec.StagingPath)
	if err != nil {
		return status.Errorf(rcsi.Code(err), "checking staging path: %v", err)
	}
	if !notMnt {
		return nil // a retry after the mount succeeded
	}
	opts := rcsi.MountOptions(flags, rec.ReadOnly)
	if rec.ReadOnly {
		if rec.FsType == "ext4" {
			opts = append(opts, "noload") // no journal replay on a read-only device
		}
	}
	dev := rec.Attachment.Device
	start := time.Now()
	if err := s.mounts.FormatAndMount(dev, rec.StagingPath, rec.FsType, opts); err != nil {
		return status.Errorf(codes.Internal, "formatting and mounting %s (%s) at %s: %v", dev, rec.FsType, rec.StagingPath, err)
	}
	klog.V(3).InfoS("filesystem mounted", "device", dev, "fsType", rec.FsType, "path", rec.StagingPath, "duration", time.Since(start))
	return nil
}
