package csi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/mount-utils"
)

// FUSE daemons (rbd-fuse, ceph-fuse) as the node services see them: whether
// a mount is there, whether its daemon answers, which process serves it.

// FuseDead says whether a FUSE mount's answer shows its server gone: ENOTCONN
// (connection down) or ECONNABORTED (connection aborted, as the kernel does
// when the server's /dev/fuse descriptor closes at its exit).
func FuseDead(err error) bool {
	return errors.Is(err, unix.ENOTCONN) || errors.Is(err, unix.ECONNABORTED)
}

// IsFuseMounted reports whether a FUSE filesystem is mounted at dir; a mount
// table that cannot be read is an error, never "not mounted".
func IsFuseMounted(dir string) (bool, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return false, Coded(codes.Internal, "reading the mount table: %v", err)
	}
	for _, mi := range infos {
		if mi.MountPoint == dir && strings.HasPrefix(mi.FsType, "fuse") {
			return true, nil
		}
	}
	return false, nil
}

// MountLost says whether a probe's error shows a mount lost for good: a
// FUSE daemon gone (FuseDead), a client the cluster evicted and blocklisted
// (ESHUTDOWN), or a stale handle (ESTALE).
func MountLost(err error) bool {
	return FuseDead(err) || errors.Is(err, unix.ESHUTDOWN) || errors.Is(err, unix.ESTALE)
}

// DaemonPid finds the live process named daemon (its argv[0]'s base name)
// whose last argument is dir, as a FUSE daemon's mount point is (0 if a full
// scan of /proc finds none).
func DaemonPid(daemon, dir string) (int, error) {
	pid, _, err := FindDaemon(daemon, dir)
	return pid, err
}

// FindDaemon is DaemonPid that also returns the process's command line.
func FindDaemon(daemon, dir string) (int, []string, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, nil, Coded(codes.Internal, "listing processes: %v", err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		args := procArgs(pid)
		if len(args) > 1 && filepath.Base(args[0]) == daemon && args[len(args)-1] == dir && !isZombie(pid) {
			return pid, args, nil
		}
	}
	return 0, nil, nil
}

func procArgs(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// The state follows the parenthesised command name.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

// WaitExit waits until pid has exited (or is a zombie); Unavailable after timeout.
func WaitExit(ctx context.Context, pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !isZombie(pid) {
		if time.Now().After(deadline) {
			return Coded(codes.Unavailable, "process %d did not exit within %s", pid, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}
