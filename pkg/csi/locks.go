package csi

import (
	"context"
	"sync"
)

// KeyLocks serialises operations per key (a request name or a volume ID) so that
// concurrent retries of one CSI call never run side by side. Different keys never
// wait for each other.
type KeyLocks struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	ch   chan struct{} // holds one token while the key is free
	refs int
}

// Lock waits for key until ctx ends; it returns the function that releases the key.
func (l *KeyLocks) Lock(ctx context.Context, key string) (unlock func(), err error) {
	l.mu.Lock()
	if l.locks == nil {
		l.locks = map[string]*keyLock{}
	}
	k := l.locks[key]
	if k == nil {
		k = &keyLock{ch: make(chan struct{}, 1)}
		k.ch <- struct{}{}
		l.locks[key] = k
	}
	k.refs++
	l.mu.Unlock()

	release := func() {
		l.mu.Lock()
		if k.refs--; k.refs == 0 {
			delete(l.locks, key)
		}
		l.mu.Unlock()
	}
	select {
	case <-k.ch:
		return func() { k.ch <- struct{}{}; release() }, nil
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
}

// Len reports how many keys are held or awaited; for tests.
func (l *KeyLocks) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.locks)
}
