package csi

import (
	"context"
	"errors"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/mount-utils"
)

// ProbeTimeout bounds how long a call waits on a filesystem probe (stat,
// statfs, mount-point check) of a mount that may hang.
const ProbeTimeout = 5 * time.Second

// ErrHung is a probe's answer when the filesystem did not answer within ProbeTimeout.
var ErrHung = errors.New("no answer in time")

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
// result at most timeout (ErrHung) or until ctx ends.
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
		return nil, ErrHung
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
	return Coded(codes.Unavailable, "%s %s: no answer within %s (hung mount?)", what, path, ProbeTimeout)
}

// ProbeError turns a probe's failure into a status naming what was asked
// (Unavailable for a probe that did not return).
func ProbeError(err error, what, path string) error {
	if errors.Is(err, ErrHung) {
		return hungError(what, path)
	}
	return Coded(Code(err), "%s %s: %v", what, path, err)
}

// IsMountPoint is mount-utils' IsMountPoint, bounded by ProbeTimeout (a
// shared probe of path).
func IsMountPoint(ctx context.Context, m mount.Interface, path string) (bool, error) {
	v, err := probes.do(ctx, "mnt\x00"+path, ProbeTimeout, func() (any, error) { return m.IsMountPoint(path) })
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, err
		}
		return false, ProbeError(err, "checking whether a mount point:", path)
	}
	return v.(bool), nil
}

// IsLikelyNotMountPoint is mount-utils' IsLikelyNotMountPoint, bounded by
// ProbeTimeout (a shared probe of path).
func IsLikelyNotMountPoint(ctx context.Context, m mount.Interface, path string) (bool, error) {
	v, err := probes.do(ctx, "notmnt\x00"+path, ProbeTimeout, func() (any, error) { return m.IsLikelyNotMountPoint(path) })
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return true, err
		}
		return true, ProbeError(err, "checking whether a mount point:", path)
	}
	return v.(bool), nil
}

// StatPath is stat(2) of path bounded by ProbeTimeout; the raw error (e.g.
// ENOTCONN from a FUSE mount whose daemon died) is kept for errors.Is.
func StatPath(ctx context.Context, path string) error {
	_, err := probes.do(ctx, "stat\x00"+path, ProbeTimeout, func() (any, error) {
		var st unix.Stat_t
		return nil, unix.Stat(path, &st)
	})
	return err
}

// ProbeDir opens dir as a directory and closes it, bounded by ProbeTimeout
// (a shared probe of dir). Unlike stat, which the kernel may answer from its
// attribute cache, opening a FUSE directory always reaches the daemon. The
// raw error is kept for errors.Is (MountLost).
func ProbeDir(ctx context.Context, dir string) error {
	_, err := probes.do(ctx, "opendir\x00"+dir, ProbeTimeout, func() (any, error) {
		fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		return nil, unix.Close(fd)
	})
	return err
}

// Probe runs f as a shared probe under key: a probe of key already in flight
// is joined, not repeated, and the caller waits at most ProbeTimeout
// (ErrHung) or until ctx ends.
func Probe(ctx context.Context, key string, f func() (any, error)) (any, error) {
	return probes.do(ctx, key, ProbeTimeout, f)
}
