package csi

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Concurrent probes of one path share one run; callers that give up leave
// no goroutine behind; the next probe after the first returns runs anew.
func TestProberOneFlightPerKey(t *testing.T) {
	var p prober
	release := make(chan struct{})
	var runs atomic.Int32
	hang := func() (any, error) {
		runs.Add(1)
		<-release
		return "done", nil
	}
	base := runtime.NumGoroutine()
	var wg sync.WaitGroup
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.do(context.Background(), "k", 20*time.Millisecond, hang); err != ErrHung {
				t.Errorf("probe of a hung path: %v, want ErrHung", err)
			}
		}()
	}
	wg.Wait()
	if runs.Load() != 1 || p.inflight() != 1 {
		t.Fatalf("200 probes of one hung key ran %d times, %d in flight; want 1 and 1", runs.Load(), p.inflight())
	}
	// The callers' goroutines are on their way out once wg.Wait returns.
	for i := 0; runtime.NumGoroutine() > base+1; i++ {
		if i > 200 {
			t.Fatalf("%d goroutines after 200 timed-out probes, %d before: want at most one more", runtime.NumGoroutine(), base)
		}
		time.Sleep(10 * time.Millisecond)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.do(ctx, "k", time.Minute, hang); err != context.Canceled {
		t.Fatalf("probe with a cancelled context: %v", err)
	}
	close(release)
	for p.inflight() != 0 {
		time.Sleep(time.Millisecond)
	}
	v, err := p.do(context.Background(), "k", time.Second, func() (any, error) { return "fresh", nil })
	if err != nil || v != "fresh" || runs.Load() != 1 {
		t.Fatalf("probe after the hung one returned: %v %v (runs %d)", v, err, runs.Load())
	}
}

// ProbeDir keeps the raw errno (MountLost reads it) and answers for a directory.
func TestProbeDirAndMountLost(t *testing.T) {
	dir := t.TempDir()
	if err := ProbeDir(context.Background(), dir); err != nil {
		t.Fatalf("ProbeDir of a directory: %v", err)
	}
	file := filepath.Join(dir, "f")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := ProbeDir(context.Background(), file); !errors.Is(err, unix.ENOTDIR) || MountLost(err) {
		t.Errorf("ProbeDir of a file: %v, want ENOTDIR and not a lost mount", err)
	}
	for _, e := range []error{unix.ENOTCONN, unix.ECONNABORTED, unix.ESHUTDOWN, unix.ESTALE} {
		if !MountLost(&os.PathError{Op: "open", Path: dir, Err: e}) {
			t.Errorf("%v is a lost mount", e)
		}
	}
	for _, e := range []error{unix.EIO, unix.EACCES, ErrHung, context.DeadlineExceeded} {
		if MountLost(e) {
			t.Errorf("%v is no evidence of a lost mount", e)
		}
	}
}
