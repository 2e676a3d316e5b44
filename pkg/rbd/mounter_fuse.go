package rbd

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
)

// fuseMounter exposes the image as a file with rbd-fuse and puts a loop device
// on top of it. rbd-fuse daemonizes into its own session, so it outlives a
// restart of the driver.
type fuseMounter struct {
	keyDir string // private directory for short-lived key files
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
	if pid := fusePid(dir); pid > 0 && isFuseMounted(dir) {
		m.Pid = pid // a retry after a crash: the image is already exposed
	} else {
		if isFuseMounted(dir) { // its rbd-fuse died: the mount is dead
			if dev := findLoop(file); dev != "" {
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
		m.Pid = fusePid(dir)
	}
	if dev := findLoop(file); dev != "" {
		m.Device = dev
		return m, nil
	}
	dev, err := attachLoop(file, spec.ReadOnly)
	if err != nil {
		return m, err
	}
	m.Device = dev
	return m, nil
}

func (f *fuseMounter) startFuse(ctx context.Context, spec ImageSpec, dir string) error {
	keyFile, err := spec.Creds.WriteKeyFile(f.keyDir)
	if err != nil {
		return err
	}
	// rbd-fuse reads the key before it daemonizes: remove it once it returns.
	defer os.Remove(keyFile)
	args := []string{
		"-p", spec.Pool, "-r", spec.Image,
		"--id", spec.Creds.ID, "--keyfile", keyFile, "-m", spec.Monitors,
		"--admin-socket=", "--log-file=", "--no-mon-config", "--client-mount-timeout=30",
		// Sizes must follow resizes at once, not after FUSE's attribute cache expires.
		"-o", "attr_timeout=0,entry_timeout=0",
	}
	if spec.Namespace != "" {
		// rbd-fuse's option table knows only the --namespace=NS form.
		args = append(args, "--namespace="+spec.Namespace)
	}
	if spec.ReadOnly {
		args = append(args, "-o", "ro")
	}
	args = append(args, dir)
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "rbd-fuse", args...)
	cmd.Env = toolEnv()
	start := time.Now()
	o, err := cmd.CombinedOutput()
	out := []byte(spec.Creds.Redact(string(o))) // Ceph tools may echo a key they cannot decode
	if err != nil {
		return fmt.Errorf("rbd-fuse for %s/%s failed: %v: %s", spec.Pool, spec.Image, err, lastLine(out))
	}
	if !isFuseMounted(dir) {
		return fmt.Errorf("rbd-fuse for %s/%s exited without mounting: %s", spec.Pool, spec.Image, lastLine(out))
	}
	klog.V(3).InfoS("rbd-fuse started", "image", spec.Pool+"/"+spec.Image, "dir", dir, "duration", time.Since(start))
	return nil
}

func (f *fuseMounter) Unmap(ctx context.Context, m Mapping) error {
	if m.Device != "" && loopBackingFile(m.Device) != "" && strings.HasPrefix(loopBackingFile(m.Device), m.FuseDir+"/") {
		if err := detachLoop(m.Device); err != nil {
			return err
		}
	}
	if m.FuseDir == "" {
		return nil
	}
	pid := fusePid(m.FuseDir)
	if isFuseMounted(m.FuseDir) {
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
	file := loopBackingFile(m.Device)
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

func (f *fuseMounter) Check(m Mapping) error {
	if fusePid(m.FuseDir) == 0 {
		return fmt.Errorf("rbd-fuse serving %s is not running", m.Device)
	}
	if !isFuseMounted(m.FuseDir) {
		return fmt.Errorf("rbd-fuse mount %s is gone", m.FuseDir)
	}
	if b := loopBackingFile(m.Device); !strings.HasPrefix(b, m.FuseDir+"/") {
		return fmt.Errorf("loop device %s is no longer backed by the image", m.Device)
	}
	return nil
}

// isFuseMounted reports whether an rbd-fuse filesystem is mounted at dir.
func isFuseMounted(dir string) bool {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, mi := range infos {
		if mi.MountPoint == dir && strings.HasPrefix(mi.FsType, "fuse") {
			return true
		}
	}
	return false
}

// fusePid finds the live rbd-fuse process serving dir (0 if none).
func fusePid(dir string) int {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		args := procArgs(pid)
		if len(args) > 1 && filepath.Base(args[0]) == "rbd-fuse" && args[len(args)-1] == dir && !isZombie(pid) {
			return pid
		}
	}
	return 0
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
