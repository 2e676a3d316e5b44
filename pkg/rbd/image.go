package rbd

import (
	"errors"
	"fmt"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
)

// createImage makes image name. An image left half-made by a crash (its id
// object exists but it cannot be opened) is removed and made again.
func createImage(io *rados.IOContext, name string, size uint64, features uint64) error {
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	if err := opts.SetUint64(rbd.ImageOptionFeatures, features); err != nil {
		return err
	}
	if err := opts.SetUint64(rbd.ImageOptionFormat, 2); err != nil {
		return err
	}
	err := rbd.CreateImage(io, name, size, opts)
	if !errors.Is(err, rbd.ErrExist) {
		return err
	}
	if _, serr := imageSize(io, name); serr == nil {
		return err // a whole image: the caller decides
	} else if !errors.Is(serr, rbd.ErrNotFound) {
		return serr
	}
	if rerr := rbd.RemoveImage(io, name); rerr != nil && !errors.Is(rerr, rbd.ErrNotFound) {
		return fmt.Errorf("removing half-created image %s: %w", name, rerr)
	}
	return rbd.CreateImage(io, name, size, opts)
}

// imageSize opens image name read-only and returns its size; rbd.ErrNotFound if absent.
func imageSize(io *rados.IOContext, name string) (uint64, error) {
	img, err := rbd.OpenImageReadOnly(io, name, rbd.NoSnapshot)
	if err != nil {
		return 0, err
	}
	defer img.Close()
	return img.GetSize()
}

// setImageMetadata stores non-empty values as image metadata.
func setImageMetadata(io *rados.IOContext, name string, kv map[string]string) error {
	empty := true
	for _, v := range kv {
		empty = empty && v == ""
	}
	if empty {
		return nil
	}
	img, err := rbd.OpenImage(io, name, rbd.NoSnapshot)
	if err != nil {
		return err
	}
	defer img.Close()
	for k, v := range kv {
		if v == "" {
			continue
		}
		if err := img.SetMetadata(k, v); err != nil {
			return fmt.Errorf("setting metadata %s on %s: %w", k, name, err)
		}
	}
	return nil
}

// growImage resizes image name to at least size and returns the resulting size.
func growImage(io *rados.IOContext, name string, size uint64) (uint64, error) {
	img, err := rbd.OpenImage(io, name, rbd.NoSnapshot)
	if err != nil {
		return 0, err
	}
	defer img.Close()
	cur, err := img.GetSize()
	if err != nil || cur >= size {
		return cur, err
	}
	if err := img.Resize(size); err != nil {
		return 0, fmt.Errorf("resizing image %s to %d bytes: %w", name, size, err)
	}
	return size, nil
}
