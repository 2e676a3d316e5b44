package csi

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/google/uuid"
	"k8s.io/klog/v2"
)

// ErrLockBusy says another holder kept an ObjectLock until the caller's
// context ended.
var ErrLockBusy = errors.New("another caller holds the lock")

// ObjectLock is an exclusive RADOS lock on one object, shared by every process
// that uses the same object and lock name: it makes a lookup and the write
// that follows one step across controller processes (two replicas, or an old
// and a new one during a rollout).
type ObjectLock struct {
	IO     *rados.IOContext
	Object string // object the lock is on
	Name   string // lock name
	// Where names the object (cluster, pool, namespace, object) for logs
	// and for the stale-lock bookkeeping below.
	Where string
	// Client is IO's RADOS client ("client.<id>").
	Client string
	// TTL frees the lock after a holder crashed; it must outlast what
	// the holder runs under it.
	TTL time.Duration
}

// staleLocks remembers, per object, locks whose holder was one of this
// process's connections that the cluster blocklisted or shut down before it
// could unlock. The cluster refuses that client every further operation, so
// its lock guards nothing: the next Do on a live connection breaks it instead
// of waiting out the TTL.
var staleLocks = struct {
	sync.Mutex
	m map[string][]staleLock
}{m: map[string][]staleLock{}}

type staleLock struct{ client, cookie string }

// Do runs fn holding the lock. Waiting for the lock ends with ctx
// (ErrLockBusy).
func (l ObjectLock) Do(ctx context.Context, fn func() error) error {
	cookie := uuid.NewString()
	for {
		ret, err := l.IO.LockExclusive(l.Object, l.Name, cookie, "", l.TTL, nil)
		if err != nil {
			return fmt.Errorf("locking %s: %w", l.Where, err)
		}
		if ret == 0 {
			break
		}
		l.breakStale() // EBUSY: held by another caller
		select {
		case <-ctx.Done():
			return ErrLockBusy
		case <-time.After(20 * time.Millisecond):
		}
	}
	defer func() {
		if _, err := l.IO.Unlock(l.Object, l.Name, cookie); err != nil {
			klog.InfoS("unlock failed; the lock expires by itself", "lock", l.Name, "object", l.Where, "ttl", l.TTL, "err", err)
			if Broken(err) && l.Client != "" {
				staleLocks.Lock()
				staleLocks.m[l.Where] = append(staleLocks.m[l.Where], staleLock{l.Client, cookie})
				staleLocks.Unlock()
			}
		}
	}()
	return fn()
}

// breakStale breaks the stale locks remembered for l's object.
func (l ObjectLock) breakStale() {
	staleLocks.Lock()
	defer staleLocks.Unlock()
	var keep []staleLock
	for _, s := range staleLocks.m[l.Where] {
		if s.client == l.Client {
			keep = append(keep, s) // still our connection: not ours to break
			continue
		}
		// 0: broken; -ENOENT: already gone (expired); -EINVAL: never ours.
		ret, err := l.IO.BreakLock(l.Object, l.Name, s.client, s.cookie)
		if err != nil {
			klog.InfoS("breaking a blocklisted client's lock failed; will retry", "lock", l.Name, "object", l.Where, "client", s.client, "err", err)
			keep = append(keep, s)
			continue
		}
		klog.InfoS("dropped the lock of a blocklisted connection", "lock", l.Name, "object", l.Where, "client", s.client, "ret", ret)
	}
	if len(keep) == 0 {
		delete(staleLocks.m, l.Where)
	} else {
		staleLocks.m[l.Where] = keep
	}
}
