package rbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
)

// fuseMounter exposes the image as a file with rbd-fuse and puts a loop device
// on top of it. rbd-fuse daemonizes into its own session, so it outlives a
// restart of the driver.
type fuseMounter struct {
	mounts mount.Interface
}

func (f *fuseMounter) Name() string { return MounterFuse }

func (f *fuseMounter) Available() error {
	if _, err := exec.LookPath("rbd-fuse"); err != nil {
		return fmt.Errorf("rbd-fuse is not installed on this node")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("/dev/fuse is missing on this node: %v", err)
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return fmt.Errorf("loop devices are unavailable on this node: %v", err)
	}
	return nil
}

func (f *fuseMounter) Map(ctx context.Context, spec ImageSpec, workDir string) (Mapping, error) {
	dir := filepath.Join(workDir, "fuse")
	m := Mapping{Mounter: MounterFuse, FuseDir: dir}
	file := filepath.Join(dir, spec.Image)
	pid, err := fusePid(dir)
	if err != nil {
		return m, err
	}
	mounted, err := isFuseMounted(dir)
	if err != nil {
		return m, err
	}
	if pid > 0 && mounted {
		m.Pid = pid // a retry after a crash: the image is already exposed
	} else {
		if mounted { // its rbd-fuse died: the mount must answer as dead
			if err := statPath(ctx, dir); !fuseDead(err) {
				return m, fmt.Errorf("rbd-fuse mount %s has no rbd-fuse process but does not answer as dead (%v): not replacing it", dir, err)
			}
			dev, err := findLoop(file)
			if err != nil {
				return m, err
			}
			if dev != "" {
				detachLoop(dev)
			}
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
				return m, fmt.Errorf("removing the dead rbd-fuse mount at %s: %w", dir, err)
			}
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return m, err
		}
		if err := f.startFuse(ctx, spec, dir); err != nil {
			return m, err
		}
		if m.Pid, err = fusePid(dir); err != nil {
			return m, err
		}
	}
	dev, err := findLoop(file)
	if err != nil {
		return m, err // never attach a second loop device because the lookup failed
	}
	if dev != "" {
		m.Device = dev
		return m, nil
	}
	if dev, err = attachLoop(file, spec.ReadOnly); err != nil {
		return m, err
	}
	m.Device = dev
	return m, nil
}

// fuseArgs is rbd-fuse's command line: every value joined to its option with
// '=', so none can be read as an option of its own; the key by memfd.
func fuseArgs(spec ImageSpec, dir string) []string {
	args := []string{
		"--poolname=" + spec.Pool, "--image=" + spec.Image,
		"--id=" + spec.Creds.ID, keyFileArg, "--mon-host=" + spec.Monitors,
		"--no-mon-config", "--client-mount-timeout=30",
		// Sizes must follow resizes at once, not after FUSE's attribute cache expires.
		"-o", "attr_timeout=0,entry_timeout=0",
	}
	args = append(args, quietArgs...)
	if spec.Namespace != "" {
		// rbd-fuse's option table knows only the --namespace=NS form.
		args = append(args, "--namespace="+spec.Namespace)
	}
	if spec.ReadOnly {
		args = append(args, "-o", "ro")
	}
	return append(args, dir)
}

func (f *fuseMounter) startFuse(ctx context.Context, spec ImageSpec, dir string) error {
	// rbd-fuse reads the key before it daemonizes; the memfd goes with it.
	start := time.Now()
	if _, err := (toolRun{name: "rbd-fuse", args: fuseArgs(spec, dir), creds: &spec.Creds, timeout: 60 * time.Second}).run(ctx); err != nil {
		return fmt.Errorf("rbd-fuse for %s: %w", imageName(spec), err)
	}
	mounted, err := isFuseMounted(dir)
	if err != nil {
		return err
	}
	if !mounted {
		return fmt.Errorf("rbd-fuse for %s exited without mounting %s", imageName(spec), dir)
	}
	klog.V(3).InfoS("rbd-fuse started", "image", imageName(spec), "dir", dir, "duration", time.Since(start))
	return nil
}

