package rbd

// Snapshots and clones of images. A CSI snapshot is an image of its own: a
// clone (format 2) of the source volume at that moment, holding one RBD
// snapshot of the same name, so that source and snapshot can be deleted in
// any order. A volume made from a snapshot or a volume is a clone of it.

import (
	"errors"
	"fmt"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"k8s.io/klog/v2"
)

// cloneOptions are the options of a clone: the class's features, format 2
// and clone format 2 (no protected parent snapshot; a parent snapshot removed
// while clones depend on it waits in the trash namespace).
func cloneOptions(features uint64) (*rbd.ImageOptions, error) {
	opts := rbd.NewRbdImageOptions()
	for _, o := range []struct {
		opt rbd.ImageOption
		val uint64
	}{{rbd.ImageOptionFeatures, features}, {rbd.ImageOptionFormat, 2}, {rbd.ImageOptionCloneFormat, 2}} {
		if err := opts.SetUint64(o.opt, o.val); err != nil {
			opts.Destroy()
			return nil, err
		}
	}
	return opts, nil
}

// makeClone clones parent@snap (in pio) to image dst (in dio). A clone an
// earlier try made is kept; one a crash left half-made is made again.
func makeClone(pio *rados.IOContext, parent, snap string, dio *rados.IOContext, dst string, features uint64) error {
	opts, err := cloneOptions(features)
	if err != nil {
		return err
	}
	defer opts.Destroy()
	err = rbd.CloneImage(pio, parent, snap, dio, dst, opts)
	if !errors.Is(err, rbd.ErrExist) {
		return err
	}
	if _, serr := imageSize(dio, dst); serr == nil {
		return nil // made by an earlier try
	} else if !errors.Is(serr, rbd.ErrNotFound) {
		return serr
	}
	if rerr := rbd.RemoveImage(dio, dst); rerr != nil && !errors.Is(rerr, rbd.ErrNotFound) {
		return fmt.Errorf("removing half-made clone %s: %w", dst, rerr)
	}
	return rbd.CloneImage(pio, parent, snap, dio, dst, opts)
}

// cloneOfImage makes dst (in dio) a clone of image src (in sio) as it is now:
// a snapshot of src named dst, the clone, then the removal of that snapshot
// (it stays in src's trash namespace while dst depends on it). Idempotent: a
// retry after a crash anywhere completes what is missing.
func cloneOfImage(sio *rados.IOContext, src string, dio *rados.IOContext, dst string, features uint64) error {
	if _, err := imageSize(dio, dst); errors.Is(err, rbd.ErrNotFound) {
		if err := createSnap(sio, src, dst); err != nil {
			return err
		}
		if err := makeClone(sio, src, dst, dio, dst, features); err != nil {
			if rerr := removeSnap(sio, src, dst); rerr != nil {
				klog.ErrorS(rerr, "removing the snapshot of a failed clone; the source's purge removes it", "image", src, "snapshot", dst)
			}
			return fmt.Errorf("cloning %s@%s to %s: %w", src, dst, dst, err)
		}
	} else if err != nil {
		return err
	}
	return removeSnap(sio, src, dst)
}

// createSnap makes snapshot snap of image; one that exists is fine.
func createSnap(io *rados.IOContext, image, snap string) error {
	img, err := rbd.OpenImage(io, image, rbd.NoSnapshot)
	if err != nil {
		return err
	}
	defer img.Close()
	if _, err := img.CreateSnapshot(snap); err != nil && !errors.Is(err, rbd.ErrExist) {
		return fmt.Errorf("snapshot %s@%s: %w", image, snap, err)
	}
	return nil
}

// removeSnap removes snapshot snap of image; a missing image or snapshot is
// fine. With clones depending on it, it moves to the trash namespace.
func removeSnap(io *rados.IOContext, image, snap string) error {
	img, err := rbd.OpenImage(io, image, rbd.NoSnapshot)
	if errors.Is(err, rbd.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer img.Close()
	if err := img.GetSnapshot(snap).Remove(); err != nil && !errors.Is(err, rbd.ErrNotFound) {
		return fmt.Errorf("removing snapshot %s@%s: %w", image, snap, err)
	}
	return nil
}

// snapInfo returns the size and creation time of snapshot snap of image;
// rbd.ErrNotFound if either is missing (or the snapshot is in the trash).
func snapInfo(io *rados.IOContext, image, snap string) (uint64, time.Time, error) {
	img, err := rbd.OpenImageReadOnly(io, image, rbd.NoSnapshot)
	if err != nil {
		return 0, time.Time{}, err
	}
	defer img.Close()
	snaps, err := img.GetSnapshotNames()
	if err != nil {
		return 0, time.Time{}, err
	}
	for _, s := range snaps {
		if s.Name == snap {
			ts, err := img.GetSnapTimestamp(s.Id)
			if err != nil {
				return 0, time.Time{}, err
			}
			return s.Size, time.Unix(ts.Sec, ts.Nsec), nil
		}
	}
	return 0, time.Time{}, rbd.ErrNotFound
}

// imageParent returns the parent of image, nil if it has none;
// rbd.ErrNotFound if the image does not exist.
func imageParent(io *rados.IOContext, image string) (*rbd.ImageSpec, error) {
	img, err := rbd.OpenImageReadOnly(io, image, rbd.NoSnapshot)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	p, err := img.GetParent()
	if errors.Is(err, rbd.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &p.Image, nil
}

// Clone depth: a clone whose lineage grows past flattenDepth ancestors is
// flattened by the mgr in the background (it reads its parents meanwhile),
// so lineages of snapshot-then-restore stay short: krbd maps no image with
// more than 16 ancestors, and each ancestor is a read on a cold block.
const flattenDepth = 4

// ancestors counts image's parents, up to limit, opening each by id (a
// parent may be in the trash: a deleted volume or snapshot); pools other than
// io's are opened through ioFor.
func ancestors(io *rados.IOContext, image string, limit int, ioFor func(pool, ns string) (*rados.IOContext, error)) (int, error) {
	img, err := rbd.OpenImageReadOnly(io, image, rbd.NoSnapshot)
	if err != nil {
		return 0, err
	}
	n := 0
	for ; n < limit; n++ {
		p, err := img.GetParent()
		img.Close()
		if errors.Is(err, rbd.ErrNotFound) {
			return n, nil
		} else if err != nil {
			return n, err
		}
		pio, err := ioFor(p.Image.PoolName, p.Image.PoolNamespace)
		if err != nil {
			return n + 1, err
		}
		if img, err = rbd.OpenImageByIdReadOnly(pio, p.Image.ImageID, rbd.NoSnapshot); err != nil {
			return n + 1, err
		}
	}
	img.Close()
	return n, nil
}

// addFlattenTask is `ceph rbd task add flatten POOL[/NS]/IMAGE`.
func addFlattenTask(conn *rados.Conn, pool, namespace, image string) error {
	spec := pool + "/" + image
	if namespace != "" {
		spec = pool + "/" + namespace + "/" + image
	}
	return mgrTask(conn, "rbd task add flatten", "image_spec", spec)
}
