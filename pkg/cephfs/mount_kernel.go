package cephfs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

const (
	kernelFsType = "ceph"
	// modprobeTimeout bounds the attempt to load the ceph module.
	modprobeTimeout = 10 * time.Second
	// kernelMountTimeout is the kernel client's mount_timeout (seconds)
	// unless kernelMountOptions sets one; the mount call waits that long at most.
	kernelMountTimeout = "30"
)

// kernelMounter mounts subvolumes with the kernel CephFS client through
// mount(2): the key travels in the mount data, never on a command line or in
// a file, and the kernel shows it as "<hidden>" in the mount table.
type kernelMounter struct {
	locks   rcsi.KeyLocks
	flushes rcsi.KeyLocks
}

func (k *kernelMounter) Name() string { return MounterKernel }

// Available loads the ceph module if the kernel lacks it; without it the
// mounter cannot work (FailedPrecondition, with modprobe's answer).
func (k *kernelMounter) Available() error {
	ok, err := kernelHasCeph()
	if err != nil || ok {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), modprobeTimeout)
	defer cancel()
	out, merr := exec.CommandContext(ctx, "modprobe", "ceph").CombinedOutput()
	if ok, err := kernelHasCeph(); err != nil || ok {
		return err
	}
	reason := strings.TrimSpace(string(out))
	if reason == "" && merr != nil {
		reason = merr.Error()
	}
	if ctx.Err() != nil {
		reason = "no answer within " + modprobeTimeout.String()
	}
	return coded(codes.FailedPrecondition, "the kernel of this node has no CephFS client: /proc/filesystems lists no ceph and modprobe ceph failed (%s); use mounter %s", rcsi.LastLine([]byte(reason)), MounterFuse)
}

// kernelHasCeph says whether /proc/filesystems lists ceph.
func kernelHasCeph() (bool, error) {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return false, coded(codes.Internal, "reading /proc/filesystems: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 0 && f[len(f)-1] == kernelFsType {
			return true, nil
		}
	}
	return false, nil
}

// kernelFlags are the generic options mount(2) takes as flags, not data.
var kernelFlags = map[string]uintptr{
	"ro": unix.MS_RDONLY, "rw": 0, "noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME,
	"relatime": unix.MS_RELATIME, "strictatime": unix.MS_STRICTATIME, "lazytime": unix.MS_LAZYTIME,
	"nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV, "noexec": unix.MS_NOEXEC,
	"sync": unix.MS_SYNCHRONOUS, "dirsync": unix.MS_DIRSYNC,
}

// kernelOptions are the CephFS client options a kernelMountOptions parameter
// may carry (true: with a value). The user, key and file system are the
// driver's: a parameter cannot set them.
var kernelOptions = map[string]bool{
	"rsize": true, "wsize": true, "rasize": true, "mount_timeout": true, "osdkeepalive": true,
	"osd_idle_ttl": true, "caps_max": true, "caps_wanted_delay_min": true, "caps_wanted_delay_max": true,
	"readdir_max_entries": true, "readdir_max_bytes": true, "write_congestion_kb": true,
	"snapdirname": true, "recover_session": true, "ms_mode": true, "fsc": true,
	"noshare": false, "crc": false, "nocrc": false, "dcache": false, "nodcache": false, "ino32": false,
	"noasyncreaddir": false, "rbytes": false, "norbytes": false, "nofsc": false, "noquotadf": false,
	"nocopyfrom": false, "acl": false, "noacl": false, "wsync": false, "nowsync": false,
}

// kernelOwned are the options the driver sets itself.
var kernelOwned = map[string]bool{"name": true, "secret": true, "secretfile": true, "key": true, "mds_namespace": true, "fs": true}

// kernelMountOpts are parsed kernelMountOptions.
type kernelMountOpts struct {
	flags uintptr
	data  []string // CephFS options, without the driver's own
}

func parseKernelOptions(s string, readOnly bool) (kernelMountOpts, error) {
	var o kernelMountOpts
	hasTimeout := false
	if s != "" {
		for _, opt := range strings.Split(s, ",") {
			name, val, hasVal := strings.Cut(opt, "=")
			if f, ok := kernelFlags[name]; ok && !hasVal {
				if name == "rw" && readOnly {
					return o, coded(codes.InvalidArgument, "%s: rw on a read-only volume", ParamKernelMountOptions)
				}
				o.flags |= f
				continue
			}
			takesVal, known := kernelOptions[name]
			switch {
			case opt == "":
				return o, coded(codes.InvalidArgument, "%s has an empty option", ParamKernelMountOptions)
			case kernelOwned[name]:
				return o, coded(codes.InvalidArgument, "%s: option %s is set by the driver (from the volume's secrets and parameters)", ParamKernelMountOptions, name)
			case !known:
				return o, coded(codes.InvalidArgument, "%s: option %q is not supported", ParamKernelMountOptions, name)
			case hasVal && (!takesVal || !safeValue(val)):
				return o, coded(codes.InvalidArgument, "%s: option %s has a bad value", ParamKernelMountOptions, name)
			case !hasVal && takesVal && name != "fsc":
				return o, coded(codes.InvalidArgument, "%s: option %s needs a value (%s=...)", ParamKernelMountOptions, name, name)
			}
			hasTimeout = hasTimeout || name == "mount_timeout"
			o.data = append(o.data, opt)
		}
	}
	if !hasTimeout {
		o.data = append(o.data, "mount_timeout="+kernelMountTimeout)
	}
	if readOnly {
		o.flags |= unix.MS_RDONLY
	}
	return o, nil
}

