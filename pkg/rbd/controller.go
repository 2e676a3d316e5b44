package rbd

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Secret names in CSI requests (ceph-csi's).
const (
	SecretUserID  = "userID"
	SecretUserKey = "userKey"
)

// DefaultSize is the size of a volume created without a capacity range.
const DefaultSize = rcsi.GiB

// Controller serves the CSI Controller service for RBD images.
type Controller struct {
	csi.UnimplementedControllerServer
	Clusters *rcsi.Clusters
	Conns    *rcsi.Conns
	// Known remembers credentials per cluster for calls that carry none.
	Known *rcsi.KnownCredentials
	// CephCSIInstance is the --instanceid of the ceph-csi whose volumes are
	// adopted ("" means DefaultCephCSIInstance); see cephcsi.go.
	CephCSIInstance string

	locks  rcsi.KeyLocks
	purger purger
}

// target is a pool (and RADOS namespace) of a cluster, with the credentials to
// reach it and a lease on the connection (release it when done).
type target struct {
	cluster rcsi.ClusterConfig
	creds   rcsi.Credentials
	pool    string
	io      *rados.IOContext
	lease   *rcsi.Lease
}

func (c *Controller) open(ctx context.Context, clusterID, pool string, secrets map[string]string) (*target, error) {
	lease, cluster, creds, err := c.leaseWith(ctx, clusterID, secrets)
	if err != nil {
		return nil, err
	}
	t := &target{cluster: cluster, creds: creds, pool: pool, lease: lease}
	t.io, err = lease.IOContext(pool, cluster.RBD.RadosNamespace)
	if err != nil {
		err = t.status(err, "reaching pool %q of cluster %q", pool, clusterID)
		lease.Release()
		return nil, err
	}
	if c.Known != nil {
		c.Known.Remember(clusterID, creds)
	}
	c.scanPurges(t)
	return t, nil
}

// leaseWith leases a connection to a cluster with a request's credentials.
func (c *Controller) leaseWith(ctx context.Context, clusterID string, secrets map[string]string) (*rcsi.Lease, rcsi.ClusterConfig, rcsi.Credentials, error) {
	creds, err := rcsi.CredentialsFromSecrets(secrets, SecretUserID, SecretUserKey)
	if err != nil {
		return nil, rcsi.ClusterConfig{}, creds, status.Error(codes.InvalidArgument, err.Error())
	}
	cluster, err := c.Clusters.Get(clusterID)
	if errors.Is(err, rcsi.ErrUnknownCluster) {
		return nil, cluster, creds, status.Error(codes.InvalidArgument, err.Error())
	} else if err != nil {
		return nil, cluster, creds, status.Error(codes.Internal, err.Error())
	}
	lease, err := c.Conns.Acquire(ctx, cluster, creds)
	if err != nil {
		return nil, cluster, creds, cephStatus(err, "reaching cluster %q", clusterID)
	}
	return lease, cluster, creds, nil
}

// release ends the target's lease on its connection.
func (t *target) release() { t.lease.Release() }

// journal returns the volume journal of t's pool and namespace.
func (t *target) journal() *Journal {
	j := NewJournal(t.io)
	j.where = t.cluster.ClusterID + "/" + t.pool + "/" + t.cluster.RBD.RadosNamespace
	j.client = fmt.Sprintf("client.%d", t.lease.Conn().GetInstanceID())
	return j
}

// status is cephStatus for an error of an operation on t: an error that says
// the connection is broken drops it (the next call reconnects) and, like a
// Ceph timeout, is Unavailable naming the monitors.
func (t *target) status(err error, format string, args ...any) error {
	t.lease.Check(err)
	switch rcsi.Errno(err) {
	case syscall.ESHUTDOWN, syscall.ENOTCONN:
		return status.Errorf(codes.Unavailable, "%s: the connection to cluster %q (monitors %s) was blocklisted or shut down; the next call reconnects: %v",
			fmt.Sprintf(format, args...), t.cluster.ClusterID, t.cluster.MonHost(), err)
	case syscall.ETIMEDOUT:
		return status.Errorf(codes.Unavailable, "%s: cluster %q (monitors %s) did not answer in time: %v",
			fmt.Sprintf(format, args...), t.cluster.ClusterID, t.cluster.MonHost(), err)
	}
	return cephStatus(err, format, args...)
}

// bounded runs f (see rcsi.Bounded): a call that reaches its deadline answers
// Unavailable naming the cluster's monitors, before the deadline.
func (c *Controller) bounded(ctx context.Context, clusterID string, f func(ctx context.Context) error) error {
	return rcsi.Bounded(ctx, f, func(waited time.Duration) error {
		mons := "(unknown cluster)"
		if cluster, err := c.Clusters.Get(clusterID); err == nil {
			mons = cluster.MonHost()
		}
		return &rcsi.UnreachableError{Cluster: clusterID, Monitors: mons, Waited: waited}
	})
}

// CreateVolume makes an image for a request name, or returns the one the
// journal already holds for it.
func (c *Controller) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := rcsi.Required("name", req.GetName()); err != nil {
		return nil, err
	}
	if err := rcsi.Capabilities(req.GetVolumeCapabilities(), checkCapability); err != nil {
		return nil, err
	}
	p, err := ParseParams(req.GetParameters())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	src, err := parseContentSource(req.GetVolumeContentSource(), p.ClusterID)
	if err != nil {
		return nil, err
	}
	size, err := rcsi.Size(req.GetCapacityRange(), DefaultSize, rcsi.MiB)
	if err != nil {
		return nil, err
	}
	var resp *csi.CreateVolumeResponse
	err = c.bounded(ctx, p.ClusterID, func(ctx context.Context) (err error) {
		resp, err = c.createVolume(ctx, req, p, src, size)
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (c *Controller) createVolume(ctx context.Context, req *csi.CreateVolumeRequest, p Params, src *contentSource, size int64) (*csi.CreateVolumeResponse, error) {
	t, err := c.open(ctx, p.ClusterID, p.Pool, req.GetSecrets())
	if status.Code(err) == codes.NotFound {
		// NotFound is for a missing content source: a missing pool is a bad parameter.
		return nil, status.Errorf(codes.InvalidArgument, "parameter pool: %s", status.Convert(err).Message())
	} else if err != nil {
		return nil, err
	}
	defer t.release()
	unlock, err := c.locks.Lock(ctx, "create\x00"+p.ClusterID+"\x00"+p.Pool+"\x00"+req.GetName())
	if err != nil {
		return nil, status.Errorf(codes.Aborted, "an operation on volume name %q is already in progress", req.GetName())
	}
	defer unlock()

	j := t.journal()
	image, err := j.Lookup(req.GetName())
	if err != nil {
		return nil, t.status(err, "reading the journal")
	}
	fresh := false
	var checked *checkedSource
	if image == "" && src != nil {
		// Check the source before reserving a name for its clone.
		if checked, err = c.sourceInfo(ctx, src, req.GetCapacityRange(), req.GetSecrets()); err != nil {
			return nil, err
		}
		defer checked.t.release()
	}
	if image == "" {
		// Another process may reserve the name at the same time: the
		// journal decides under its lock which image serves it.
		image = p.NamePrefix + uuid.NewString()
		id := rcsi.VolumeID{ClusterID: p.ClusterID, Pool: p.Pool, Namespace: t.cluster.RBD.RadosNamespace, Name: image}
		if err := id.Validate(); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		image, fresh, err = j.LookupOrReserve(ctx, req.GetName(), image)
		if errors.Is(err, ErrReserveBusy) {
			return nil, status.Errorf(codes.Aborted, "reserving name %q: %v", req.GetName(), err)
		} else if err != nil {
			return nil, t.status(err, "reserving name %q", req.GetName())
		}
		if fresh {
			rcsi.CrashPoint("create-after-reserve")
		}
	}
	id := rcsi.VolumeID{ClusterID: p.ClusterID, Pool: p.Pool, Namespace: t.cluster.RBD.RadosNamespace, Name: image}
	if err := id.Validate(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var actual uint64
	if src == nil {
		actual, err = c.ensureImage(t, image, uint64(size), p.Features, req.GetCapacityRange())
	} else {
		actual, err = c.ensureClone(ctx, t, src, checked, image, size, p.Features, req.GetCapacityRange(), req.GetSecrets())
		if code := status.Code(err); code == codes.NotFound || code == codes.OutOfRange {
			// The source went since the check: no image was made, so
			// the name's reservation goes too.
			if _, serr := imageSize(t.io, image); errors.Is(serr, rbd.ErrNotFound) {
				if rerr := j.Release(req.GetName(), image, ""); rerr != nil {
					klog.ErrorS(rerr, "releasing the reservation of a clone whose source is gone", "name", req.GetName(), "image", image)
				}
			}
		}
	}
	if err != nil {
		return nil, err
	}
	rcsi.CrashPoint("create-after-image")
	meta := map[string]string{rcsi.KeyPVCName: p.PVCName, rcsi.KeyPVCNamespace: p.PVCNamespace, rcsi.KeyPVName: p.PVName}
	if err := setImageMetadata(t.io, image, meta); err != nil {
		return nil, t.status(err, "storing PVC names on image %s", image)
	}
	klog.V(3).InfoS("volume ready", "name", req.GetName(), "volumeID", id.String(), "bytes", actual, "new", fresh)
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId:      id.String(),
		CapacityBytes: int64(actual),
		VolumeContext: volumeContext(p, t.cluster, image),
		ContentSource: req.GetVolumeContentSource(),
	}}, nil
}

// ensureImage creates the image or checks that an existing one fits the request.
func (c *Controller) ensureImage(t *target, image string, size, features uint64, r *csi.CapacityRange) (uint64, error) {
	err := createImage(t.io, image, size, features)
	if err == nil {
		return size, nil
	}
	if !errors.Is(err, rbd.ErrExist) {
		return 0, t.status(err, "creating image %s", image)
	}
	actual, err := imageSize(t.io, image)
	if err != nil {
		return 0, t.status(err, "reading image %s", image)
	}
	if parent, err := imageParent(t.io, image); err != nil {
		return 0, t.status(err, "reading image %s", image)
	} else if parent != nil {
		return 0, status.Errorf(codes.AlreadyExists, "volume name is in use by image %s, a clone of %s/%s/%s: the request names no content source",
			image, parent.PoolName, parent.PoolNamespace, parent.ImageName)
	}
	if actual < uint64(r.GetRequiredBytes()) || (r.GetLimitBytes() > 0 && actual > uint64(r.GetLimitBytes())) {
		return 0, status.Errorf(codes.AlreadyExists,
			"volume name is in use by image %s of %d bytes, which does not fit capacity range [%d, %d]",
			image, actual, r.GetRequiredBytes(), r.GetLimitBytes())
	}
	return actual, nil
}

func volumeContext(p Params, cluster rcsi.ClusterConfig, image string) map[string]string {
	vc := map[string]string{
		ParamClusterID:    p.ClusterID,
		ParamPool:         p.Pool,
		ctxImageName:      image,
		ctxRadosNamespace: cluster.RBD.RadosNamespace,
		ctxFsType:         p.FsType,
	}
	for k, v := range map[string]string{ParamMounter: p.Mounter, ParamPVCName: p.PVCName, ParamPVCNamespace: p.PVCNamespace,
		ParamPVName: p.PVName, ParamAckInterval: p.AckInterval} {
		if v != "" {
			vc[k] = v
		}
	}
	return vc
}

// DeleteVolume moves the image to the RBD trash, queues its removal (see
// trashImage) and then releases its journal entry, so a crash at any point
// leaves something a retry completes.
func (c *Controller) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if rcsi.LooksLikeCephCSIVolumeID(req.GetVolumeId()) {
		return c.deleteCephCSIVolume(ctx, req)
	}
	id, err := rcsi.ParseVolumeID(req.GetVolumeId())
	if err != nil {
		// No volume can have this ID, so it does not exist: the CSI spec wants OK.
		klog.Warningf("DeleteVolume: volume ID %q is neither rookzmq's nor ceph-csi's, so no such volume exists: answering OK: %v", req.GetVolumeId(), err)
		return &csi.DeleteVolumeResponse{}, nil
	}
	err = c.deleteIn(ctx, id, req.GetSecrets(), "vol\x00"+req.GetVolumeId(), "volume", c.deleteVolume)
	if err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// deleteIn runs del on image id.Name in its pool, holding the lock on key
// (Aborted naming the what and ID if another call holds it); a pool that is
// gone took the image with it.
func (c *Controller) deleteIn(ctx context.Context, id rcsi.VolumeID, secrets map[string]string, key, what string, del func(*target, string) error) error {
	return c.bounded(ctx, id.ClusterID, func(ctx context.Context) error {
		t, err := c.open(ctx, id.ClusterID, id.Pool, secrets)
		if status.Code(err) == codes.NotFound {
			return nil
		} else if err != nil {
			return err
		}
		defer t.release()
		unlock, err := c.locks.Lock(ctx, key)
		if err != nil {
			return status.Errorf(codes.Aborted, "an operation on %s %q is already in progress", what, id.String())
		}
		defer unlock()
		return del(t, id.Name)
	})
}

// deleteVolume deletes image and its journal entry: the image goes to the
// trash, the release of its name records the purge, which is handed to the
// mgr after the call answered.
func (c *Controller) deleteVolume(t *target, image string) error {
	start := time.Now()
	j := NewJournal(t.io)
	name, err := j.RequestName(image)
	if err != nil {
		return t.status(err, "reading the journal")
	}
	if name == "" {
		// Not (or no longer) a volume of the journal: a snapshot's image
		// is not deleted as a volume.
		if _, snap, err := j.Snapshot(image); err != nil {
			return t.status(err, "reading the journal")
		} else if snap {
			klog.Warningf("DeleteVolume: %s is a snapshot's image, not a volume: answering OK, leaving it", image)
			return nil
		}
	}
	rcsi.CrashPoint("delete-before-image")
	id, err := c.trash(t, image)
	if err != nil {
		return err
	}
	if err := j.Release(name, image, id); err != nil {
		return t.status(err, "releasing name %q", name)
	}
	rcsi.CrashPoint("delete-after-release")
	if id != "" {
		c.purgeLater(t, image, id)
	}
	klog.V(3).InfoS("volume deleted", "image", image, "name", name, "trashID", id, "duration", time.Since(start))
	return nil
}

// trash moves image of t's pool to the trash and returns its trash id ("" if
// it is gone already); see trashImage. Callers hold the volume's lock, then
// record the id in the journal (Journal.Release) and call purgeLater.
func (c *Controller) trash(t *target, image string) (string, error) {
	id, err := trashImage(t.io, image)
	if err != nil {
		return "", t.status(err, "deleting image %s", image)
	}
	return id, nil
}

// ValidateVolumeCapabilities confirms the capabilities an existing volume supports.
func (c *Controller) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id, cephID, err := parseHandle(req.GetVolumeId(), true)
	if err != nil {
		return nil, err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume_capabilities are required")
	}
	err = c.bounded(ctx, id.ClusterID, func(ctx context.Context) error {
		id, t, err := c.openVolume(ctx, id, cephID, req.GetSecrets())
		if err != nil {
			return err
		}
		defer t.release()
		if _, err := imageSize(t.io, id.Name); err != nil {
			return t.status(err, "volume %s", req.GetVolumeId())
		}
		return nil
	})
	if err != nil {
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

// ControllerExpandVolume grows the image; filesystems then grow on the node.
func (c *Controller) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id, cephID, err := parseHandle(req.GetVolumeId(), true)
	if err != nil {
		return nil, err
	}
	if req.GetCapacityRange() == nil {
		return nil, status.Error(codes.InvalidArgument, "capacity_range is required")
	}
	size, err := rcsi.Size(req.GetCapacityRange(), 0, rcsi.MiB)
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
	var got uint64
	start := time.Now()
	err = c.bounded(ctx, id.ClusterID, func(ctx context.Context) error {
		id, t, err := c.openVolume(ctx, id, cephID, req.GetSecrets())
		if err != nil {
			return err
		}
		defer t.release()
		unlock, err := c.locks.Lock(ctx, "vol\x00"+req.GetVolumeId())
		if err != nil {
			return status.Errorf(codes.Aborted, "an operation on volume %q is already in progress", req.GetVolumeId())
		}
		defer unlock()
		got, err = growImage(t.io, id.Name, uint64(size))
		if err != nil {
			return t.status(err, "expanding volume %s", req.GetVolumeId())
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	klog.V(3).InfoS("volume expanded", "volumeID", req.GetVolumeId(), "bytes", got, "duration", time.Since(start))
	return &csi.ControllerExpandVolumeResponse{
		CapacityBytes: int64(got),
		// Block volumes too: a loop device over rbd-fuse grows only when the
		// node refreshes it, and the controller cannot know the node's mounter.
		NodeExpansionRequired: true,
	}, nil
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
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkCapability allows single-node modes for both access types and
// multi-node writers only for raw block, which has no filesystem to corrupt.
func checkCapability(c *csi.VolumeCapability) string {
	if m := c.GetMount(); m != nil {
		if m.GetFsType() != "" {
			if err := CheckFsType(m.GetFsType()); err != nil {
				return err.Error()
			}
		}
		switch c.GetAccessMode().GetMode() {
		case csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, csi.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER:
			return fmt.Sprintf("access mode %s is only supported for block volumes", rcsi.ModeName(c))
		}
	}
	return ""
}

// cephStatus wraps a Ceph error with context, keeping its gRPC code.
func cephStatus(err error, format string, args ...any) error {
	if s, ok := status.FromError(err); ok && s.Code() != codes.Unknown {
		return status.Errorf(s.Code(), "%s: %s", fmt.Sprintf(format, args...), s.Message())
	}
	return status.Errorf(rcsi.Code(err), "%s: %v", fmt.Sprintf(format, args...), err)
}
