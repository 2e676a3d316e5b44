package cephfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Node serves the CSI Node service for CephFS subvolumes: the shared node
// skeleton (rcsi.Node) around this package's stager, which mounts a
// subvolume once per node at the staging path with a Mounter (ceph-fuse or
// the kernel client); the skeleton bind-mounts it into each pod.
type Node struct {
	*rcsi.Node[Mount]
}

// Mount is the CephFS part of a stage record: what is mounted at the staging
// path and how to mount it again (a restarted driver remounts a mount whose
// ceph-fuse died). Its fields sit beside the record's own in the JSON.
type Mount struct {
	Mounter   string `json:"mounter,omitempty"`
	ClusterID string `json:"clusterID,omitempty"`
	FsName    string `json:"fsName,omitempty"`
	// Path is the subvolume's path in the file system (the mount's root).
	Path   string `json:"subvolumePath,omitempty"`
	UserID string `json:"userID,omitempty"`
	// Options are the StorageClass's fuseMountOptions or kernelMountOptions.
	Options string `json:"mountOptions,omitempty"`
	// Keyring says the user's key is kept in the volume's work directory
	// (a 0600 keyring file, removed at unstage) for remounting.
	Keyring bool `json:"keyring,omitempty"`
}

// NodeConfig configures NewNode.
type NodeConfig struct {
	NodeID   string
	Clusters *rcsi.Clusters
	// DefaultMounter serves volumes whose StorageClass names no mounter
	// ("" is MounterFuse).
	DefaultMounter string
	// StateDir holds stage records and the keyring files of staged volumes;
	// it must survive a restart of the driver (a host path).
	StateDir string
	Events   rcsi.EventSink
	// Mounts reaches the file system to find a subvolume's path when the
	// volume context lacks it (nil: a private cache on Conns).
	Mounts *Mounts
	// Conns caches Ceph connections for Mounts (nil: a private cache).
	Conns *rcsi.Conns
	// Daemons, if set, is where ceph-fuse daemons go so they outlive the
	// node plugin's container; nil: they stay in the plugin's cgroup.
	Daemons *rcsi.DaemonCgroup
}

// stager is CephFS's rcsi.Stager (and Remounter, Keeper, UsageReporter).
type stager struct {
	nodeID         string
	clusters       *rcsi.Clusters
	mounters       map[string]Mounter
	defaultMounter string
	mounts         *Mounts
}

// NewNode builds the node service with both mounters.
func NewNode(cfg NodeConfig) (*Node, error) {
	def, err := ParseMounterName(cfg.DefaultMounter)
	if err != nil {
		return nil, err
	}
	if def == "" {
		def = MounterFuse
	}
	s := &stager{
		nodeID:         cfg.NodeID,
		clusters:       cfg.Clusters,
		mounters:       map[string]Mounter{MounterFuse: &fuseMounter{daemons: cfg.Daemons}, MounterKernel: &kernelMounter{}},
		defaultMounter: def,
		mounts:         cfg.Mounts,
	}
	if s.mounts == nil {
		conns := cfg.Conns
		if conns == nil {
			conns = &rcsi.Conns{}
		}
		s.mounts = &Mounts{Conns: conns}
	}
	n, err := rcsi.NewNode(rcsi.NodeConfig{
		NodeID: cfg.NodeID, StateDir: cfg.StateDir, Events: cfg.Events,
		CheckCapability: checkCapability, DefaultFsType: FsTypeCephFS,
		Capabilities: []csi.NodeServiceCapability_RPC_Type{
			csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
			csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
			csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
			csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
			// Kubelet calls NodeExpandVolume after a growth only if the
			// node says it expands: it emits the expand event.
			csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		},
	}, rcsi.Stager[Mount](s))
	if err != nil {
		return nil, err
	}
	return &Node{Node: n}, nil
}

