package cephfs

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/cephfs/admin"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Secret names in CSI requests (ceph-csi's): the admin pair provisions, the
// user pair mounts.
const (
	SecretAdminID  = "adminID"
	SecretAdminKey = "adminKey"
	SecretUserID   = "userID"
	SecretUserKey  = "userKey"
)

// DefaultSubvolumeGroup is the group used when the clusters file names none.
const DefaultSubvolumeGroup = "csi"

// Controller serves the CSI Controller service for CephFS subvolumes.
type Controller struct {
	csi.UnimplementedControllerServer
	Clusters *rcsi.Clusters
	Conns    *rcsi.Conns
	Mounts   *Mounts
	// Known remembers credentials per cluster for calls that carry none.
	Known *rcsi.KnownCredentials
	// CapsRecheck is how long a user found without the caps of the
	// libcephfs path keeps provisioning through the mgr before the next
	// probe (0: DefaultCapsRecheck).
	CapsRecheck time.Duration

	locks rcsi.KeyLocks
	paths paths
	state
}

// target is a subvolume group of a file system, reached with the request's credentials.
type target struct {
	clusterID string
	conn      admin.RadosCommander
	fs        fsInfo
	group     string
	svs       store
	j         *Journal
	purger    *purger
	// mounted is the libcephfs mount (the fast path); lease is the
	// connection of the mgr path, nil on the fast one.
	mounted Mounted
	lease   *rcsi.Lease
}

// release ends t's use of its mount or connection.
func (t *target) release() {
	t.mounted.Release()
	if t.lease != nil {
		t.lease.Release()
	}
}

// check drops t's mount or connection if err says the cluster cut its client
// off, so that the next call connects again; it returns err.
func (t *target) check(err error) error {
	if t.lease != nil {
		return t.lease.Check(err)
	}
	return t.mounted.Check(err)
}

// status is cephStatus, after dropping t's mount if err says the cluster cut
// its client off (the next call mounts again).
func (t *target) status(err error, format string, args ...any) error {
	if rcsi.Broken(t.check(err)) {
		return status.Errorf(codes.Unavailable, "%s: cluster %q cut off this controller's client (blocklisted or evicted); the next call mounts again: %v",
			fmt.Sprintf(format, args...), t.clusterID, err)
	}
	return cephStatus(err, format, args...)
}

// open reaches group of file system fsName ("" group: the clusters file's).
func (c *Controller) open(ctx context.Context, clusterID, fsName, group string, secrets map[string]string) (*target, error) {
	creds, err := rcsi.CredentialsFromSecrets(secrets, SecretAdminID, SecretAdminKey)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return c.openWith(ctx, clusterID, fsName, group, creds)
}

func (c *Controller) openWith(ctx context.Context, clusterID, fsName, group string, creds rcsi.Credentials) (*target, error) {
	cluster, err := c.Clusters.Get(clusterID)
	if errors.Is(err, rcsi.ErrUnknownCluster) {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	} else if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	lease, err := c.Conns.Acquire(ctx, cluster, creds)
	if err != nil {
		return nil, cephStatus(err, "connecting to cluster %q", clusterID)
	}
	fs, err := c.fileSystem(lease.Conn(), clusterID, fsName)
	if err != nil {
		lease.Release()
		return nil, err
	}
	if group == "" {
		group = cluster.CephFS.SubvolumeGroup
	}
	if group == "" {
		group = DefaultSubvolumeGroup
	}
	viaMgr, m, err := c.choosePath(ctx, cluster, creds, fs, group, lease.Conn())
	if err != nil {
		lease.Release()
		return nil, err
	}
	t := &target{clusterID: clusterID, fs: *fs, group: group}
	if viaMgr {
		t.lease, t.conn = lease, lease.Conn()
		t.svs = newMgrSubvolumes(t.conn, fs.Name, group)
	} else {
		lease.Release()
		t.mounted, t.conn = m, m.Lease.Conn()
		t.svs = &subvolumes{mnt: m.Mnt, group: group, defaultPool: fs.DataPools[0], poolCache: c.poolCacheFor(clusterID, fsName, group)}
	}
	ioLease := t.lease
	if ioLease == nil {
		ioLease = m.Lease
	}
	io, err := ioLease.IOContext(fs.MetadataPool, JournalNamespace)
	if err != nil {
		err = cephStatus(t.check(err), "opening the metadata pool %q of file system %q", fs.MetadataPool, fsName)
		t.release()
		return nil, err
	}
	t.j = NewJournal(io, group)
	if c.Known != nil {
		c.Known.Remember(clusterID, creds)
	}
	open := func(ctx context.Context) (*target, error) { return c.openWith(ctx, clusterID, fsName, group, creds) }
	t.purger = c.purgerFor(t, open, func(ctx context.Context, sv string) (func(), error) { return c.lockVolume(ctx, t, sv) })
	return t, nil
}

