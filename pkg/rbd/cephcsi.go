package rbd

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Volumes made by ceph-csi are adopted: their IDs name a pool by ID and a UUID,
// and ceph-csi's omap journal (internal/journal/voljournal.go, v3.12) leads
// from the UUID to the image. See docs/migrating-from-ceph-csi.md.
const (
	// DefaultCephCSIInstance is ceph-csi's default --instanceid.
	DefaultCephCSIInstance = "default"

	// cephCSIDirectoryPrefix + instance ID is the object whose omap maps
	// cephCSINamePrefix + request name to the volume's UUID (or to
	// <16 hex digits of the image pool ID>/<UUID> when the journal pool differs).
	cephCSIDirectoryPrefix = "csi.volumes."
	cephCSINamePrefix      = "csi.volume."
	// cephCSIUUIDPrefix + UUID is the per-volume object; its omap holds the keys below.
	cephCSIUUIDPrefix     = "csi.volume."
	cephCSIVolNameKey     = "csi.volname"
	cephCSIImageKey       = "csi.imagename"
	cephCSIImageIDKey     = "csi.imageid"
	cephCSIJournalPoolKey = "csi.journalpool"
	cephCSIKMSKey         = "csi.volume.encryptKMS"
	// cephCSIDefaultPrefix is the image name prefix ceph-csi assumes when
	// csi.imagename is absent (journals written before it existed).
	cephCSIDefaultPrefix = "csi-vol-"
)

// CheckCephCSIInstance validates a ceph-csi instance ID (--cephcsi-instance-id).
func CheckCephCSIInstance(s string) error {
	if s == "" {
		return errors.New("ceph-csi instance ID is empty")
	}
	for _, r := range s {
		if r <= 0x20 || r == 0x7f || r == '/' {
			return fmt.Errorf("ceph-csi instance ID %q contains a space, control character or '/'", s)
		}
	}
	return nil
}

// parseHandle decodes a request's volume ID, ours or ceph-csi's, with
// VolumeIDArg's codes. For a ceph-csi ID only the cluster ID of the returned
// VolumeID is set and cephID is not nil: resolve it before use.
func parseHandle(id string, notFound bool) (v rcsi.VolumeID, cephID *rcsi.CephCSIVolumeID, err error) {
	if !rcsi.LooksLikeCephCSIVolumeID(id) {
		v, err = rcsi.VolumeIDArg(id, notFound)
		return v, nil, err
	}
	h, err := rcsi.ParseCephCSIVolumeID(id)
	if err != nil {
		if notFound {
			return v, nil, status.Errorf(codes.NotFound, "no volume %q: %v", id, err)
		}
		return v, nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return rcsi.VolumeID{ClusterID: h.ClusterID}, &h, nil
}

// cephCSIVolume is a ceph-csi volume as its journal describes it.
type cephCSIVolume struct {
	handle rcsi.CephCSIVolumeID
	// id locates the image as our own IDs do.
	id rcsi.VolumeID
	// requestName is csi.volname ("" if the journal object lacks it).
	requestName string
	// journalPool holds the csi.volumes.<instance> object ("" if that pool is gone).
	journalPool string
	imageID     string
	kms         string
}

// resolveCephCSI finds a ceph-csi volume's image through its journal object
// csi.volume.<UUID> in the pool the ID names (and the cluster's RADOS
// namespace), on a leased connection. A missing pool or journal object is
// NotFound.
func resolveCephCSI(lease *rcsi.Lease, cluster rcsi.ClusterConfig, h rcsi.CephCSIVolumeID) (*cephCSIVolume, *rados.IOContext, error) {
	start := time.Now()
	conn := lease.Conn()
	pool, err := poolName(conn, h.PoolID)
	if err != nil {
		return nil, nil, err
	}
	ns := cluster.RBD.RadosNamespace
	io, err := lease.IOContext(pool, ns)
	if err != nil {
		return nil, nil, cephStatus(err, "reaching pool %q of cluster %q", pool, cluster.ClusterID)
	}
	oid := cephCSIUUIDPrefix + h.UUID
	vals, err := omapValues(io, oid, []string{cephCSIVolNameKey, cephCSIImageKey, cephCSIImageIDKey, cephCSIJournalPoolKey, cephCSIKMSKey})
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil, nil, status.Errorf(codes.NotFound, "ceph-csi volume %s: no journal object %s in pool %q namespace %q",
			h, oid, pool, ns)
	} else if err != nil {
		return nil, nil, cephStatus(err, "reading ceph-csi journal object %s in pool %q", oid, pool)
	}
	v := &cephCSIVolume{handle: h, requestName: vals[cephCSIVolNameKey], imageID: vals[cephCSIImageIDKey],
		kms: vals[cephCSIKMSKey], journalPool: pool}
	image, ok := vals[cephCSIImageKey]
	if !ok {
		image = cephCSIDefaultPrefix + h.UUID
	}
	v.id = rcsi.VolumeID{ClusterID: h.ClusterID, Pool: pool, Namespace: ns, Name: image}
	if err := rcsi.CheckCephCSIName("image name", image); err != nil {
		return nil, nil, status.Errorf(codes.FailedPrecondition, "ceph-csi journal object %s in pool %q: %v", oid, pool, err)
	}
	if err := v.id.Validate(); err != nil {
		return nil, nil, status.Errorf(codes.FailedPrecondition, "ceph-csi journal object %s in pool %q names an unusable image: %v", oid, pool, err)
	}
	if jp, ok := vals[cephCSIJournalPoolKey]; ok {
		id, err := decodePoolID(jp)
		if err != nil {
			return nil, nil, status.Errorf(codes.FailedPrecondition, "ceph-csi journal object %s: %s %q: %v", oid, cephCSIJournalPoolKey, jp, err)
		}
		v.journalPool, err = poolName(conn, id)
		if status.Code(err) == codes.NotFound {
			v.journalPool = "" // the name's reservation went with its pool
		} else if err != nil {
			return nil, nil, err
		}
	}
	klog.V(4).InfoS("ceph-csi volume resolved", "volumeID", h.String(), "image", pool+"/"+image, "namespace", ns,
		"requestName", v.requestName, "duration", time.Since(start))
	return v, io, nil
}

