package rbd

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Loop devices through ioctl(2): attach a file, find the device backed by a
// file, grow it, detach it. (No library covers this; the calls are few.)

// attachLoop backs a free loop device with file and returns the device path.
func attachLoop(file string, readOnly bool) (string, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	backing, err := os.OpenFile(file, flags, 0)
	if err != nil {
		return "", fmt.Errorf("opening loop backing file: %w", err)
	}
	defer backing.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("opening /dev/loop-control: %w", err)
	}
	defer ctl.Close()
	for attempt := 0; attempt < 20; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("finding a free loop device: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		lf, err := openLoopDevice(dev, flags)
		if err != nil {
			return "", err
		}
		err = unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_SET_FD, int(backing.Fd()))
		if errors.Is(err, unix.EBUSY) {
			lf.Close() // another attach took it first
			continue
		}
		if err != nil {
			lf.Close()
			return "", fmt.Errorf("attaching %s: %w", dev, err)
		}
		info := unix.LoopInfo64{}
		copy(info.File_name[:], file)
		if readOnly {
			info.Flags = unix.LO_FLAGS_READ_ONLY
		}
		if err := unix.IoctlLoopSetStatus64(int(lf.Fd()), &info); err != nil {
			unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_CLR_FD, 0)
			lf.Close()
			return "", fmt.Errorf("configuring %s: %w", dev, err)
		}
		lf.Close()
		return dev, nil
	}
	return "", fmt.Errorf("no free loop device after 20 attempts")
}

// openLoopDevice opens dev, waiting briefly for udev/devtmpfs to create it.
func openLoopDevice(dev string, flags int) (*os.File, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := os.OpenFile(dev, flags, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			if err != nil {
				return nil, fmt.Errorf("opening %s: %w", dev, err)
			}
			return f, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// loopBackingFile returns the file behind loop device dev ("" if sysfs says
// it is detached); a sysfs read that fails otherwise is an error.
func loopBackingFile(dev string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("reading the backing file of %s: %w", dev, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// findLoop returns the loop device backed by file, or "" when none is; a
// lookup that fails is an error.
func findLoop(file string) (string, error) {
	matches, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return "", err
	}
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if errors.Is(err, os.ErrNotExist) {
			continue // detached meanwhile
		}
		if err != nil {
			return "", fmt.Errorf("looking for the loop device of %s: %w", file, err)
		}
		if strings.TrimSpace(string(b)) == file {
			return "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(m))), nil
		}
	}
	return "", nil
}

// refreshLoop makes dev re-read its backing file's size.
func refreshLoop(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("refreshing size of %s: %w", dev, err)
	}
	return nil
}

// detachLoop frees dev, retrying while it is briefly busy; a detached device is fine.
func detachLoop(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		switch {
		case err == nil, errors.Is(err, unix.ENXIO):
			return nil
		case errors.Is(err, unix.EBUSY) && time.Now().Before(deadline):
			time.Sleep(50 * time.Millisecond)
		default:
			return fmt.Errorf("detaching %s: %w", dev, err)
		}
	}
}