// createGroup makes a missing subvolume group through the mgr (a rare,
// one-time step, so the mgr's single thread costs nothing here).
func (c *Controller) createGroup(conn admin.RadosCommander, fsName, group string) error {
	start := time.Now()
	if err := admin.NewFromConn(conn).CreateSubVolumeGroup(fsName, group, nil); err != nil {
		return fmt.Errorf("creating subvolume group %q: %w", group, err)
	}
	klog.InfoS("created subvolume group", "fs", fsName, "group", group, "duration", time.Since(start))
	return nil
}

func (c *Controller) lockVolume(ctx context.Context, t *target, sv string) (func(), error) {
	unlock, err := c.locks.Lock(ctx, "sv\x00"+t.clusterID+"\x00"+t.fs.Name+"\x00"+t.group+"\x00"+sv)
	if err != nil {
		return nil, status.Errorf(codes.Aborted, "an operation on subvolume %s is already in progress", sv)
	}
	return unlock, nil
}

func volumeID(t *target, sv string) rcsi.VolumeID {
	return rcsi.VolumeID{ClusterID: t.clusterID, Pool: t.fs.Name, Namespace: t.group, Name: sv}
}

// CreateVolume makes a subvolume for a request name, or returns the one the
// journal already holds for it.
func (c *Controller) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := rcsi.Required("name", req.GetName()); err != nil {
		return nil, err
	}
	if err := rcsi.Capabilities(req.GetVolumeCapabilities(), checkCapability); err != nil {
		return nil, err
	}
	if req.GetVolumeContentSource() != nil {
		return nil, status.Error(codes.InvalidArgument, "volume_content_source (snapshots and clones) is not supported yet")
	}
	p, err := ParseParams(req.GetParameters())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	size, err := rcsi.Size(req.GetCapacityRange(), 0, 1)
	if err != nil {
		return nil, err
	}
	t, err := c.open(ctx, p.ClusterID, p.FsName, "", req.GetSecrets())
	if status.Code(err) == codes.NotFound {
		return nil, status.Errorf(codes.InvalidArgument, "parameter %s: %s", ParamFsName, status.Convert(err).Message())
	} else if err != nil {
		return nil, err
	}
	defer t.release()
	if p.Pool != "" && !contains(t.fs.DataPools, p.Pool) {
		return nil, status.Errorf(codes.InvalidArgument, "parameter %s: %q is not a data pool of file system %q (its data pools: %v)",
			ParamPool, p.Pool, p.FsName, t.fs.DataPools)
	}
	start := time.Now()
	unlock, err := c.locks.Lock(ctx, "create\x00"+p.ClusterID+"\x00"+p.FsName+"\x00"+req.GetName())
	if err != nil {
		return nil, status.Errorf(codes.Aborted, "an operation on volume name %q is already in progress", req.GetName())
	}
	defer unlock()

	name, err := t.j.Lookup(req.GetName())
	if err != nil {
		return nil, t.status(err, "reading the journal")
	}
	fresh := false
	if name == "" {
		// Another process may reserve the name at the same time: the
		// journal decides under its lock which subvolume serves it.
		name = p.NamePrefix + uuid.NewString()
		if err := volumeID(t, name).Validate(); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		name, fresh, err = t.j.LookupOrReserve(ctx, req.GetName(), name)
		if errors.Is(err, ErrBusy) {
			return nil, status.Errorf(codes.Aborted, "reserving name %q: %v", req.GetName(), err)
		} else if err != nil {
			return nil, t.status(err, "reserving name %q", req.GetName())
		}
		if fresh {
			rcsi.CrashPoint("cephfs-create-after-reserve")
		}
	}
	id := volumeID(t, name)
	if err := id.Validate(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	unlockVol, err := c.lockVolume(ctx, t, name)
	if err != nil {
		return nil, err
	}
	defer unlockVol()
	var sv *subvolume
	create := func() (err error) {
		sv, err = c.ensureSubvolume(ctx, t, name, size, p, req.GetCapacityRange(), fresh)
		return err
	}
	err = t.svs.exclusive(ctx, name, create)
	if errors.Is(err, errNoGroup) {
		if err = c.createGroup(t.conn, t.fs.Name, t.group); err == nil {
			err = t.svs.exclusive(ctx, name, create)
		}
	}
	if errors.Is(err, errCreateBusy) {
		return nil, status.Errorf(codes.Aborted, "creating subvolume %s: %v", name, err)
	} else if _, coded := status.FromError(err); err != nil && coded {
		return nil, err // ensureSubvolume's, with its context already
	} else if err != nil {
		return nil, t.status(err, "creating subvolume %s in group %s", name, t.group)
	}
	rcsi.CrashPoint("cephfs-create-after-subvolume")
	klog.V(3).InfoS("volume ready", "name", req.GetName(), "volumeID", id.String(), "bytes", sv.Quota, "new", fresh, "duration", time.Since(start))
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId:      id.String(),
		CapacityBytes: sv.Quota,
		VolumeContext: volumeContext(p, t, name, sv.Path),
	}}, nil
}