// safeValue accepts an option value that cannot end the option or start another.
func safeValue(v string) bool {
	return v != "" && len(v) <= 64 && strings.Trim(v, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == ""
}

// mountData is the data mount(2) gets; it holds the key, so it is never
// logged or put in an error.
func (o kernelMountOpts) mountData(spec MountSpec) string {
	d := []string{"name=" + spec.Creds.ID, "secret=" + spec.Creds.Key, "mds_namespace=" + spec.FsName}
	return strings.Join(append(d, o.data...), ",")
}

// kernelSource is the mount source "mon1:port,mon2:port:/path", monitors as
// IP addresses (the kernel resolves no names) on the v1 port unless given.
func kernelSource(ctx context.Context, monitors []string, path string) (string, error) {
	var addrs []string
	for _, m := range monitors {
		m = strings.TrimPrefix(strings.TrimPrefix(m, "v1:"), "v2:")
		host, port, err := net.SplitHostPort(m)
		if err != nil {
			host, port = strings.Trim(m, "[]"), "6789"
		}
		ips := []string{host}
		if net.ParseIP(host) == nil {
			found, err := net.DefaultResolver.LookupHost(ctx, host)
			if err != nil {
				return "", coded(codes.Unavailable, "resolving monitor %s: %v", host, err)
			}
			ips = found
		}
		for _, ip := range ips {
			addrs = append(addrs, net.JoinHostPort(ip, port))
		}
	}
	return strings.Join(addrs, ",") + ":" + path, nil
}

func (k *kernelMounter) Mount(ctx context.Context, target string, spec MountSpec) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	if err := checkSpec(spec); err != nil {
		return err
	}
	opts, err := parseKernelOptions(spec.Options, spec.ReadOnly)
	if err != nil {
		return err
	}
	if err := k.Available(); err != nil {
		return err
	}
	unlock, err := k.locks.Lock(ctx, target)
	if err != nil {
		return coded(codes.Aborted, "another mount or unmount of %s is in progress: %v", target, err)
	}
	defer unlock()
	mi, err := mountAt(target)
	if err != nil {
		return err
	}
	if mi != nil {
		if mi.FsType != kernelFsType {
			return coded(codes.FailedPrecondition, "%s already has a %s mount: not mounting over it", target, mi.FsType)
		}
		switch perr := probeDir(ctx, target); {
		case perr == nil && strings.HasSuffix(mi.Source, ":"+spec.Path):
			return nil // a retry: already mounted
		case perr == nil:
			return coded(codes.AlreadyExists, "%s already has a CephFS mount of %s", target, mi.Source)
		case !deadMount(perr):
			return probeError(perr, target)
		}
		if err := kernelUnmount(ctx, target); err != nil {
			return err
		}
	}
	src, err := kernelSource(ctx, spec.Monitors, spec.Path)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return coded(codes.Internal, "creating mount target: %v", err)
	}
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- unix.Mount(src, target, kernelFsType, opts.flags, opts.mountData(spec)) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		return coded(codes.Unavailable, "mount -t ceph of %s at %s did not return in time (it may still complete; a retry finds it)", src, target)
	}
	if err != nil {
		code := rcsi.Code(err)
		if errors.Is(err, unix.ETIMEDOUT) || errors.Is(err, unix.EIO) || errors.Is(err, unix.ECONNREFUSED) {
			code = codes.Unavailable
		}
		return coded(code, "mount -t ceph of %s at %s as %s: %v", src, target, spec.Creds.ID, err)
	}
	klog.V(2).InfoS("CephFS kernel mount done", "source", src, "target", target, "user", spec.Creds.ID, "readOnly", spec.ReadOnly, "duration", time.Since(start))
	return nil
}

func (k *kernelMounter) Unmount(ctx context.Context, target string) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	unlock, err := k.locks.Lock(ctx, target)
	if err != nil {
		return coded(codes.Aborted, "another mount or unmount of %s is in progress: %v", target, err)
	}
	defer unlock()
	return kernelUnmount(ctx, target)
}

// kernelUnmount removes every CephFS mount at target; a dead one still in use
// is detached.
func kernelUnmount(ctx context.Context, target string) error {
	for i := 0; i < maxStacked; i++ {
		mi, err := mountAt(target)
		if err != nil {
			return err
		}
		if mi == nil {
			return nil
		}
		if mi.FsType != kernelFsType {
			return coded(codes.FailedPrecondition, "%s has a %s mount, not CephFS: not unmounting it", target, mi.FsType)
		}
		err = unix.Unmount(target, 0)
		if errors.Is(err, unix.EBUSY) && deadMount(probeDir(ctx, target)) {
			err = unix.Unmount(target, unix.MNT_DETACH)
		}
		switch {
		case errors.Is(err, unix.EINVAL):
			continue
		case errors.Is(err, unix.EBUSY):
			return coded(codes.FailedPrecondition, "%s is busy (still in use): not unmounted", target)
		case err != nil:
			return coded(codes.Internal, "unmounting %s: %v", target, err)
		}
	}
	return coded(codes.Internal, "%s still has mounts after removing %d", target, maxStacked)
}

// Flush is syncfs(2): the kernel client's sync_fs writes back dirty data,
// flushes dirty caps and waits for the OSDs and the MDS journal.
func (k *kernelMounter) Flush(ctx context.Context, target string) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	return runFlush(ctx, &k.flushes, target, kernelFsType, func(_ context.Context, root string) (syncStats, error) {
		fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return syncStats{}, flushErr("opening", root, err)
		}
		defer unix.Close(fd)
		if err := unix.Syncfs(fd); err != nil {
			return syncStats{}, flushErr("syncfs of", root, err)
		}
		return syncStats{}, nil
	})
}

func (k *kernelMounter) Healthy(ctx context.Context, target string) error {
	if err := checkTarget(target); err != nil {
		return err
	}
	return healthy(ctx, target, kernelFsType)
}
