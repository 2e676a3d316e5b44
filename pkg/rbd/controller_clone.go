package rbd

// CreateVolume from a snapshot or a volume: the new image is a clone.

import (
	"context"
	"errors"

	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// contentSource is a CreateVolume request's volume_content_source, parsed.
type contentSource struct {
	snapshot bool          // a snapshot's ID, else a volume's
	id       rcsi.VolumeID // the snapshot's, or our volume's
	cephID   *rcsi.CephCSIVolumeID
	raw      string // the ID as given
}

// parseContentSource parses a content source; a malformed ID is NotFound (it
// names nothing that exists), a source in another cluster InvalidArgument.
func parseContentSource(cs *csi.VolumeContentSource, clusterID string) (*contentSource, error) {
	if cs == nil {
		return nil, nil
	}
	src := &contentSource{}
	switch {
	case cs.GetSnapshot() != nil:
		src.snapshot, src.raw = true, cs.GetSnapshot().GetSnapshotId()
		if err := rcsi.Required("volume_content_source.snapshot.snapshot_id", src.raw); err != nil {
			return nil, err
		}
		id, err := rcsi.ParseVolumeID(src.raw)
		if err != nil {
			return nil, status.Errorf(codes.NotFound, "no snapshot %q: %v", src.raw, err)
		}
		src.id = id
	case cs.GetVolume() != nil:
		src.raw = cs.GetVolume().GetVolumeId()
		if err := rcsi.Required("volume_content_source.volume.volume_id", src.raw); err != nil {
			return nil, err
		}
		id, cephID, err := parseHandle(src.raw, true)
		if err != nil {
			return nil, err
		}
		src.id, src.cephID = id, cephID
	default:
		return nil, status.Error(codes.InvalidArgument, "volume_content_source names neither a snapshot nor a volume")
	}
	if src.id.ClusterID != clusterID {
		return nil, status.Errorf(codes.InvalidArgument, "volume_content_source %q is in cluster %q, the volume would be in %q: clones stay in their cluster",
			src.raw, src.id.ClusterID, clusterID)
	}
	return src, nil
}

// checkedSource is a content source sourceInfo found: its image, the target
// holding its pool (release it when done) and its size.
type checkedSource struct {
	id   rcsi.VolumeID
	t    *target
	size uint64
}

// sourceInfo opens src and returns what it found: NotFound if it does not
// exist, OutOfRange if it holds more than the capacity range allows.
func (c *Controller) sourceInfo(ctx context.Context, src *contentSource, r *csi.CapacityRange, secrets map[string]string) (*checkedSource, error) {
	sid, st, err := c.openVolume(ctx, src.id, src.cephID, secrets)
	if err != nil {
		return nil, err
	}
	size, err := func() (uint64, error) {
		if !src.snapshot {
			size, err := imageSize(st.io, sid.Name)
			if err != nil {
				return 0, st.status(err, "source volume %s", src.raw)
			}
			return size, nil
		}
		rec, ok, err := st.journal().Snapshot(sid.Name)
		if err != nil {
			return 0, st.status(err, "reading the journal")
		}
		if !ok || !rec.Ready {
			return 0, status.Errorf(codes.NotFound, "snapshot %s does not exist", src.raw)
		}
		size, _, err := snapInfo(st.io, sid.Name, sid.Name)
		if err != nil {
			return 0, st.status(err, "snapshot %s", src.raw)
		}
		return size, nil
	}()
	if err == nil {
		if lim := r.GetLimitBytes(); lim > 0 && uint64(lim) < size {
			err = status.Errorf(codes.OutOfRange, "the source %s holds %d bytes, over capacity_range.limit_bytes %d", src.raw, size, lim)
		}
	}
	if err != nil {
		st.release()
		return nil, err
	}
	return &checkedSource{id: sid, t: st, size: size}, nil
}

// ensureClone makes image (in t) a clone of src and grows it to the
// requested size, or completes the clone an earlier try of this name made
// (which no longer needs its source). checked is the source as the caller
// found it already, or nil. It returns the image's size.
func (c *Controller) ensureClone(ctx context.Context, t *target, src *contentSource, checked *checkedSource, image string, size int64,
	features uint64, r *csi.CapacityRange, secrets map[string]string) (uint64, error) {
	if r.GetRequiredBytes() == 0 {
		size = 0 // no size asked for: the source's
	}
	parent, err := imageParent(t.io, image)
	if err == nil {
		return c.completeClone(ctx, t, src, image, parent, uint64(size), r, secrets)
	} else if !errors.Is(err, rbd.ErrNotFound) {
		return 0, t.status(err, "reading image %s", image)
	}
	if checked == nil {
		if checked, err = c.sourceInfo(ctx, src, r, secrets); err != nil {
			return 0, err
		}
		defer checked.t.release()
	}
	sid, st, srcSize := checked.id, checked.t, checked.size
	if src.snapshot {
		err = makeClone(st.io, sid.Name, sid.Name, t.io, image, features)
	} else {
		err = cloneOfImage(st.io, sid.Name, t.io, image, features)
	}
	if errors.Is(err, rbd.ErrNotFound) {
		return 0, status.Errorf(codes.NotFound, "the source %s is gone", src.raw)
	} else if err != nil {
		return 0, t.status(err, "cloning %s to image %s", src.raw, image)
	}
	rcsi.CrashPoint("create-after-clone")
	actual, err := growImage(t.io, image, max(uint64(size), srcSize))
	if err != nil {
		return 0, t.status(err, "growing image %s", image)
	}
	c.flattenIfDeep(t, image)
	return actual, nil
}

// completeClone checks that image, which exists, is a clone of src's image
// (AlreadyExists naming what it is otherwise; a ceph-csi source is not
// checked), grows it to size if a crash came before that, removes a
// snapshot of a source volume a crash left, and returns its size.
func (c *Controller) completeClone(ctx context.Context, t *target, src *contentSource, image string, parent *rbd.ImageSpec,
	size uint64, r *csi.CapacityRange, secrets map[string]string) (uint64, error) {
	if src.cephID == nil && (parent == nil || parent.PoolName != src.id.Pool || parent.PoolNamespace != src.id.Namespace || parent.ImageName != src.id.Name) {
		what := "not a clone"
		if parent != nil {
			what = "a clone of " + parent.PoolName + "/" + parent.PoolNamespace + "/" + parent.ImageName
		}
		return 0, status.Errorf(codes.AlreadyExists, "volume name is in use by image %s, %s, not of %s", image, what, src.raw)
	}
	if !src.snapshot {
		if sid, st, err := c.openVolume(ctx, src.id, src.cephID, secrets); err == nil {
			err = removeSnap(st.io, sid.Name, image)
			st.release()
			if err != nil {
				return 0, t.status(err, "source volume %s", src.raw)
			}
		} else if status.Code(err) != codes.NotFound {
			return 0, err
		}
	}
	actual, err := growImage(t.io, image, size)
	if err != nil {
		return 0, t.status(err, "growing image %s", image)
	}
	if lim := r.GetLimitBytes(); lim > 0 && actual > uint64(lim) {
		return 0, status.Errorf(codes.AlreadyExists, "volume name is in use by image %s of %d bytes, over capacity_range.limit_bytes %d", image, actual, lim)
	}
	return actual, nil
}

// flattenIfDeep queues a flatten of image (in t) with the mgr when its
// lineage is longer than flattenDepth. It only logs failures: the image
// works meanwhile, and the next snapshot or clone of it tries again.
func (c *Controller) flattenIfDeep(t *target, image string) {
	n, err := ancestors(t.io, image, flattenDepth+1, t.lease.IOContext)
	if err != nil {
		klog.ErrorS(err, "counting the ancestors of a clone; not flattening it", "image", image)
		return
	}
	if n <= flattenDepth {
		return
	}
	if err := addFlattenTask(t.lease.Conn(), t.pool, t.cluster.RBD.RadosNamespace, image); err != nil {
		klog.ErrorS(err, "the mgr refused to flatten a deep clone (give the user mgr 'profile rbd' caps and enable rbd_support)", "image", image, "ancestors", n)
		return
	}
	klog.V(2).InfoS("deep clone: the mgr flattens it", "image", image, "ancestors", n)
}
