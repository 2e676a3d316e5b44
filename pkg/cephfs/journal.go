package cephfs

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"

	"github.com/ceph/go-ceph/rados"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// JournalNamespace is the RADOS namespace of the file system's metadata pool
// that holds the journal objects (apart from the MDS's own objects).
const JournalNamespace = "rookzmq"

// JournalObject is the omap object of a subvolume group's journal.
func JournalObject(group string) string { return "rookzmq.cephfs." + group }

const (
	nameKeyPrefix  = "n:" // n:<request name> -> subvolume name
	volKeyPrefix   = "i:" // i:<subvolume>    -> request name
	trashKeyPrefix = "t:" // t:<subvolume>    -> trash entry name: a removal promised
)

// Journal records which subvolume serves which request name, so that retried
// and concurrent CreateVolume calls find the subvolume instead of making a
// second one, and which subvolumes DeleteVolume has promised to remove, so
// that their purge survives a crash. Each change is one RADOS operation.
type Journal struct {
	io  *rados.IOContext
	obj string
}

// ErrBusy says concurrent reservations kept winning over this one until ctx
// ended.
var ErrBusy = errors.New("journal: concurrent reservations in other controllers kept this one from its turn")

// LookupOrReserve returns the subvolume reserved for name, reserving sv for
// it if there is none; fresh says sv was reserved now. Concurrent callers in
// any process agree on one subvolume: the object's first 8 data bytes count
// reservations, and a reservation writes only if the count is still the one
// it read with its lookup (compare-and-swap in one RADOS operation; needs no
// class-method caps). Retrying ends with ctx (ErrBusy).
func (j *Journal) LookupOrReserve(ctx context.Context, name, sv string) (got string, fresh bool, err error) {
	for {
		count, exists, got, err := j.lookupCounted(name)
		if err != nil || got != "" {
			return got, false, err
		}
		rcsi.PausePoint("cephfs-create-reserve-read")
		op := rados.CreateWriteOp()
		next := make([]byte, 8)
		binary.BigEndian.PutUint64(next, binary.BigEndian.Uint64(count)+1)
		if exists {
			op.CmpExt(count, 0)
		} else {
			op.Create(rados.CreateExclusive)
		}
		op.Write(next, 0)
		op.SetOmap(map[string][]byte{nameKeyPrefix + name: []byte(sv), volKeyPrefix + sv: []byte(name)})
		err = op.Operate(j.io, j.obj, rados.OperationNoFlag)
		op.Release()
		if err == nil {
			return sv, true, nil
		}
		if e := rcsi.Errno(err); e != syscall.EEXIST && !cmpExtMismatch(err) {
			return "", false, fmt.Errorf("journal: reserving %q: %w", name, err)
		}
		select { // another reservation came first: look again
		case <-ctx.Done():
			return "", false, ErrBusy
		default:
		}
	}
}

// lookupCounted reads the reservation count (zero-padded to 8 bytes) and
// the subvolume reserved for name in one operation.
func (j *Journal) lookupCounted(name string) (count []byte, exists bool, got string, err error) {
	op := rados.CreateReadOp()
	defer op.Release()
	count = make([]byte, 8)
	op.Read(0, count)
	step := op.GetOmapValuesByKeys([]string{nameKeyPrefix + name})
	err = op.Operate(j.io, j.obj, rados.OperationNoFlag)
	if rcsi.Errno(err) == syscall.ENOENT {
		return make([]byte, 8), false, "", nil
	}
	if err != nil {
		return nil, false, "", fmt.Errorf("journal: reading %q: %w", nameKeyPrefix+name, err)
	}
	kv, err := step.Next()
	if err != nil {
		return nil, false, "", fmt.Errorf("journal: reading %q: %w", nameKeyPrefix+name, err)
	}
	if kv != nil {
		got = string(kv.Value)
	}
	return count, true, got, nil
}

