package rbd

// Group reservation: the CreateVolume calls of this process that reserve
// names in the same journal at the same time share one turn under the
// journal's RADOS lock (one lock, one lookup, one write, one unlock for all
// of them) instead of each polling for the lock in turn.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// maxBatch bounds the reservations one turn under the lock serves.
const maxBatch = 128

// reservation is one LookupOrReserve call waiting for, or served by, a turn:
// if key has no value, image becomes its value and back that of backKey.
type reservation struct {
	key, image    string
	backKey, back string
	wake          chan struct{} // signalled when done, or when it is to lead
	ctx           context.Context
	// Set under the batcher's mu.
	done, lead bool
	got        string
	fresh      bool
	err        error
}

// batcher queues the reservations of one journal made through one
// connection. One waiter at a time, the leader, runs turns for the queue.
type batcher struct {
	mu    sync.Mutex
	queue []*reservation
	busy  bool // a leader is running a turn or has been chosen
}

var batchers = struct {
	sync.Mutex
	m map[string]*batcher
}{m: map[string]*batcher{}}

// batcherFor returns the batcher of key (a journal and a connection); there
// is one per pool, namespace and connection this process uses.
func batcherFor(key string) *batcher {
	batchers.Lock()
	defer batchers.Unlock()
	b := batchers.m[key]
	if b == nil {
		b = &batcher{}
		batchers.m[key] = b
	}
	return b
}

// LookupOrReserve returns the image reserved for name, reserving image for it
// if there is none; fresh says image was reserved now. Lookup and reservation
// happen under the journal object's exclusive RADOS lock, so concurrent
// callers in any process agree on one image; this process's concurrent
// callers share turns under the lock. Waiting ends with ctx (ErrReserveBusy);
// a reservation whose turn had begun may still be written then, which the
// caller's retry finds.
func (j *Journal) LookupOrReserve(ctx context.Context, name, image string) (got string, fresh bool, err error) {
	return j.lookupOrReserve(ctx, &reservation{key: nameKeyPrefix + name, image: image, backKey: imageKeyPrefix + image, back: name})
}

func (j *Journal) lookupOrReserve(ctx context.Context, r *reservation) (got string, fresh bool, err error) {
	batcherFor(j.where+"/"+journalObject+"\x00"+j.client).do(ctx, r, j.reserveAll)
	return r.got, r.fresh, r.err
}

// do queues r and returns once a turn served it (or ctx ended while it was
// still queued). The first caller to find the batcher idle leads: it runs
// turns through run, then hands the lead to the oldest waiter.
func (b *batcher) do(ctx context.Context, r *reservation, run func(context.Context, []*reservation) error) {
	r.wake, r.ctx = make(chan struct{}, 1), ctx
	b.mu.Lock()
	b.queue = append(b.queue, r)
	lead := !b.busy
	b.busy = true
	b.mu.Unlock()
	for {
		if lead {
			b.turn(run)
		} else {
			select {
			case <-r.wake:
			case <-ctx.Done():
				if !b.abandon(r) {
					<-r.wake // its turn has begun: bounded by the lock's operations
				}
			}
		}
		b.mu.Lock()
		done := r.done
		lead, r.lead = r.lead, false
		b.mu.Unlock()
		if done {
			return
		}
	}
}

// abandon takes r, whose caller's context ended, out of the queue, ending it
// with ErrReserveBusy; a reservation chosen to lead passes the lead on. It
// reports false if r's turn has begun: that turn's leader ends r.
func (b *batcher) abandon(r *reservation) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, q := range b.queue {
		if q == r {
			b.queue = append(b.queue[:i], b.queue[i+1:]...)
			r.done, r.err = true, ErrReserveBusy
			if r.lead {
				r.lead = false
				b.handOverLocked()
			}
			return true
		}
	}
	return false
}