// FsTypeCephFS is the filesystem a CephFS volume's record and events name when
// the capability names none.
const FsTypeCephFS = "cephfs"

// CheckVolumeID parses the volume ID (the controller's: cluster, file system,
// group, subvolume).
func (s *stager) CheckVolumeID(volumeID string) error {
	_, err := rcsi.VolumeIDArg(volumeID, false)
	return err
}

// mountCredentials are the secrets' userID/userKey, or adminID/adminKey when
// neither user secret is there (as ceph-csi falls back).
func mountCredentials(secrets map[string]string) (rcsi.Credentials, error) {
	creds, err := rcsi.CredentialsFromSecrets(secrets, SecretUserID, SecretUserKey)
	if err != nil && secrets[SecretUserID] == "" && secrets[SecretUserKey] == "" {
		if admin, aerr := rcsi.CredentialsFromSecrets(secrets, SecretAdminID, SecretAdminKey); aerr == nil {
			return admin, nil
		} else if secrets[SecretAdminID] != "" || secrets[SecretAdminKey] != "" {
			return admin, aerr
		}
		return creds, fmt.Errorf("missing secrets %s and %s (or %s and %s)", SecretUserID, SecretUserKey, SecretAdminID, SecretAdminKey)
	}
	return creds, err
}

// PrepareStage checks the secrets, cluster, mounter, mount options and
// subvolume path of a stage request and returns the stage: keep the key for
// remounting, then mount the subvolume at the staging path.
func (s *stager) PrepareStage(_ context.Context, req *csi.NodeStageVolumeRequest) (rcsi.StageFunc[Mount], error) {
	id, err := rcsi.VolumeIDArg(req.GetVolumeId(), false)
	if err != nil {
		return nil, err
	}
	vc := req.GetVolumeContext()
	creds, err := mountCredentials(req.GetSecrets())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cluster, err := s.clusters.Get(id.ClusterID)
	if errors.Is(err, rcsi.ErrUnknownCluster) {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	} else if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	mounterName, err := ParseMounterName(vc[ParamMounter])
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "volume_context %s: %v", ParamMounter, err)
	}
	if mounterName == "" {
		mounterName = s.defaultMounter
	}
	mounter := s.mounters[mounterName]
	options := vc[ParamFuseMountOptions]
	if mounterName == MounterKernel {
		options = vc[ParamKernelMountOptions]
	}
	if err := checkMountOptions(mounterName, options); err != nil {
		return nil, err
	}
	path := vc[ctxSubvolumePath]
	if path != "" {
		if err := checkSubvolumePath(id, path); err != nil {
			return nil, err
		}
	}
	return func(ctx context.Context, rec *rcsi.StageRecord[Mount], save func() error) ([]any, error) {
		if err := mounter.Available(); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "mounter %s cannot work on node %s: %v", mounterName, s.nodeID, err)
		}
		start := time.Now()
		if path == "" {
			// A volume context without the path (a static or an older PV):
			// read it from the subvolume's metadata with the mount user.
			if path, err = s.resolvePath(ctx, cluster, creds, id); err != nil {
				return nil, err
			}
		}
		rec.Attachment = Mount{Mounter: mounterName, ClusterID: id.ClusterID, FsName: id.Pool, Path: path,
			UserID: creds.ID, Options: options, Keyring: true}
		// The record first (unstage then knows to remove the keyring), then the key.
		if err := save(); err != nil {
			return nil, err
		}
		if err := writeKeyring(rec.WorkDir, creds); err != nil {
			return nil, status.Errorf(codes.Internal, "keeping the key of volume %s for remounts: %v", rec.VolumeID, err)
		}
		rcsi.CrashPoint("cephfs-stage-after-keyring")
		spec := MountSpec{Monitors: cluster.Monitors, FsName: id.Pool, Path: path, Creds: creds, Options: options, ReadOnly: rec.ReadOnly}
		if err := mounter.Mount(ctx, rec.StagingPath, spec); err != nil {
			return nil, status.Errorf(rcsi.Code(err), "mounting subvolume %s of %s with %s: %v", path, id.Pool, mounterName, creds.Redact(err.Error()))
		}
		return []any{"mounter", mounterName, "subvolumePath", path, "mount", time.Since(start)}, nil
	}, nil
}