// ensureSubvolume creates the subvolume or checks that an existing one fits the request.
func (c *Controller) ensureSubvolume(ctx context.Context, t *target, name string, size int64, p Params, r *csi.CapacityRange, fresh bool) (*subvolume, error) {
	var sv *subvolume
	var err error = syscall.ENOENT // a name just reserved has nothing yet
	if !fresh {
		sv, err = t.svs.Get(name)
	}
	if rcsi.Errno(err) == syscall.ENOENT {
		user := userMeta(p)
		sv, err = t.svs.Create(name, size, p.Pool, user, fresh)
		if errors.Is(err, errNoGroup) {
			if err = c.createGroup(t.conn, t.fs.Name, t.group); err == nil {
				sv, err = t.svs.Create(name, size, p.Pool, user, fresh)
			}
		}
		if err != nil {
			return nil, t.status(err, "creating subvolume %s in group %s", name, t.group)
		}
		return sv, nil
	}
	if err != nil {
		return nil, t.status(err, "reading subvolume %s", name)
	}
	if sv.State != stateComplete {
		return nil, status.Errorf(codes.FailedPrecondition, "subvolume %s is in state %q", name, sv.State)
	}
	if sv.Quota < r.GetRequiredBytes() || (r.GetLimitBytes() > 0 && (sv.Quota == 0 || sv.Quota > r.GetLimitBytes())) {
		return nil, status.Errorf(codes.AlreadyExists,
			"volume name is in use by subvolume %s with a quota of %d bytes, which does not fit capacity range [%d, %d]",
			name, sv.Quota, r.GetRequiredBytes(), r.GetLimitBytes())
	}
	if user := userMeta(p); !subset(user, sv.User) {
		// A create interrupted between the subvolume and its metadata.
		if err := t.svs.SetUser(name, user); err != nil {
			return nil, t.status(err, "recording the metadata of subvolume %s", name)
		}
	}
	return sv, nil
}

// userMeta is the subvolume metadata a request asks for (--extra-create-metadata).
func userMeta(p Params) map[string]string {
	user := map[string]string{}
	for k, v := range map[string]string{rcsi.KeyPVCName: p.PVCName, rcsi.KeyPVCNamespace: p.PVCNamespace, rcsi.KeyPVName: p.PVName} {
		if v != "" {
			user[k] = v
		}
	}
	return user
}