func (f *fuseMounter) Unmap(ctx context.Context, m Mapping) error {
	if m.Device != "" {
		backing, err := loopBackingFile(m.Device)
		if err != nil {
			return err
		}
		if strings.HasPrefix(backing, m.FuseDir+"/") {
			if err := detachLoop(m.Device); err != nil {
				return err
			}
		}
	}
	if m.FuseDir == "" {
		return nil
	}
	pid, err := fusePid(m.FuseDir)
	if err != nil {
		return err
	}
	mounted, err := isFuseMounted(m.FuseDir)
	if err != nil {
		return err
	}
	if mounted {
		if err := f.mounts.Unmount(m.FuseDir); err != nil {
			return fmt.Errorf("unmounting rbd-fuse at %s: %w", m.FuseDir, err)
		}
	}
	// The image stays open (and undeletable) until rbd-fuse has exited.
	if pid > 0 {
		if err := waitExit(ctx, pid, 60*time.Second); err != nil {
			return err
		}
	}
	if err := os.Remove(m.FuseDir); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// Refresh waits for rbd-fuse to report the grown size (librbd learns of the
// resize by a watch notification), then resizes the loop device.
func (f *fuseMounter) Refresh(ctx context.Context, m Mapping, minSize int64) error {
	file, err := loopBackingFile(m.Device)
	if err != nil {
		return err
	}
	if file == "" {
		return fmt.Errorf("loop device %s is detached", m.Device)
	}
	deadline := time.Now().Add(15 * time.Second)
	for minSize > 0 {
		fi, err := os.Stat(file)
		if err != nil {
			return err
		}
		if fi.Size() >= minSize {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("rbd-fuse still reports %d bytes for %s, want %d", fi.Size(), file, minSize)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return refreshLoop(m.Device)
}

// Check judges the mapping lost only on positive evidence: the FUSE mount is
// missing from the mount table, answers ENOTCONN or ECONNABORTED (its
// rbd-fuse died), or the
// loop device is detached or backed by another file.
func (f *fuseMounter) Check(ctx context.Context, m Mapping) error {
	mounted, err := isFuseMounted(m.FuseDir)
	if err != nil {
		return err
	}
	if !mounted {
		return gone("rbd-fuse mount %s is gone", m.FuseDir)
	}
	switch err := statPath(ctx, m.FuseDir); {
	case fuseDead(err):
		return gone("rbd-fuse mount %s is dead (its rbd-fuse exited)", m.FuseDir)
	case err != nil:
		return probeErr(err, "checking rbd-fuse mount", m.FuseDir)
	}
	b, err := loopBackingFile(m.Device)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(b, m.FuseDir+"/") {
		return gone("loop device %s is no longer backed by the image", m.Device)
	}
	return nil
}

// fuseDead says whether a FUSE mount's answer shows its server gone: ENOTCONN
// (connection down) or ECONNABORTED (connection aborted, as the kernel does
// when the server's /dev/fuse descriptor closes at its exit).
func fuseDead(err error) bool {
	return errors.Is(err, unix.ENOTCONN) || errors.Is(err, unix.ECONNABORTED)
}

// isFuseMounted reports whether a FUSE filesystem is mounted at dir; a mount
// table that cannot be read is an error, never "not mounted".
func isFuseMounted(dir string) (bool, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return false, coded(codes.Internal, "reading the mount table: %v", err)
	}
	for _, mi := range infos {
		if mi.MountPoint == dir && strings.HasPrefix(mi.FsType, "fuse") {
			return true, nil
		}
	}
	return false, nil
}

// fusePid finds the live rbd-fuse process serving dir (0 if a full scan of
// /proc finds none).
func fusePid(dir string) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, coded(codes.Internal, "listing processes: %v", err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		args := procArgs(pid)
		if len(args) > 1 && filepath.Base(args[0]) == "rbd-fuse" && args[len(args)-1] == dir && !isZombie(pid) {
			return pid, nil
		}
	}
	return 0, nil
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

// waitExit waits until pid has exited (or is a zombie).
func waitExit(ctx context.Context, pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !isZombie(pid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("process %d did not exit within %s", pid, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

func lastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}