// handOverLocked makes the first queued reservation's caller the next leader,
// or marks the batcher idle.
func (b *batcher) handOverLocked() {
	if len(b.queue) == 0 {
		b.busy = false
		return
	}
	next := b.queue[0]
	next.lead = true
	signal(next.wake)
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// turn serves the queued reservations (up to maxBatch) through run, wakes
// their callers and hands the lead on. run fills in each result; its error
// is every reservation's. Its context ends once every caller's has ended,
// so that no caller's wait ends with another's deadline.
func (b *batcher) turn(run func(context.Context, []*reservation) error) {
	b.mu.Lock()
	n := min(len(b.queue), maxBatch)
	batch := append([]*reservation(nil), b.queue[:n]...)
	b.queue = b.queue[n:]
	b.mu.Unlock()
	ctx, stop := allDone(batch)
	defer stop()
	start := time.Now()
	err := run(ctx, batch)
	klog.V(4).InfoS("journal reservations", "batch", len(batch), "duration", time.Since(start), "err", err)
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range batch {
		if err != nil {
			r.got, r.fresh, r.err = "", false, err
		}
		r.done = true
		signal(r.wake)
	}
	b.handOverLocked()
}

// reserveAll looks up every name of batch and reserves the image of each
// that has none, holding the journal object's RADOS lock: one read, one
// write. It fills in each reservation's result; the error is the turn's.
func (j *Journal) reserveAll(ctx context.Context, batch []*reservation) error {
	lock := rcsi.ObjectLock{IO: j.io, Object: journalObject, Name: reserveLock, Where: j.where + "/" + journalObject, Client: j.client, TTL: reserveLockTTL}
	err := lock.Do(ctx, func() error {
		rcsi.PausePoint("create-reserve-locked")
		found, err := j.lookupAll(batch)
		if err != nil {
			return err
		}
		pairs := map[string][]byte{}
		for _, r := range batch {
			if r.got = found[r.key]; r.got == "" {
				pairs[r.key], pairs[r.backKey] = []byte(r.image), []byte(r.back)
			}
		}
		if len(pairs) == 0 {
			return nil
		}
		op := rados.CreateWriteOp()
		defer op.Release()
		op.SetOmap(pairs)
		if err := op.Operate(j.io, journalObject, rados.OperationNoFlag); err != nil {
			return fmt.Errorf("journal: reserving %d names: %w", len(pairs)/2, err)
		}
		for _, r := range batch {
			if r.got == "" {
				r.got, r.fresh = r.image, true
			}
		}
		return nil
	})
	if errors.Is(err, rcsi.ErrLockBusy) {
		return ErrReserveBusy
	}
	return err
}

// lookupAll reads the values of the keys of batch in one operation: key ->
// value for those that have one.
func (j *Journal) lookupAll(batch []*reservation) (map[string]string, error) {
	keys := make([]string, len(batch))
	for i, r := range batch {
		keys[i] = r.key
	}
	op := rados.CreateReadOp()
	defer op.Release()
	step := op.GetOmapValuesByKeys(keys)
	found := map[string]string{}
	err := op.Operate(j.io, journalObject, rados.OperationNoFlag)
	if rcsi.Errno(err) == syscall.ENOENT {
		return found, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal: looking up %d names: %w", len(batch), err)
	}
	for {
		kv, err := step.Next()
		if err != nil {
			return nil, fmt.Errorf("journal: looking up %d names: %w", len(batch), err)
		}
		if kv == nil {
			return found, nil
		}
		found[kv.Key] = string(kv.Value)
	}
}

// allDone returns a context that ends when the contexts of all of batch
// have ended, and a function that releases it.
func allDone(batch []*reservation) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(batch[0].ctx))
	var left atomic.Int32
	left.Store(int32(len(batch)))
	stops := make([]func() bool, len(batch))
	for i, r := range batch {
		stops[i] = context.AfterFunc(r.ctx, func() {
			if left.Add(-1) == 0 {
				cancel()
			}
		})
	}
	return ctx, func() {
		for _, stop := range stops {
			stop()
		}
		cancel()
	}
}
