package cephfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

const (
	fuseProg   = "ceph-fuse"
	fuseFsType = "fuse.ceph-fuse"
	// fuseStartTimeout bounds a ceph-fuse start (its own mount timeout is 30 s).
	fuseStartTimeout = 60 * time.Second
	// fuseExitTimeout bounds the wait for ceph-fuse to exit after an
	// unmount: it writes back its cache and closes its session first.
	fuseExitTimeout = 60 * time.Second
	// keyFileArg: the key reaches ceph-fuse as a memfd, its fd 3.
	keyFileArg = "--keyfile=/proc/self/fd/3"
)

// fuseMounter mounts subvolumes with ceph-fuse. ceph-fuse daemonizes without
// leaving the session of whoever started it, so it is started in a session of
// its own: a driver killed with its process group, or a terminal's SIGHUP,
// leaves its mounts serving.
type fuseMounter struct {
	locks   rcsi.KeyLocks // Mount and Unmount, per target
	flushes rcsi.KeyLocks // one flush walk per target at a time
	// daemons, if set, is where each ceph-fuse goes, so that it outlives
	// the node plugin's container.
	daemons *rcsi.DaemonCgroup
}

func (f *fuseMounter) Name() string { return MounterFuse }

func (f *fuseMounter) Available() error {
	if _, err := exec.LookPath(fuseProg); err != nil {
		return coded(codes.FailedPrecondition, "ceph-fuse is not installed on this node")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return coded(codes.FailedPrecondition, "/dev/fuse is missing on this node: %v", err)
	}
	return nil
}

// fuseOptions are the -o options a fuseMountOptions parameter may carry:
// FUSE mount options that change neither how ceph-fuse runs (debug implies
// foreground), nor where it reads files from, nor how its mount is recognised
// in the mount table (fsname, subtype). true: the option takes a number.
var fuseOptions = map[string]bool{
	"ro": false, "rw": false, "noatime": false, "atime": false, "nosuid": false, "nodev": false,
	"noexec": false, "sync": false, "async": false, "dirsync": false,
	"default_permissions": false, "allow_other": false, "allow_root": false,
	"async_read": false, "sync_read": false, "atomic_o_trunc": false, "big_writes": false,
	"no_remote_lock": false, "no_remote_flock": false, "no_remote_posix_lock": false,
	"auto_inval_data": false, "no_auto_inval_data": false,
	"max_read": true, "max_write": true, "max_readahead": true, "max_background": true,
	"congestion_threshold": true,
}

// parseFuseOptions checks a fuseMountOptions value and returns its options;
// read-only volumes get "ro" (and may not ask for "rw").
func parseFuseOptions(s string, readOnly bool) ([]string, error) {
	var out []string
	if s != "" {
		for _, o := range strings.Split(s, ",") {
			name, val, hasVal := strings.Cut(o, "=")
			num, known := fuseOptions[name]
			switch {
			case o == "":
				return nil, coded(codes.InvalidArgument, "%s has an empty option", ParamFuseMountOptions)
			case !known:
				return nil, coded(codes.InvalidArgument, "%s: option %q is not supported (allowed: FUSE mount options such as noatime, max_read=N)", ParamFuseMountOptions, name)
			case num != hasVal || (num && !isDigits(val)):
				if num {
					return nil, coded(codes.InvalidArgument, "%s: option %s needs a number (%s=N)", ParamFuseMountOptions, name, name)
				}
				return nil, coded(codes.InvalidArgument, "%s: option %s takes no value", ParamFuseMountOptions, name)
			case name == "rw" && readOnly:
				return nil, coded(codes.InvalidArgument, "%s: rw on a read-only volume", ParamFuseMountOptions)
			}
			out = append(out, o)
		}
	}
	if readOnly {
		out = append(out, "ro")
	}
	return out, nil
}

func isDigits(s string) bool {
	return s != "" && len(s) <= 12 && strings.Trim(s, "0123456789") == ""
}

// fuseArgs is ceph-fuse's command line: every value joined to its option
// with '=', so none can be read as an option of its own; the key by memfd;
// no admin socket or log file (either would outlive the daemon's crash).
// The target comes last: that is how the daemon of a mount is found.
func fuseArgs(spec MountSpec, target string, opts []string) []string {
	args := []string{
		"--id=" + spec.Creds.ID, keyFileArg, "--mon-host=" + strings.Join(spec.Monitors, ","),
		"--no-mon-config", "--client_fs=" + spec.FsName, "--client_mountpoint=" + spec.Path,
		"--client_mount_timeout=30", "--admin-socket=", "--log-file=",
	}
	if len(opts) > 0 {
		args = append(args, "-o", strings.Join(opts, ","))
	}
	return append(args, target)
}