// cmpExtMismatch says a compare-extent step found other bytes: RADOS
// answers -(MAX_ERRNO + offset of the first difference).
func cmpExtMismatch(err error) bool { return rcsi.Errno(err) >= 4095 }

// NewJournal uses the group's journal object in io's pool and namespace.
func NewJournal(io *rados.IOContext, group string) *Journal {
	return &Journal{io: io, obj: JournalObject(group)}
}

// Lookup returns the subvolume reserved for request name, or "" if none.
func (j *Journal) Lookup(name string) (string, error) { return j.get(nameKeyPrefix + name) }

// RequestName returns the request name that reserved subvolume sv, or "" if none.
func (j *Journal) RequestName(sv string) (string, error) { return j.get(volKeyPrefix + sv) }

// TrashEntry returns the trash entry promised for sv, or "" if none.
func (j *Journal) TrashEntry(sv string) (string, error) { return j.get(trashKeyPrefix + sv) }

// Reserve records name <-> sv.
func (j *Journal) Reserve(name, sv string) error {
	op := rados.CreateWriteOp()
	defer op.Release()
	op.SetOmap(map[string][]byte{nameKeyPrefix + name: []byte(sv), volKeyPrefix + sv: []byte(name)})
	if err := op.Operate(j.io, j.obj, rados.OperationNoFlag); err != nil {
		return fmt.Errorf("journal: reserving %q: %w", name, err)
	}
	return nil
}

// Promise records that sv will be moved to trash entry and purged, and frees
// its request name, in one operation: from here on the journal keeps track of
// sv until Done.
func (j *Journal) Promise(name, sv, trash string) error {
	op := rados.CreateWriteOp()
	defer op.Release()
	op.SetOmap(map[string][]byte{trashKeyPrefix + sv: []byte(trash)})
	keys := []string{volKeyPrefix + sv}
	if name != "" {
		keys = append(keys, nameKeyPrefix+name)
	}
	op.RmOmapKeys(keys)
	if err := op.Operate(j.io, j.obj, rados.OperationNoFlag); err != nil {
		return fmt.Errorf("journal: recording removal of %s: %w", sv, err)
	}
	return nil
}

// Release removes a reservation without a removal promise (nothing to purge).
func (j *Journal) Release(name, sv string) error {
	keys := []string{volKeyPrefix + sv}
	if name != "" {
		keys = append(keys, nameKeyPrefix+name)
	}
	return j.rm(keys, "releasing "+sv)
}

// Done forgets the removal promise of sv, once it is purged.
func (j *Journal) Done(sv string) error {
	return j.rm([]string{trashKeyPrefix + sv}, "finishing removal of "+sv)
}

func (j *Journal) rm(keys []string, what string) error {
	op := rados.CreateWriteOp()
	defer op.Release()
	op.AssertExists()
	op.RmOmapKeys(keys)
	err := op.Operate(j.io, j.obj, rados.OperationNoFlag)
	if err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return fmt.Errorf("journal: %s: %w", what, err)
	}
	return nil
}

// Subvolumes lists reserved subvolume names in order.
func (j *Journal) Subvolumes() ([]string, error) {
	kv, err := j.list(volKeyPrefix, 0)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(kv))
	for i, e := range kv {
		out[i] = e[0]
	}
	return out, nil
}

// Promised lists up to max (0: all) promised removals as [subvolume, trash entry] pairs.
func (j *Journal) Promised(max int) ([][2]string, error) { return j.list(trashKeyPrefix, max) }

func (j *Journal) list(prefix string, max int) ([][2]string, error) {
	kv, err := rcsi.OmapList(j.io, j.obj, prefix, "", max)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	return kv, nil
}

func (j *Journal) get(key string) (string, error) {
	op := rados.CreateReadOp()
	defer op.Release()
	step := op.GetOmapValuesByKeys([]string{key})
	err := op.Operate(j.io, j.obj, rados.OperationNoFlag)
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
