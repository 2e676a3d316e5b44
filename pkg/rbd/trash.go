package rbd

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Deleting an image is two steps: the caller moves it to the RBD trash (a few
// metadata operations; its name is free again at once), then the mgr's
// rbd_support module removes it from the trash in the background, as a task
// it keeps in the pool and resumes after a mgr restart. Where the mgr refuses
// the task (module off, no mgr caps), the image is removed from the trash
// synchronously instead. Handing the task to the mgr happens after the call
// answered (see purger).

// trashImage moves image to the trash unless a client still watches it
// (FailedPrecondition naming the watchers) and returns its trash id. It is
// idempotent: for an image already in the trash it returns that entry's id;
// for an image that is nowhere, "". Any code path that deletes an RBD image
// (ours, or one another driver made) goes through here.
func trashImage(io *rados.IOContext, image string) (string, error) {
	start := time.Now()
	id, ok := unwatched(io, image)
	if !ok {
		var present bool
		var err error
		if id, present, err = watchersCheck(io, image); err != nil || !present {
			return id, err
		}
	}
	checked := time.Now()
	if err := rbd.GetImage(io, image).Trash(0); err != nil && !errors.Is(err, rbd.ErrNotFound) {
		return "", fmt.Errorf("moving image %s to the trash: %w", image, err)
	}
	klog.V(4).InfoS("image moved to the trash", "image", image, "trashID", id, "fastCheck", ok,
		"watcherCheck", checked.Sub(start), "trashMove", time.Since(checked))
	rcsi.CrashPoint("delete-after-trash")
	return id, nil
}

// unwatched tells in two RADOS operations that nobody watches image (no
// mapping, no open librbd client) and returns its id: it reads the image's id
// object and notifies its header object, which the OSD answers at once when
// nobody watches it. A watcher (who refreshes the header, as after any
// change of it, and acks), a format 1 image, a missing object or any error
// give ok false: watchersCheck then asks librbd, which opens the image.
func unwatched(io *rados.IOContext, image string) (id string, ok bool) {
	buf := make([]byte, 4+rbdIDMax+1)
	n, err := io.Read("rbd_id."+image, buf, 0)
	if err != nil || n < 4 {
		return "", false
	}
	l := int(binary.LittleEndian.Uint32(buf)) // a ceph-encoded string: length, bytes
	if l == 0 || l > rbdIDMax || n != 4+l || strings.Trim(string(buf[4:n]), "0123456789abcdef") != "" {
		return "", false
	}
	id = string(buf[4:n])
	acks, timeouts, err := io.NotifyWithTimeout("rbd_header."+id, nil, notifyTimeout)
	if err != nil || len(acks) > 0 || len(timeouts) > 0 {
		return "", false
	}
	return id, true
}

const (
	// rbdIDMax bounds an image id: librbd makes them of 8 to 16 hex digits.
	rbdIDMax = 64
	// notifyTimeout bounds unwatched's notify when a watcher does not answer
	// (a client that died, until the OSD drops its watch).
	notifyTimeout = 500 * time.Millisecond
)

// watchersCheck opens image read-only to list its watchers: FailedPrecondition
// naming them if there are any, else the image's id. For an image that is
// gone (present false) it gives its trash entry's id, or "" (see trashedID).
func watchersCheck(io *rados.IOContext, image string) (id string, present bool, err error) {
	img, err := rbd.OpenImageReadOnly(io, image, rbd.NoSnapshot)
	if errors.Is(err, rbd.ErrNotFound) {
		id, err := trashedID(io, image)
		return id, false, err
	}
	if err != nil {
		return "", false, fmt.Errorf("opening image %s: %w", image, err)
	}
	watchers, werr := img.ListWatchers()
	id, ierr := img.GetId()
	img.Close()
	if werr != nil {
		return "", true, fmt.Errorf("listing watchers of image %s: %w", image, werr)
	}
	if ierr != nil {
		return "", true, fmt.Errorf("reading the id of image %s: %w", image, ierr)
	}
	if len(watchers) > 0 {
		addrs := make([]string, len(watchers))
		for i, w := range watchers {
			addrs[i] = fmt.Sprintf("%s (client.%d)", w.Addr, w.Id)
		}
		return "", true, status.Errorf(codes.FailedPrecondition, "image %s is still in use (mapped on a node?): watched by %s",
			image, strings.Join(addrs, ", "))
	}
	return id, true, nil
}

// trashedID returns the id of the trash entry named image, for a retry that
// finds the image gone from the pool's directory; "" if there is none. An
// image that is neither there nor in the trash may still be a half-made one
// (a crash inside librbd's create): removing it by name clears that.
func trashedID(io *rados.IOContext, image string) (string, error) {
	entries, err := rbd.GetTrashList(io)
	if err != nil {
		return "", fmt.Errorf("listing the trash: %w", err)
	}
	for _, e := range entries {
		if e.Name == image {
			return e.Id, nil
		}
	}
	if err := rbd.RemoveImage(io, image); err != nil && !errors.Is(err, rbd.ErrNotFound) {
		return "", fmt.Errorf("removing what is left of image %s: %w", image, err)
	}
	return "", nil
}

// queuePurge asks the mgr to remove trash entry id; if the mgr refuses, it
// removes the entry itself. An entry already gone is fine.
func queuePurge(io *rados.IOContext, conn *rados.Conn, pool, namespace, image, id string) error {
	err := addTrashRemoveTask(conn, pool, namespace, id)
	if err == nil {
		return nil
	}
	start := time.Now()
	rerr := rbd.TrashRemove(io, id, false)
	if rerr != nil && !errors.Is(rerr, rbd.ErrNotFound) {
		return fmt.Errorf("removing image %s (trash id %s): the mgr refused the task (%v), and removing it here failed: %w", image, id, err, rerr)
	}
	if rerr == nil {
		klog.InfoS("the mgr refused the trash-remove task: removed the image here (give the user mgr 'profile rbd' caps and enable rbd_support for fast deletes)",
			"image", image, "trashID", id, "mgrError", err, "duration", time.Since(start))
	}
	return nil
}

// addTrashRemoveTask is `ceph rbd task add trash remove POOL[/NS]/ID`.
func addTrashRemoveTask(conn *rados.Conn, pool, namespace, id string) error {
	spec := pool + "/" + id
	if namespace != "" {
		spec = pool + "/" + namespace + "/" + id
	}
	return mgrTask(conn, "rbd task add trash remove", "image_id_spec", spec)
}

// mgrTask adds an rbd_support task: prefix with its spec argument.
func mgrTask(conn *rados.Conn, prefix, key, spec string) error {
	cmd, err := json.Marshal(map[string]string{"prefix": prefix, key: spec, "format": "json"})
	if err != nil {
		return err
	}
	_, info, err := conn.MgrCommand([][]byte{cmd})
	if err != nil {
		if info != "" {
			return fmt.Errorf("%w: %s", err, info)
		}
		return err
	}
	return nil
}

// errHasClones says a trashed image's purge waits: clones depend on it.
var errHasClones = errors.New("clones still depend on the image")

// trashedHasClones prepares trash entry id for its removal and reports
// whether clones (in any pool, in the trash or not) still depend on it; an
// entry that is gone has none. Its user snapshots, which would block the
// removal for ever (a deleted volume's: one a crash left mid-clone, or made
// outside the driver), are removed first; those with clones move to the
// trash namespace. Opened at its head, an image lists the children of all
// its snapshots, those in the trash namespace too.
func trashedHasClones(io *rados.IOContext, id string) (bool, error) {
	img, err := rbd.OpenImageById(io, id, rbd.NoSnapshot)
	if errors.Is(err, rbd.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("opening trash entry %s: %w", id, err)
	}
	defer img.Close()
	snaps, err := img.GetSnapshotNames()
	if err != nil {
		return false, fmt.Errorf("listing the snapshots of trash entry %s: %w", id, err)
	}
	for _, sn := range snaps {
		if err := img.GetSnapshot(sn.Name).Remove(); err != nil && !errors.Is(err, rbd.ErrNotFound) {
			return false, fmt.Errorf("removing snapshot %s of trash entry %s: %w", sn.Name, id, err)
		}
		klog.V(2).InfoS("removed a snapshot of a deleted image", "trashID", id, "snapshot", sn.Name)
	}
	children, err := img.ListChildrenAttributes()
	if err != nil {
		return false, fmt.Errorf("listing the clones of trash entry %s: %w", id, err)
	}
	return len(children) > 0, nil
}
