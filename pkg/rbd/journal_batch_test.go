package rbd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Concurrent reservations share turns: one turn at a time, every reservation
// served exactly once, and turns serve several at once.
func TestBatcherSharesTurns(t *testing.T) {
	b := &batcher{}
	var running, served, turns, biggest atomic.Int32
	run := func(_ context.Context, batch []*reservation) error {
		if running.Add(1) != 1 {
			t.Error("two turns ran at once")
		}
		defer running.Add(-1)
		turns.Add(1)
		if n := int32(len(batch)); n > biggest.Load() {
			biggest.Store(n)
		}
		time.Sleep(2 * time.Millisecond) // a lock, a read, a write, an unlock
		for _, r := range batch {
			r.got, r.fresh = r.image, true
			served.Add(1)
		}
		return nil
	}
	const n = 64
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &reservation{key: fmt.Sprint("n", i), image: fmt.Sprint("img", i)}
			b.do(context.Background(), r, run)
			if r.err != nil || r.got != r.image || !r.fresh {
				t.Errorf("reservation %d: %q fresh %v err %v", i, r.got, r.fresh, r.err)
			}
		}()
	}
	wg.Wait()
	if served.Load() != n || b.busy || len(b.queue) != 0 {
		t.Fatalf("served %d of %d; busy %v, %d queued after all returned", served.Load(), n, b.busy, len(b.queue))
	}
	if turns.Load() >= n || biggest.Load() < 2 {
		t.Errorf("%d turns for %d reservations, biggest %d: no turn was shared", turns.Load(), n, biggest.Load())
	}
}

// A turn's error is each of its reservations'; callers whose context ends
// while queued get ErrReserveBusy without waiting for the turn in flight,
// and the batcher serves later callers afterwards (the lead is not lost).
func TestBatcherErrorsAndAbandon(t *testing.T) {
	b := &batcher{}
	release, entered := make(chan struct{}), make(chan struct{}, 10)
	failing := errors.New("osd down")
	blocking := func(_ context.Context, batch []*reservation) error {
		entered <- struct{}{}
		<-release
		return failing
	}
	first := &reservation{key: "a", image: "ia"}
	firstDone := make(chan struct{})
	go func() { b.do(context.Background(), first, blocking); close(firstDone) }()
	<-entered // the leader's turn is in flight

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	var wg sync.WaitGroup
	queued := make([]*reservation, 5)
	for i := range queued {
		queued[i] = &reservation{key: fmt.Sprint("q", i), image: fmt.Sprint("iq", i)}
		wg.Add(1)
		go func() { defer wg.Done(); b.do(ctx, queued[i], blocking) }()
	}
	wg.Wait() // they gave up while the turn still runs
	for i, r := range queued {
		if !errors.Is(r.err, ErrReserveBusy) {
			t.Errorf("queued reservation %d: err %v, want ErrReserveBusy", i, r.err)
		}
	}
	close(release)
	<-firstDone
	if !errors.Is(first.err, failing) || first.got != "" || first.fresh {
		t.Errorf("the turn's reservation: %q fresh %v err %v, want the turn's error", first.got, first.fresh, first.err)
	}
	later := &reservation{key: "b", image: "ib"}
	done := make(chan struct{})
	go func() {
		b.do(context.Background(), later, func(_ context.Context, batch []*reservation) error {
			for _, r := range batch {
				r.got, r.fresh = r.image, true
			}
			return nil
		})
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a reservation after abandoned ones was never served: the lead was lost")
	}
	if later.got != "ib" || !later.fresh || later.err != nil {
		t.Errorf("later reservation: %q fresh %v err %v", later.got, later.fresh, later.err)
	}
}

// A waiter chosen to lead whose context has ended passes the lead on.
func TestBatcherLeadPassedOnByAbandoner(t *testing.T) {
	b := &batcher{}
	release, entered := make(chan struct{}), make(chan struct{}, 10)
	ok := func(_ context.Context, batch []*reservation) error {
		entered <- struct{}{}
		<-release
		for _, r := range batch {
			r.got = r.image
		}
		return nil
	}
	go b.do(context.Background(), &reservation{key: "a", image: "ia"}, ok)
	<-entered
	gone, cancel := context.WithCancel(context.Background())
	abandoner := &reservation{key: "x", image: "ix"}
	abandoned := make(chan struct{})
	go func() { b.do(gone, abandoner, ok); close(abandoned) }()
	waitQueued(t, b, 1)
	next := &reservation{key: "y", image: "iy"}
	nextDone := make(chan struct{})
	go func() { b.do(context.Background(), next, ok); close(nextDone) }()
	waitQueued(t, b, 2)
	// The turn ends and hands the lead to the abandoner, whose context
	// ends at the same moment.
	cancel()
	close(release)
	<-abandoned
	select {
	case <-nextDone:
	case <-time.After(5 * time.Second):
		t.Fatal("the reservation queued behind an abandoned leader was never served")
	}
	if next.got != "iy" {
		t.Errorf("next: got %q err %v", next.got, next.err)
	}
}

func waitQueued(t *testing.T, b *batcher, n int) {
	t.Helper()
	for i := 0; i < 500; i++ {
		b.mu.Lock()
		q := len(b.queue)
		b.mu.Unlock()
		if q == n {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("never %d queued", n)
}

// A turn waits as long as any of its callers does: the leader's context
// ending does not end the turn for the others.
func TestBatcherTurnOutlivesLeader(t *testing.T) {
	b := &batcher{}
	release, entered := make(chan struct{}), make(chan struct{}, 10)
	first := func(_ context.Context, batch []*reservation) error {
		entered <- struct{}{}
		<-release
		return nil
	}
	go b.do(context.Background(), &reservation{key: "a"}, first)
	<-entered
	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	var turnErr, allErr error
	second := func(ctx context.Context, batch []*reservation) error {
		cancelLeader() // the leader's caller gives up mid-turn
		time.Sleep(10 * time.Millisecond)
		turnErr = ctx.Err()
		return nil
	}
	done := make(chan struct{}, 2)
	go func() { b.do(leaderCtx, &reservation{key: "b"}, second); done <- struct{}{} }()
	waitQueued(t, b, 1)
	other, cancelOther := context.WithCancel(context.Background())
	go func() { b.do(other, &reservation{key: "c"}, second); done <- struct{}{} }()
	waitQueued(t, b, 2)
	close(release) // b leads the next turn, c in it
	<-done
	<-done
	if turnErr != nil {
		t.Errorf("the turn's context ended with its leader's (%v) while another caller still waited", turnErr)
	}
	ctx, stop := allDone([]*reservation{{ctx: leaderCtx}, {ctx: other}})
	defer stop()
	cancelOther()
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		allErr = errors.New("still live")
	}
	if allErr != nil {
		t.Error("allDone's context outlived every caller's")
	}
}