// checkMountOptions checks a volume context's mount options without mounting.
func checkMountOptions(mounter, options string) error {
	var err error
	if mounter == MounterKernel {
		_, err = parseKernelOptions(options, false)
	} else {
		_, err = parseFuseOptions(options, false)
	}
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "volume_context: %v", err)
	}
	return nil
}

// checkSubvolumePath accepts only a path inside the volume ID's own
// subvolume (/volumes/<group>/<name>/...): a volume context cannot make the
// node mount another directory of the file system under this volume's name.
func checkSubvolumePath(id rcsi.VolumeID, path string) error {
	base := volumesRoot + "/" + id.Namespace + "/" + id.Name + "/"
	if !strings.HasPrefix(path, base) || filepath.Clean(path) != path || strings.ContainsAny(path, ",\n\r\x00") {
		return status.Errorf(codes.InvalidArgument, "volume_context %s=%q is not a directory of subvolume %s (%s...)", ctxSubvolumePath, path, id.Name, base)
	}
	return nil
}

// resolvePath reads the subvolume's path from its metadata through a
// libcephfs mount (rooted at /volumes) as the mount user.
func (s *stager) resolvePath(ctx context.Context, cluster rcsi.ClusterConfig, creds rcsi.Credentials, id rcsi.VolumeID) (string, error) {
	m, err := s.mounts.Mount(ctx, cluster, creds, id.Pool)
	if err != nil {
		return "", cephStatus(err, "mounting file system %q to find subvolume %s", id.Pool, id.Name)
	}
	defer m.Release()
	svs := &subvolumes{mnt: m.Mnt, group: id.Namespace}
	sv, err := svs.Get(id.Name)
	if rcsi.Errno(err) == syscall.ENOENT {
		return "", status.Errorf(codes.NotFound, "volume %s: subvolume %s does not exist in group %s", id.String(), id.Name, id.Namespace)
	} else if err != nil {
		return "", cephStatus(m.Check(err), "reading subvolume %s", id.Name)
	}
	if sv.State != stateComplete {
		return "", status.Errorf(codes.FailedPrecondition, "subvolume %s is in state %q", id.Name, sv.State)
	}
	if err := checkSubvolumePath(id, sv.Path); err != nil {
		return "", status.Errorf(codes.Internal, "subvolume %s names path %q outside itself", id.Name, sv.Path)
	}
	return sv.Path, nil
}

// keyringFile is the name of a staged volume's keyring in its work directory.
const keyringFile = "keyring"

// writeKeyring keeps creds in a 0600 keyring file in dir (0700), written
// atomically and durably: a restarted driver remounts a lost ceph-fuse mount
// with it, without a CSI call. Unstage removes it.
func writeKeyring(dir string, creds rcsi.Credentials) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	path := filepath.Join(dir, keyringFile)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(f, "[client.%s]\n\tkey = %s\n", creds.ID, creds.Key)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// readKeyring reads back the key writeKeyring kept for user.
func readKeyring(dir, user string) (rcsi.Credentials, error) {
	b, err := os.ReadFile(filepath.Join(dir, keyringFile))
	if err != nil {
		return rcsi.Credentials{}, err
	}
	section := "[client." + user + "]"
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "[") {
			in = line == section
			continue
		}
		if k, v, ok := strings.Cut(line, "="); in && ok && strings.TrimSpace(k) == "key" {
			return rcsi.Credentials{ID: user, Key: strings.TrimSpace(v)}, nil
		}
	}
	return rcsi.Credentials{}, fmt.Errorf("the keyring in %s holds no key of client.%s", dir, user)
}