// subset says every key of a has the same value in b.
func subset(a, b map[string]string) bool {
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func volumeContext(p Params, t *target, name, path string) map[string]string {
	vc := map[string]string{
		ParamClusterID:    p.ClusterID,
		ParamFsName:       p.FsName,
		ctxSubvolumeName:  name,
		ctxSubvolumePath:  path,
		ctxSubvolumeGroup: t.group,
	}
	for k, v := range map[string]string{ParamPool: p.Pool, ParamMounter: p.Mounter, ParamKernelMountOptions: p.KernelMountOptions,
		ParamFuseMountOptions: p.FuseMountOptions, ParamPVCName: p.PVCName, ParamPVCNamespace: p.PVCNamespace, ParamPVName: p.PVName,
		ParamAckInterval: p.AckInterval} {
		if v != "" {
			vc[k] = v
		}
	}
	return vc
}

// DeleteVolume records the removal in the journal and returns; the group's
// purger then moves the subvolume to the trash and purges it in the
// background. A subvolume already gone (or being purged) is success.
func (c *Controller) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	id, err := rcsi.ParseVolumeID(req.GetVolumeId())
	if err != nil {
		klog.InfoS("DeleteVolume of an ID that is not ours: nothing to do", "volumeID", req.GetVolumeId(), "reason", err)
		return &csi.DeleteVolumeResponse{}, nil
	}
	t, err := c.open(ctx, id.ClusterID, id.Pool, id.Namespace, req.GetSecrets())
	if status.Code(err) == codes.NotFound {
		return &csi.DeleteVolumeResponse{}, nil // the file system is gone, and the subvolume with it
	} else if err != nil {
		return nil, err
	}
	defer t.release()
	start := time.Now()
	unlock, err := c.lockVolume(ctx, t, id.Name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	name, err := t.j.RequestName(id.Name)
	if err != nil {
		return nil, t.status(err, "reading the journal")
	}
	entry, err := t.j.TrashEntry(id.Name)
	if err != nil {
		return nil, t.status(err, "reading the journal")
	}
	if entry == "" {
		// The promise is the whole of the call: from here on the journal
		// keeps the volume until the purger has moved it to the trash and
		// purged it, so no CSI call waits for the MDS (whose locks on the
		// trash the mgr's purge threads may hold for seconds).
		entry = uuid.NewString()
		if err := t.j.Promise(name, id.Name, entry); err != nil {
			return nil, t.status(err, "recording the removal of %s", id.Name)
		}
	}
	rcsi.CrashPoint("cephfs-delete-after-promise")
	t.purger.kick()
	klog.V(3).InfoS("volume deleted (purge queued)", "volumeID", req.GetVolumeId(), "name", name, "duration", time.Since(start))
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities an existing volume supports.
func (c *Controller) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id, err := rcsi.VolumeIDArg(req.GetVolumeId(), true)
	if err != nil {
		return nil, err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume_capabilities are required")
	}
	t, err := c.open(ctx, id.ClusterID, id.Pool, id.Namespace, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	defer t.release()
	if _, err := c.subvolume(t, id); err != nil {
		return nil, err
	}
	if err := rcsi.Capabilities(req.GetVolumeCapabilities(), checkCapability); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// subvolume reads the volume's subvolume: NotFound if it does not exist.
func (c *Controller) subvolume(t *target, id rcsi.VolumeID) (*subvolume, error) {
	if entry, err := t.j.TrashEntry(id.Name); err != nil {
		return nil, t.status(err, "reading the journal")
	} else if entry != "" {
		return nil, status.Errorf(codes.NotFound, "volume %s is deleted (its purge is queued)", id.String())
	}
	sv, err := t.svs.Get(id.Name)
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil, status.Errorf(codes.NotFound, "volume %s does not exist", id.String())
	} else if err != nil {
		return nil, t.status(err, "reading volume %s", id.String())
	}
	if sv.State != stateComplete {
		return nil, status.Errorf(codes.NotFound, "volume %s is removed (subvolume state %q)", id.String(), sv.State)
	}
	return sv, nil
}

// ControllerExpandVolume raises the subvolume's quota; nothing is left for the node.
func (c *Controller) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id, err := rcsi.VolumeIDArg(req.GetVolumeId(), true)
	if err != nil {
		return nil, err
	}
	if req.GetCapacityRange() == nil {
		return nil, status.Error(codes.InvalidArgument, "capacity_range is required")
	}
	size, err := rcsi.Size(req.GetCapacityRange(), 0, 1)
	if err != nil {
		return nil, err
	}
	if size == 0 {
		return nil, status.Error(codes.InvalidArgument, "capacity_range.required_bytes is required")
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		if err := rcsi.Capability(vc, checkCapability); err != nil {
			return nil, err
		}
	}
	t, err := c.open(ctx, id.ClusterID, id.Pool, id.Namespace, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	defer t.release()
	unlock, err := c.lockVolume(ctx, t, id.Name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	start := time.Now()
	sv, err := c.subvolume(t, id)
	if err != nil {
		return nil, err
	}
	if sv.Quota != 0 && sv.Quota < size {
		if err := t.svs.Resize(id.Name, sv, size); err != nil {
			return nil, t.status(err, "expanding volume %s", req.GetVolumeId())
		}
		sv.Quota = size
	}
	klog.V(3).InfoS("volume expanded", "volumeID", req.GetVolumeId(), "bytes", sv.Quota, "duration", time.Since(start))
	// The quota takes effect on every mount at once; the node step only
	// reads it back and tells the node's event subscribers (expand), as
	// for RBD.
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: sv.Quota, NodeExpansionRequired: true}, nil
}

// ControllerGetCapabilities lists what this controller does.
func (c *Controller) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkCapability allows every access mode, for mount volumes only.
func checkCapability(c *csi.VolumeCapability) string {
	if c.GetBlock() != nil {
		return "block access is not supported: a CephFS volume is a shared file system, not a block device (use the RBD driver for block volumes)"
	}
	return ""
}

// cephStatus wraps a Ceph error with context, keeping its gRPC code.
func cephStatus(err error, format string, args ...any) error {
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return status.Errorf(s.Code(), "%s: %s", fmt.Sprintf(format, args...), s.Message())
	}
	code := rcsi.Code(err)
	if code == codes.PermissionDenied {
		return status.Errorf(code, "%s: %v (%s)", fmt.Sprintf(format, args...), err, capsHint)
	}
	return status.Errorf(code, "%s: %v", fmt.Sprintf(format, args...), err)
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