// sameFuseMount compares the command line of a running ceph-fuse with the
// one Mount would run.
func sameFuseMount(running, want []string) bool {
	if len(running) != len(want)+1 { // running starts with the program
		return false
	}
	for i, a := range want {
		if running[i+1] != a {
			return false
		}
	}
	return true
}

func (f *fuseMounter) Mount(ctx context.Context, target string, spec MountSpec) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	if err := checkSpec(spec); err != nil {
		return err
	}
	opts, err := parseFuseOptions(spec.Options, spec.ReadOnly)
	if err != nil {
		return err
	}
	if err := f.Available(); err != nil {
		return err
	}
	unlock, err := f.locks.Lock(ctx, target)
	if err != nil {
		return coded(codes.Aborted, "another mount or unmount of %s is in progress: %v", target, err)
	}
	defer unlock()
	args := fuseArgs(spec, target, opts)
	mi, err := mountAt(target)
	if err != nil {
		return err
	}
	if mi != nil {
		if mi.FsType != fuseFsType {
			return coded(codes.FailedPrecondition, "%s already has a %s mount: not mounting over it", target, mi.FsType)
		}
		switch perr := probeDir(ctx, target); {
		case perr == nil:
			pid, running, err := rcsi.FindDaemon(fuseProg, target)
			switch {
			case err != nil:
				return err
			case pid == 0:
				return coded(codes.FailedPrecondition, "%s has a ceph-fuse mount that answers but no ceph-fuse process this driver can see", target)
			case !sameFuseMount(running, args):
				return coded(codes.AlreadyExists, "%s already has a ceph-fuse mount of another subvolume, user or options", target)
			}
			// A retry: already mounted and serving (its daemon moved, if a
			// crash came between its start and the move).
			return f.daemons.Keep(pid, "ceph-fuse mount "+target)
		case !deadMount(perr):
			return probeError(perr, target)
		}
		klog.InfoS("replacing a dead ceph-fuse mount", "target", target)
		if err := f.unmount(ctx, target); err != nil {
			return err
		}
	}
	return f.start(ctx, target, spec, args)
}

// start runs ceph-fuse, which returns once its daemon serves the mount.
func (f *fuseMounter) start(ctx context.Context, target string, spec MountSpec, args []string) error {
	if err := os.MkdirAll(target, 0o750); err != nil {
		return coded(codes.Internal, "creating mount target: %v", err)
	}
	key, err := spec.Creds.KeyMemfd()
	if err != nil {
		return coded(codes.Internal, "%v", err)
	}
	defer key.Close()
	ctx, cancel := context.WithTimeout(ctx, fuseStartTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, fuseProg, args...)
	cmd.Env = rcsi.ToolEnv()
	cmd.ExtraFiles = []*os.File{key}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.WaitDelay = time.Second // a daemon holding our pipes cannot hold us
	out := &limitedBuffer{max: 64 << 10}
	cmd.Stdout, cmd.Stderr = out, out
	start := time.Now()
	err = cmd.Run()
	what := fmt.Sprintf("ceph-fuse of %s:%s at %s", spec.FsName, spec.Path, target)
	if err != nil {
		f.cleanupFailedStart(target)
		detail := spec.Creds.Redact(rcsi.LastLine(out.Bytes()))
		if ctx.Err() != nil {
			return coded(codes.Unavailable, "%s did not start within %s: %s", what, time.Since(start).Round(time.Millisecond), detail)
		}
		return coded(fuseErrorCode(detail), "%s failed (%v): %s", what, err, detail)
	}
	mi, err := mountAt(target)
	if err != nil {
		return err
	}
	if mi == nil || mi.FsType != fuseFsType {
		return coded(codes.Internal, "%s exited without mounting", what)
	}
	if f.daemons.Enabled() {
		pid, _, err := rcsi.FindDaemon(fuseProg, target)
		if err == nil {
			err = f.daemons.Keep(pid, "ceph-fuse mount "+target)
		}
		if err != nil {
			return err // the stage fails; its clean-up unmounts
		}
	}
	klog.V(2).InfoS("ceph-fuse mounted", "fs", spec.FsName, "path", spec.Path, "target", target, "user", spec.Creds.ID, "readOnly", spec.ReadOnly, "duration", time.Since(start))
	return nil
}

