package rbd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// fuseMounter exposes the image as a file with rbd-fuse and puts a loop device
// on top of it. rbd-fuse daemonizes into its own session, so it outlives a
// restart of the driver; moved into daemons' cgroup, it outlives the node
// plugin's container too.
type fuseMounter struct {
	mounts  mount.Interface
	daemons *rcsi.DaemonCgroup
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
	mounted, err := rcsi.IsFuseMounted(dir)
	if err != nil {
		return m, err
	}
	if pid > 0 && mounted {
		m.Pid = pid // a retry after a crash: the image is already exposed
		if err := f.adopt(pid, dir); err != nil {
			return m, err
		}
	} else {
		if mounted { // its rbd-fuse died: the mount must answer as dead
			if err := rcsi.StatPath(ctx, dir); !rcsi.FuseDead(err) {
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
		if err := f.adopt(m.Pid, dir); err != nil {
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

// adopt moves the rbd-fuse daemon serving dir into the daemons' cgroup (if
// one is configured and it is not there yet).
func (f *fuseMounter) adopt(pid int, dir string) error {
	return f.daemons.Keep(pid, "rbd-fuse mount "+dir)
}

// fuseArgs is rbd-fuse's command line: every value joined to its option with
// '=', so none can be read as an option of its own; the key by memfd.
func fuseArgs(spec ImageSpec, dir string) []string {
	args := []string{
		"--poolname=" + spec.Pool, "--image=" + spec.Image,
		"--id=" + spec.Creds.ID, rcsi.KeyFileArg, "--mon-host=" + spec.Monitors,
		"--no-mon-config", "--client-mount-timeout=30",
		// Sizes must follow resizes at once, not after FUSE's attribute cache expires.
		"-o", "attr_timeout=0,entry_timeout=0",
	}
	args = append(args, rcsi.QuietArgs...)
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
	if _, err := (rcsi.Tool{Name: "rbd-fuse", Args: fuseArgs(spec, dir), Creds: &spec.Creds, Timeout: 60 * time.Second}).Run(ctx); err != nil {
		return fmt.Errorf("rbd-fuse for %s: %w", imageName(spec), err)
	}
	mounted, err := rcsi.IsFuseMounted(dir)
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
	mounted, err := rcsi.IsFuseMounted(m.FuseDir)
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
		if err := rcsi.WaitExit(ctx, pid, 60*time.Second); err != nil {
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
	mounted, err := rcsi.IsFuseMounted(m.FuseDir)
	if err != nil {
		return err
	}
	if !mounted {
		return rcsi.Gone("rbd-fuse mount %s is gone", m.FuseDir)
	}
	switch err := rcsi.StatPath(ctx, m.FuseDir); {
	case rcsi.FuseDead(err):
		return rcsi.Gone("rbd-fuse mount %s is dead (its rbd-fuse exited)", m.FuseDir)
	case err != nil:
		return rcsi.ProbeError(err, "checking rbd-fuse mount", m.FuseDir)
	}
	b, err := loopBackingFile(m.Device)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(b, m.FuseDir+"/") {
		return rcsi.Gone("loop device %s is no longer backed by the image", m.Device)
	}
	return nil
}

// fusePid finds the live rbd-fuse process serving dir (0 if a full scan of
// /proc finds none).
func fusePid(dir string) (int, error) { return rcsi.DaemonPid("rbd-fuse", dir) }