// poolName looks a pool up by ID; a missing pool is NotFound.
func poolName(conn *rados.Conn, id int64) (string, error) {
	name, err := conn.GetPoolByID(id)
	if rcsi.Errno(err) == syscall.ENOENT {
		return "", status.Errorf(codes.NotFound, "no pool with ID %d", id)
	} else if err != nil {
		return "", cephStatus(err, "looking up pool ID %d", id)
	}
	return name, nil
}

// decodePoolID reads ceph-csi's pool ID encoding: 8 bytes big endian, in hex.
func decodePoolID(s string) (int64, error) {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != 8 || b[0]&0x80 != 0 {
		return 0, errors.New("not 16 hex digits of a pool ID")
	}
	var id int64
	for _, c := range b {
		id = id<<8 | int64(c)
	}
	return id, nil
}

// omapValues reads the given keys of oid's omap (absent keys are left out).
func omapValues(io *rados.IOContext, oid string, keys []string) (map[string]string, error) {
	op := rados.CreateReadOp()
	defer op.Release()
	step := op.GetOmapValuesByKeys(keys)
	if err := op.Operate(io, oid, rados.OperationNoFlag); err != nil {
		return nil, err
	}
	out := map[string]string{}
	for {
		kv, err := step.Next()
		if err != nil {
			return nil, err
		}
		if kv == nil {
			return out, nil
		}
		out[kv.Key] = string(kv.Value)
	}
}

// openVolume reaches the pool of a parsed volume ID, resolving a ceph-csi ID
// (cephID not nil) through its journal first; it returns where the image is.
func (c *Controller) openVolume(ctx context.Context, id rcsi.VolumeID, cephID *rcsi.CephCSIVolumeID, secrets map[string]string) (rcsi.VolumeID, *target, error) {
	if cephID == nil {
		t, err := c.open(ctx, id.ClusterID, id.Pool, secrets)
		return id, t, err
	}
	v, t, err := c.openCephCSI(ctx, *cephID, secrets)
	if err != nil {
		return id, nil, err
	}
	return v.id, t, nil
}

