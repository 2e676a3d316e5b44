package csi

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestKeyLocksSerialisesOneKey(t *testing.T) {
	var l KeyLocks
	var inside, maxInside atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock, err := l.Lock(context.Background(), "k")
			if err != nil {
				t.Error(err)
				return
			}
			n := inside.Add(1)
			for {
				m := maxInside.Load()
				if n <= m || maxInside.CompareAndSwap(m, n) {
					break
				}
			}
			time.Sleep(time.Millisecond)
			inside.Add(-1)
			unlock()
		}()
	}
	wg.Wait()
	if maxInside.Load() != 1 {
		t.Fatalf("%d holders at once, want 1", maxInside.Load())
	}
	if l.Len() != 0 {
		t.Fatalf("%d keys left behind", l.Len())
	}
}

func TestKeyLocksContextEnds(t *testing.T) {
	var l KeyLocks
	unlock, _ := l.Lock(context.Background(), "k")
	other, _ := l.Lock(context.Background(), "other") // a different key never waits
	other()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := l.Lock(ctx, "k"); err == nil {
		t.Fatal("second Lock of a held key succeeded")
	}
	unlock()
	u, err := l.Lock(context.Background(), "k")
	if err != nil {
		t.Fatal(err)
	}
	u()
	if l.Len() != 0 {
		t.Fatalf("%d keys left behind", l.Len())
	}
}
