package cephfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/mount-utils"
)

// probeTimeout bounds a filesystem probe of a mount that may hang.
const probeTimeout = 5 * time.Second

var errHung = errors.New("no answer in time")

// prober runs filesystem probes that a hung FUSE or network mount can block
// forever. Probes with the same key never overlap: a caller that finds one in
// flight waits for it, so a hung mount holds one goroutine however often it
// is asked about.
type prober struct {
	mu      sync.Mutex
	flights map[string]*flight
}

type flight struct {
	done chan struct{} // closed when the probe returned
	err  error
}

func (p *prober) do(ctx context.Context, key string, timeout time.Duration, f func() error) error {
	p.mu.Lock()
	if p.flights == nil {
		p.flights = map[string]*flight{}
	}
	fl := p.flights[key]
	if fl == nil {
		fl = &flight{done: make(chan struct{})}
		p.flights[key] = fl
		go func() {
			fl.err = f()
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
		return fl.err
	case <-t.C:
		return errHung
	case <-ctx.Done():
		return ctx.Err()
	}
}

// probes is shared by every mounter of the process.
var probes prober

// probeDir opens dir as a directory and closes it, bounded by probeTimeout.
// Unlike stat, which the kernel may answer from its attribute cache, opening
// a FUSE directory always reaches the daemon. The raw errno is kept for
// errors.Is.
func probeDir(ctx context.Context, dir string) error {
	return probes.do(ctx, "opendir\x00"+dir, probeTimeout, func() error {
		fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		return unix.Close(fd)
	})
}

// deadMount says whether a probe's error shows the mount lost for good:
// ENOTCONN or ECONNABORTED (a FUSE daemon that exited), ESHUTDOWN (a client
// the cluster evicted and blocklisted) or ESTALE.
func deadMount(err error) bool {
	for _, e := range []error{unix.ENOTCONN, unix.ECONNABORTED, unix.ESHUTDOWN, unix.ESTALE} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// probeError turns a probe's failure that is not evidence of a lost mount
// into a status naming the path.
func probeError(err error, path string) error {
	if errors.Is(err, errHung) {
		return coded(codes.Unavailable, "mount %s did not answer within %s (hung mount?)", path, probeTimeout)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return coded(codes.DeadlineExceeded, "checking mount %s: %v", path, err)
	}
	return coded(codes.Internal, "checking mount %s: %v", path, err)
}

// mountAt returns the topmost mount at dir (nil if none); a mount table that
// cannot be read is an error, never "not mounted".
func mountAt(dir string) (*mount.MountInfo, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, coded(codes.Internal, "reading the mount table: %v", err)
	}
	var top *mount.MountInfo
	for i := range infos {
		if infos[i].MountPoint == dir {
			top = &infos[i] // later entries are mounted on top
		}
	}
	return top, nil
}

// hasOption says whether a mount's per-mount options contain opt.
func hasOption(mi *mount.MountInfo, opt string) bool {
	for _, o := range mi.MountOptions {
		if o == opt {
			return true
		}
	}
	return false
}

// procArgs is a process's command line (nil if it is gone).
func procArgs(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// isZombie says whether pid has exited (or is exiting).
func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// The state follows the parenthesised command name.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

// findProcess returns the live process whose program is named prog and whose
// last argument is lastArg, with its arguments (0 if a full scan of /proc
// finds none).
func findProcess(prog, lastArg string) (int, []string, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, nil, coded(codes.Internal, "listing processes: %v", err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		args := procArgs(pid)
		if len(args) > 1 && filepath.Base(args[0]) == prog && args[len(args)-1] == lastArg && !isZombie(pid) {
			return pid, args, nil
		}
	}
	return 0, nil, nil
}

// waitExit waits until pid has exited (or is a zombie).
func waitExit(ctx context.Context, pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !isZombie(pid) {
		if time.Now().After(deadline) {
			return coded(codes.Unavailable, "process %d did not exit within %s", pid, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}