// openCephCSI resolves a ceph-csi ID with the request's credentials.
func (c *Controller) openCephCSI(ctx context.Context, h rcsi.CephCSIVolumeID, secrets map[string]string) (*cephCSIVolume, *target, error) {
	creds, err := rcsi.CredentialsFromSecrets(secrets, SecretUserID, SecretUserKey)
	if err != nil {
		return nil, nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cluster, err := c.Clusters.Get(h.ClusterID)
	if errors.Is(err, rcsi.ErrUnknownCluster) {
		return nil, nil, status.Errorf(codes.InvalidArgument, "ceph-csi volume %s: %v (copy its entry from ceph-csi's config.json)", h, err)
	} else if err != nil {
		return nil, nil, status.Error(codes.Internal, err.Error())
	}
	lease, err := c.Conns.Acquire(ctx, cluster, creds)
	if err != nil {
		return nil, nil, cephStatus(err, "reaching cluster %q", h.ClusterID)
	}
	t := &target{cluster: cluster, creds: creds, lease: lease}
	v, io, err := resolveCephCSI(lease, cluster, h)
	if err != nil {
		err = t.status(err, "resolving ceph-csi volume %s", h)
		lease.Release()
		return nil, nil, err
	}
	if c.Known != nil {
		c.Known.Remember(h.ClusterID, creds)
	}
	t.pool, t.io = v.id.Pool, io
	return v, t, nil
}

// deleteCephCSIVolume removes a ceph-csi volume: the image, then the request
// name's key in csi.volumes.<instance>, then the csi.volume.<UUID> object that
// leads to both, so a crash at any point leaves what a retry finds and finishes.
func (c *Controller) deleteCephCSIVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	h, err := rcsi.ParseCephCSIVolumeID(req.GetVolumeId())
	if err != nil {
		// Shaped like ceph-csi's but not one: no volume can have this ID.
		klog.Warningf("DeleteVolume: volume ID %q is neither rookzmq's nor ceph-csi's, so no such volume exists: answering OK: %v", req.GetVolumeId(), err)
		return &csi.DeleteVolumeResponse{}, nil
	}
	err = c.bounded(ctx, h.ClusterID, func(ctx context.Context) error { return c.deleteCephCSI(ctx, req, h) })
	if err != nil {
		return nil, err
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// deleteCephCSI is deleteCephCSIVolume's work, bounded by the call's deadline.
func (c *Controller) deleteCephCSI(ctx context.Context, req *csi.DeleteVolumeRequest, h rcsi.CephCSIVolumeID) error {
	unlock, err := c.locks.Lock(ctx, "vol\x00"+req.GetVolumeId())
	if err != nil {
		return status.Errorf(codes.Aborted, "an operation on volume %q is already in progress", req.GetVolumeId())
	}
	defer unlock()
	start := time.Now()
	v, t, err := c.openCephCSI(ctx, h, req.GetSecrets())
	if status.Code(err) == codes.NotFound {
		// Its pool or journal object is gone: so is the image (the object goes last).
		klog.V(3).InfoS("ceph-csi volume already deleted", "volumeID", req.GetVolumeId(), "reason", status.Convert(err).Message())
		return nil
	} else if err != nil {
		return err
	}
	defer t.release()
	if v.kms != "" {
		klog.Warningf("DeleteVolume: ceph-csi volume %s was encrypted with KMS %q: its key in that KMS (if it keeps keys outside the image) is not removed", req.GetVolumeId(), v.kms)
	}
	rcsi.CrashPoint("cephcsi-delete-before-image")
	// ceph-csi deletes by moving to the trash (possibly with a deferment the
	// mgr's purge task would wait for): finish one it left there here.
	if err := c.removeCephCSITrashed(t, v); err != nil {
		return t.status(err, "removing image %s of ceph-csi volume %s from the trash", v.id.Name, req.GetVolumeId())
	}
	// Otherwise the image goes the way ours do: to the trash, its purge
	// recorded in our journal in that pool and handed to the mgr after the answer.
	trashID, err := c.trash(t, v.id.Name)
	if err != nil {
		return err
	}
	if err := NewJournal(t.io).Release("", v.id.Name, trashID); err != nil {
		return t.status(err, "recording the purge of image %s of ceph-csi volume %s", v.id.Name, req.GetVolumeId())
	}
	if trashID != "" {
		c.purgeLater(t, v.id.Name, trashID)
	}
	rcsi.CrashPoint("cephcsi-delete-after-image")
	if err := c.releaseCephCSIName(ctx, t, v, req.GetSecrets()); err != nil {
		return err
	}
	rcsi.CrashPoint("cephcsi-delete-after-name")
	op := rados.CreateWriteOp()
	defer op.Release()
	op.Remove()
	if err := op.Operate(t.io, cephCSIUUIDPrefix+h.UUID, rados.OperationNoFlag); err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return t.status(err, "removing ceph-csi journal object %s", cephCSIUUIDPrefix+h.UUID)
	}
	klog.InfoS("ceph-csi volume deleted", "volumeID", req.GetVolumeId(), "image", v.id.Pool+"/"+v.id.Name,
		"requestName", v.requestName, "duration", time.Since(start))
	return nil
}

// removeCephCSITrashed removes from the trash, at once and despite any
// deferment, an image of v found there before this call moved anything: one
// ceph-csi trashed (by its recorded image ID, or by name), or one a crashed
// earlier attempt of ours trashed (its queued purge then finds it gone).
func (c *Controller) removeCephCSITrashed(t *target, v *cephCSIVolume) error {
	entries, err := rbd.GetTrashList(t.io)
	if err != nil {
		return fmt.Errorf("listing the trash: %w", err)
	}
	for _, e := range entries {
		if (v.imageID == "" || e.Id != v.imageID) && e.Name != v.id.Name {
			continue
		}
		if err := rbd.TrashRemove(t.io, e.Id, true); err != nil && !errors.Is(err, rbd.ErrNotFound) {
			return err
		}
		klog.V(3).InfoS("removed a ceph-csi image from the trash", "image", v.id.Name, "trashID", e.Id)
	}
	return nil
}

// releaseCephCSIName removes the request name's key from csi.volumes.<instance>
// if it still points at this volume's UUID. When the journal object lost the
// name (ceph-csi crashed between writing the key and the object's omap), the
// directory is searched for keys pointing at the UUID.
func (c *Controller) releaseCephCSIName(ctx context.Context, t *target, v *cephCSIVolume, secrets map[string]string) error {
	if v.journalPool == "" {
		return nil
	}
	io := t.io
	if v.journalPool != v.id.Pool {
		jt, err := c.open(ctx, v.id.ClusterID, v.journalPool, secrets)
		if status.Code(err) == codes.NotFound {
			return nil
		} else if err != nil {
			return err
		}
		defer jt.release()
		io = jt.io
	}
	dir := cephCSIDirectoryPrefix + c.cephCSIInstance()
	var keys []string
	ours := func(val string) bool { return val == v.handle.UUID || strings.HasSuffix(val, "/"+v.handle.UUID) }
	if v.requestName != "" {
		key := cephCSINamePrefix + v.requestName
		vals, err := omapValues(io, dir, []string{key})
		if err != nil && rcsi.Errno(err) != syscall.ENOENT {
			return cephStatus(err, "reading ceph-csi journal %s in pool %q", dir, v.journalPool)
		}
		if val, ok := vals[key]; ok && !ours(val) {
			klog.Warningf("DeleteVolume: ceph-csi journal %s key %q points at %q, not at volume %s: left alone", dir, key, val, v.handle)
		} else if ok {
			keys = append(keys, key)
		}
	} else {
		start := time.Now()
		var err error
		for after, n := "", -1; n != 0 && err == nil; {
			n = 0 // keys seen on this page: a page with none is the end
			err = io.ListOmapValues(dir, after, cephCSINamePrefix, 1000, func(key string, val []byte) {
				n, after = n+1, key
				if ours(string(val)) {
					keys = append(keys, key)
				}
			})
		}
		if err != nil && rcsi.Errno(err) != syscall.ENOENT {
			return cephStatus(err, "searching ceph-csi journal %s in pool %q", dir, v.journalPool)
		}
		klog.InfoS("ceph-csi journal object names no request: searched the directory", "volumeID", v.handle.String(),
			"directory", dir, "found", keys, "duration", time.Since(start))
	}
	if len(keys) == 0 {
		return nil
	}
	op := rados.CreateWriteOp()
	defer op.Release()
	op.AssertExists()
	op.RmOmapKeys(keys)
	if err := op.Operate(io, dir, rados.OperationNoFlag); err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return cephStatus(err, "removing keys %q from ceph-csi journal %s", keys, dir)
	}
	return nil
}

func (c *Controller) cephCSIInstance() string {
	if c.CephCSIInstance == "" {
		return DefaultCephCSIInstance
	}
	return c.CephCSIInstance
}

// resolveForStage resolves a ceph-csi ID on the node with the stage secrets;
// an encrypted volume is refused, as this driver cannot open it.
func (s *stager) resolveForStage(ctx context.Context, h rcsi.CephCSIVolumeID, cluster rcsi.ClusterConfig, creds rcsi.Credentials) (rcsi.VolumeID, error) {
	lease, err := s.conns.Acquire(ctx, cluster, creds)
	if err != nil {
		return rcsi.VolumeID{}, cephStatus(err, "reaching cluster %q", h.ClusterID)
	}
	defer lease.Release()
	v, _, err := resolveCephCSI(lease, cluster, h)
	if err != nil {
		return rcsi.VolumeID{}, cephStatus(lease.Check(err), "resolving ceph-csi volume %s", h)
	}
	if v.kms != "" {
		return rcsi.VolumeID{}, status.Errorf(codes.FailedPrecondition,
			"ceph-csi volume %s is encrypted (KMS %q): rookzmq cannot open encrypted volumes", h, v.kms)
	}
	return v.id, nil
}
