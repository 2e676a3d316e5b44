package rbd

// The snapshots' part of a pool's journal: which image holds the snapshot of
// which request name, made from which volume, and once made, its size and
// time.

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rados"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

const (
	snapNameKeyPrefix  = "s:" // s:<snapshot request name> -> snapshot image
	snapImageKeyPrefix = "S:" // S:<snapshot image> -> snapRecord
)

// snapRecord is what the journal knows of a snapshot, stored as lines:
// source volume ID, request name (CreateSnapshot refuses names with a
// newline), then, once the snapshot is made, its size in bytes and its
// creation time (Unix nanoseconds).
type snapRecord struct {
	Source, Name string
	Ready        bool
	Size         int64
	Created      time.Time
}

func (r snapRecord) encode() string {
	s := r.Source + "\n" + r.Name
	if r.Ready {
		s += fmt.Sprintf("\n%d\n%d", r.Size, r.Created.UnixNano())
	}
	return s
}

func decodeSnapRecord(v string) (snapRecord, error) {
	f := strings.Split(v, "\n")
	switch len(f) {
	case 2:
		return snapRecord{Source: f[0], Name: f[1]}, nil
	case 4:
		size, err1 := strconv.ParseInt(f[2], 10, 64)
		nanos, err2 := strconv.ParseInt(f[3], 10, 64)
		if err1 == nil && err2 == nil {
			return snapRecord{Source: f[0], Name: f[1], Ready: true, Size: size, Created: time.Unix(0, nanos)}, nil
		}
	}
	return snapRecord{}, fmt.Errorf("journal: malformed snapshot record %q", v)
}

// LookupOrReserveSnapshot returns the image reserved for snapshot request
// name, reserving image (with its source volume ID) if there is none; see
// LookupOrReserve.
func (j *Journal) LookupOrReserveSnapshot(ctx context.Context, name, image, source string) (got string, fresh bool, err error) {
	return j.lookupOrReserve(ctx, &reservation{key: snapNameKeyPrefix + name, image: image,
		backKey: snapImageKeyPrefix + image, back: snapRecord{Source: source, Name: name}.encode()})
}

// SnapshotImage returns the image reserved for snapshot request name, or "".
func (j *Journal) SnapshotImage(name string) (string, error) {
	return j.get(snapNameKeyPrefix + name)
}

// Snapshot returns the record of snapshot image; ok false if there is none.
func (j *Journal) Snapshot(image string) (r snapRecord, ok bool, err error) {
	v, err := j.get(snapImageKeyPrefix + image)
	if err != nil || v == "" {
		return r, false, err
	}
	r, err = decodeSnapRecord(v)
	return r, err == nil, err
}

// SnapshotMade records that snapshot image is made, with its size and time.
func (j *Journal) SnapshotMade(image string, r snapRecord) error {
	op := rados.CreateWriteOp()
	defer op.Release()
	op.AssertExists()
	op.SetOmap(map[string][]byte{snapImageKeyPrefix + image: []byte(r.encode())})
	if err := op.Operate(j.io, journalObject, rados.OperationNoFlag); err != nil {
		return fmt.Errorf("journal: recording snapshot %s: %w", image, err)
	}
	return nil
}

// ReleaseSnapshot removes snapshot image's keys, recording its purge with a
// trash id (see Release).
func (j *Journal) ReleaseSnapshot(name, image, trashID string) error {
	keys := []string{snapImageKeyPrefix + image}
	if name != "" {
		keys = append(keys, snapNameKeyPrefix+name)
	}
	return j.release(keys, image, trashID)
}

// Snapshots lists the snapshot records of the journal by image name.
func (j *Journal) Snapshots() (map[string]snapRecord, error) {
	kv, err := rcsi.OmapList(j.io, journalObject, snapImageKeyPrefix, "", 0)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	out := map[string]snapRecord{}
	for _, e := range kv {
		r, err := decodeSnapRecord(e[1])
		if err != nil {
			klog.Warningf("journal: skipping the snapshot record of image %s: %v", e[0], err)
			continue
		}
		out[e[0]] = r
	}
	return out, nil
}
