package rbd

import (
	"context"
	"errors"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/mount-utils"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// probeTimeout bounds how long a call waits on a filesystem probe (stat,
// statfs, mount-point check) of a mount that may hang.
const probeTimeout = 5 * time.Second

var errHung = errors.New("no answer in time")

// prober runs filesystem probes that a hung FUSE or network mount can block
// forever. Probes with the same key never overlap: a caller that finds one in
// flight waits for it instead of starting another, so a hung path holds one
// goroutine (and OS thread) however often it is asked about, and a waiting
// caller leaves nothing behind when it gives up.
type prober struct {
	mu      sync.Mutex
	flights map[string]*flight
}

type flight struct {
	done chan struct{} // closed when the probe returned
	val  any
	err  error
}

// do runs f under key unless a probe of key is in flight, and waits for the
// result at most timeout (errHung) or until ctx ends.
func (p *prober) do(ctx context.Context, key string, timeout time.Duration, f func() (any, error)) (any, error) {
	p.mu.Lock()
	if p.flights == nil {
		p.flights = map[string]*flight{}
	}
	fl := p.flights[key]
	if fl == nil {
		fl = &flight{done: make(chan struct{})}
		p.flights[key] = fl
		go func() {
			fl.val, fl.err = f()
			p.mu.Lock()
			delete(p.flights, key)
			p.mu.Unlock()
			close(fl.done)
		}()
	}
	p.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-fl.done:
		return fl.val, fl.err
	case <-t.C:
		return nil, errHung
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// inflight counts probes still running (for tests and metrics).
func (p *prober) inflight() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.flights)
}

// probes is the node's one prober: probes of a path are shared by every call.
var probes prober

// hungError is the Unavailable answer for a probe that did not return.
func hungError(what, path string) error {
	return rcsi.Coded(codes.Unavailable, "%s %s: no answer within %s (hung mount?)", what, path, probeTimeout)
}

// probeErr turns a probe's failure into a status naming what was asked.
func probeErr(err error, what, path string) error {
	if errors.Is(err, errHung) {
		return hungError(what, path)
	}
	return rcsi.Coded(rcsi.Code(err), "%s %s: %v", what, path, err)
}

// isMountPoint is mount-utils' IsMountPoint, bounded by probeTimeout.
func isMountPoint(ctx context.Context, m mount.Interface, path string) (bool, error) {
	v, err := probes.do(ctx, "mnt\x00"+path, probeTimeout, func() (any, error) { return m.IsMountPoint(path) })
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, err
		}
		return false, probeErr(err, "checking whether a mount point:", path)
	}
	return v.(bool), nil
}

// isLikelyNotMountPoint is mount-utils' IsLikelyNotMountPoint, bounded by probeTimeout.
func isLikelyNotMountPoint(ctx context.Context, m mount.Interface, path string) (bool, error) {
	v, err := probes.do(ctx, "notmnt\x00"+path, probeTimeout, func() (any, error) { return m.IsLikelyNotMountPoint(path) })
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return true, err
		}
		return true, probeErr(err, "checking whether a mount point:", path)
	}
	return v.(bool), nil
}

// statPath is stat(2) of path bounded by probeTimeout; the raw error (e.g.
// ENOTCONN from a FUSE mount whose daemon died) is kept for errors.Is.
func statPath(ctx context.Context, path string) error {
	_, err := probes.do(ctx, "stat\x00"+path, probeTimeout, func() (any, error) {
		var st unix.Stat_t
		return nil, unix.Stat(path, &st)
	})
	return err
}
