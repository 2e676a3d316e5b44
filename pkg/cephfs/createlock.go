package cephfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/cephfs"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// createLock is a file in a subvolume's base directory on which whoever
// makes that subvolume (or clears the leftovers of an interrupted create)
// holds an MDS flock, so that two controller processes never do it at once.
// The MDS drops the flock of a process that died along with its session
// (session timeout, or the reclaim by its restart). The file stays until the
// subvolume is removed: unlinking it would let a waiter and a newcomer lock
// two different files.
const createLock = ".rookzmq-create.lock"

// errCreateBusy says another process kept the create lock until ctx ended.
var errCreateBusy = errors.New("another controller is creating this subvolume")

// lockOwners numbers flock owners, one per holder in this process.
var lockOwners atomic.Uint64

// exclusive runs fn holding the create lock of subvolume name. Waiting ends
// with ctx (errCreateBusy); a missing group is errNoGroup.
func (s *subvolumes) exclusive(ctx context.Context, name string, fn func() error) error {
	base := s.base(name)
	if err := s.mnt.MakeDir(base, subvolumeMode); err != nil && rcsi.Errno(err) != syscall.EEXIST {
		if rcsi.Errno(err) == syscall.ENOENT {
			return errNoGroup
		}
		return fmt.Errorf("creating %s: %w", base, err)
	}
	f, err := s.mnt.Open(base+"/"+createLock, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("opening %s/%s: %w", base, createLock, err)
	}
	defer f.Close()
	owner := lockOwners.Add(1)
	for {
		err := f.Flock(cephfs.LockEX|cephfs.LockNB, owner)
		if err == nil {
			break
		}
		if rcsi.Errno(err) != syscall.EWOULDBLOCK {
			return fmt.Errorf("locking %s/%s: %w", base, createLock, err)
		}
		select {
		case <-ctx.Done():
			return errCreateBusy
		case <-time.After(20 * time.Millisecond):
		}
	}
	defer f.Flock(cephfs.LockUN, owner)
	return fn()
}
