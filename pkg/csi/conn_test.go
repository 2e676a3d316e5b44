package csi

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestBudget(t *testing.T) {
	if got := Budget(context.Background(), 7*time.Second); got != 7*time.Second {
		t.Errorf("no deadline: %s, want the maximum", got)
	}
	for _, tc := range []struct{ left, min, max time.Duration }{
		{20 * time.Second, 18900 * time.Millisecond, 19 * time.Second}, // a second's margin
		{2 * time.Second, 1750 * time.Millisecond, 1800 * time.Millisecond},
	} {
		c, cancel := context.WithTimeout(context.Background(), tc.left)
		got := Budget(c, time.Minute)
		cancel()
		if got < tc.min || got > tc.max {
			t.Errorf("%s left: budget %s, want %s..%s", tc.left, got, tc.min, tc.max)
		}
	}
}

// Bounded answers late() before the deadline while f blocks, and f's own
// answer when f is in time; f's context ends at the budget.
func TestBounded(t *testing.T) {
	c, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	release := make(chan struct{})
	fDone := make(chan time.Duration, 1)
	start := time.Now()
	err := Bounded(c, func(ctx context.Context) error {
		<-ctx.Done()
		fDone <- time.Since(start)
		<-release
		return nil
	}, func(waited time.Duration) error {
		return &UnreachableError{Cluster: "c1", Monitors: "10.0.0.1:6789", Waited: waited}
	})
	took := time.Since(start)
	close(release)
	if status.Code(err) != codes.Unavailable || took >= 500*time.Millisecond || took < 400*time.Millisecond {
		t.Errorf("blocked f: %v after %s, want Unavailable between 400 and 500 ms", err, took)
	}
	if d := <-fDone; d > took {
		t.Errorf("f's context ended after %s, later than Bounded answered (%s)", d, took)
	}
	want := errors.New("f's error")
	if err := Bounded(c, func(context.Context) error { return want }, nil); err != want {
		t.Errorf("quick f: %v, want f's error", err)
	}
	if err := Bounded(context.Background(), func(context.Context) error { return want }, nil); err != want {
		t.Errorf("no deadline: %v, want f's error", err)
	}
}

// cephErr is an error with an errno, as go-ceph's are.
type cephErr int

func (e cephErr) Error() string  { return fmt.Sprintf("ret=%d", int(e)) }
func (e cephErr) ErrorCode() int { return int(e) }

func TestBroken(t *testing.T) {
	for err, want := range map[error]bool{
		fmt.Errorf("x: %w", cephErr(-int(syscall.ESHUTDOWN))): true,
		cephErr(-int(syscall.ENOTCONN)):                       true,
		cephErr(-int(syscall.ETIMEDOUT)):                      false,
		rados.ErrNotFound:                                     false,
		nil:                                                   false,
	} {
		if got := Broken(err); got != want {
			t.Errorf("Broken(%v) = %v, want %v", err, got, want)
		}
	}
	u := &UnreachableError{Cluster: "c1", Monitors: "10.0.0.1:6789", Waited: time.Second}
	if s := status.Convert(u); s.Code() != codes.Unavailable || s.Message() != `cluster "c1": monitors 10.0.0.1:6789 did not answer within 1s` {
		t.Errorf("UnreachableError status: %v", s)
	}
}