// cleanupFailedStart removes a mount a failed ceph-fuse left without a daemon.
func (f *fuseMounter) cleanupFailedStart(target string) {
	mi, err := mountAt(target)
	if err != nil || mi == nil || mi.FsType != fuseFsType {
		return
	}
	if pid, _, err := rcsi.FindDaemon(fuseProg, target); err == nil && pid == 0 {
		unix.Unmount(target, unix.MNT_DETACH)
	}
}

var cephErrno = regexp.MustCompile(`\((\d+)\) [A-Za-z]`)

// fuseErrorCode picks a code from ceph-fuse's "mount failed with (N) ..." line.
func fuseErrorCode(line string) codes.Code {
	m := cephErrno.FindStringSubmatch(line)
	if m == nil {
		return codes.Internal
	}
	switch m[1] {
	case "1", "13":
		return codes.PermissionDenied
	case "2":
		return codes.NotFound
	case "110", "108", "111":
		return codes.Unavailable
	}
	return codes.Internal
}

func (f *fuseMounter) Unmount(ctx context.Context, target string) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	unlock, err := f.locks.Lock(ctx, target)
	if err != nil {
		return coded(codes.Aborted, "another mount or unmount of %s is in progress: %v", target, err)
	}
	defer unlock()
	return f.unmount(ctx, target)
}

// maxStacked bounds how many mounts stacked on one target unmount removes.
const maxStacked = 8

// unmount removes every ceph-fuse mount at target and waits for each daemon
// to exit (it writes its cache back and closes its session first). A dead
// mount that is still in use is detached instead.
func (f *fuseMounter) unmount(ctx context.Context, target string) error {
	for i := 0; i < maxStacked; i++ {
		mi, err := mountAt(target)
		if err != nil {
			return err
		}
		if mi == nil {
			return nil
		}
		if mi.FsType != fuseFsType {
			return coded(codes.FailedPrecondition, "%s has a %s mount, not ceph-fuse: not unmounting it", target, mi.FsType)
		}
		pid, _, err := rcsi.FindDaemon(fuseProg, target)
		if err != nil {
			return err
		}
		lazy := false
		start := time.Now()
		err = unix.Unmount(target, 0)
		if errors.Is(err, unix.EBUSY) && deadMount(probeDir(ctx, target)) {
			lazy = true
			err = unix.Unmount(target, unix.MNT_DETACH)
		}
		switch {
		case errors.Is(err, unix.EINVAL):
			continue // unmounted meanwhile; look again
		case errors.Is(err, unix.EBUSY):
			return coded(codes.FailedPrecondition, "%s is busy (still in use): not unmounted", target)
		case err != nil:
			return coded(codes.Internal, "unmounting %s: %v", target, err)
		}
		if pid > 0 && !lazy {
			if err := rcsi.WaitExit(ctx, pid, fuseExitTimeout); err != nil {
				return err
			}
		}
		klog.V(2).InfoS("ceph-fuse unmounted", "target", target, "pid", pid, "detached", lazy, "duration", time.Since(start))
	}
	return coded(codes.Internal, "%s still has mounts after removing %d", target, maxStacked)
}

func (f *fuseMounter) Flush(ctx context.Context, target string) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	return runFlush(ctx, &f.flushes, target, fuseFsType, syncTree)
}

func (f *fuseMounter) Healthy(ctx context.Context, target string) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	return healthy(ctx, target, fuseFsType)
}

// healthy is Healthy for a mount of file system type fsType.
func healthy(ctx context.Context, target, fsType string) error {
	mi, err := mountAt(target)
	if err != nil {
		return err
	}
	if mi == nil {
		return broken("nothing is mounted at %s", target)
	}
	if mi.FsType != fsType {
		return broken("%s has a %s mount, not %s", target, mi.FsType, fsType)
	}
	switch err := probeDir(ctx, target); {
	case err == nil:
		return nil
	case deadMount(err):
		return broken("mount %s is lost: %v", target, err)
	default:
		return probeError(err, target)
	}
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	bytes.Buffer
	max int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.Len(); room > 0 {
		if len(p) > room {
			b.Buffer.Write(p[:room])
		} else {
			b.Buffer.Write(p)
		}
	}
	return len(p), nil
}
