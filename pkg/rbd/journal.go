package rbd

import (
	"errors"
	"fmt"
	"strings"
	"syscall"

	"github.com/ceph/go-ceph/rados"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// journalObject is the omap object, one per pool and RADOS namespace, that maps
// CSI request names to image names and back.
const journalObject = "rookzmq.volumes"

const (
	nameKeyPrefix  = "n:" // n:<request name> -> image name
	imageKeyPrefix = "i:" // i:<image name>   -> request name
	purgeKeyPrefix = "t:" // t:<image name>   -> trash id of a deleted image not yet handed to the mgr
)

// Journal records which image serves which request name, so that retried and
// concurrent CreateVolume calls find the image instead of making a second one.
// Both directions are written and removed in one RADOS operation.
type Journal struct {
	io *rados.IOContext
	// where names the journal (cluster, pool, namespace) and client the
	// RADOS client ("client.<id>") of io, for the reservation lock.
	where, client string
}

// NewJournal uses the journal object in io's pool and namespace.
func NewJournal(io *rados.IOContext) *Journal { return &Journal{io: io} }

// Lookup returns the image reserved for request name, or "" if none.
func (j *Journal) Lookup(name string) (string, error) {
	return j.get(nameKeyPrefix + name)
}

// RequestName returns the request name that reserved image, or "" if none.
func (j *Journal) RequestName(image string) (string, error) {
	return j.get(imageKeyPrefix + image)
}

// Reserve records name <-> image with a single omap write.
func (j *Journal) Reserve(name, image string) error {
	op := rados.CreateWriteOp()
	defer op.Release()
	op.SetOmap(map[string][]byte{
		nameKeyPrefix + name:   []byte(image),
		imageKeyPrefix + image: []byte(name),
	})
	if err := op.Operate(j.io, journalObject, rados.OperationNoFlag); err != nil {
		return fmt.Errorf("journal: reserving %q: %w", name, err)
	}
	return nil
}

// reserveLock is the RADOS lock on the journal object that makes looking up
// and reserving a name one step across processes (two controllers, or an old
// and a new one during a rollout). reserveLockTTL frees it after a holder
// crashed; it outlasts the two bounded operations the holder runs.
const (
	reserveLock    = "rookzmq.reserve"
	reserveLockTTL = 3 * rcsi.OpTimeout
)

// ErrReserveBusy says another caller held the reservation lock until ctx ended.
var ErrReserveBusy = errors.New("journal: another CreateVolume holds the journal's reservation lock")

// Release removes both keys of a reservation; a missing object is fine. With
// a trash id, the same operation records that the image waits in the trash
// for its purge to be queued (see Purges).
func (j *Journal) Release(name, image, trashID string) error {
	keys := []string{imageKeyPrefix + image}
	if name != "" {
		keys = append(keys, nameKeyPrefix+name)
	}
	return j.release(keys, image, trashID)
}

// release removes keys; with a trash id, the same operation records the purge
// of image (see Purges).
func (j *Journal) release(keys []string, image, trashID string) error {
	op := rados.CreateWriteOp()
	defer op.Release()
	if trashID == "" {
		op.AssertExists()
	} else {
		op.SetOmap(map[string][]byte{purgeKeyPrefix + image: []byte(trashID)})
	}
	op.RmOmapKeys(keys)
	err := op.Operate(j.io, journalObject, rados.OperationNoFlag)
	if err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return fmt.Errorf("journal: releasing %q: %w", image, err)
	}
	return nil
}

// Purges returns up to max images (with their trash ids) whose purge is yet
// to be queued.
func (j *Journal) Purges(max int) (map[string]string, error) {
	op := rados.CreateReadOp()
	defer op.Release()
	step := op.GetOmapValues("", purgeKeyPrefix, uint64(max))
	err := op.Operate(j.io, journalObject, rados.OperationNoFlag)
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal: listing purges: %w", err)
	}
	out := map[string]string{}
	for {
		kv, err := step.Next()
		if err != nil {
			return nil, fmt.Errorf("journal: listing purges: %w", err)
		}
		if kv == nil {
			return out, nil
		}
		out[strings.TrimPrefix(kv.Key, purgeKeyPrefix)] = string(kv.Value)
	}
}

// Purged removes the record Release made for image.
func (j *Journal) Purged(image string) error {
	op := rados.CreateWriteOp()
	defer op.Release()
	op.AssertExists()
	op.RmOmapKeys([]string{purgeKeyPrefix + image})
	err := op.Operate(j.io, journalObject, rados.OperationNoFlag)
	if err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return fmt.Errorf("journal: removing the purge record of %q: %w", image, err)
	}
	return nil
}

// Images lists reserved image names in order, at most max (0: all) after startAfter.
func (j *Journal) Images(startAfter string, max int) ([]string, error) {
	kv, err := rcsi.OmapList(j.io, journalObject, imageKeyPrefix, startAfter, max)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	out := make([]string, len(kv))
	for i, e := range kv {
		out[i] = e[0]
	}
	return out, nil
}

func (j *Journal) get(key string) (string, error) {
	op := rados.CreateReadOp()
	defer op.Release()
	step := op.GetOmapValuesByKeys([]string{key})
	err := op.Operate(j.io, journalObject, rados.OperationNoFlag)
	if rcsi.Errno(err) == syscall.ENOENT {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("journal: reading %q: %w", key, err)
	}
	kv, err := step.Next()
	if err != nil {
		return "", fmt.Errorf("journal: reading %q: %w", key, err)
	}
	if kv == nil {
		return "", nil
	}
	return string(kv.Value), nil
}
