package zmqbridge

// Segment preallocation and the syncs of segment files.

import (
	"bytes"
	"io"
	"os"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// createSegment creates a segment file and preallocates it (see preallocate),
// reporting whether that worked. Nothing is synced: the committer fsyncs the
// directory (dirDirty) before it next fdatasyncs the active segment.
func (j *Journal) createSegment(path string) (*os.File, bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, false, err
	}
	return f, j.preallocate(f), nil
}

// preallocate reserves SegmentBytes for the active segment's file f and sets
// its size to that (fallocate(2) mode 0; the blocks read as zeros). Appends
// then write inside the file, so the committer's fdatasync commits no size
// change, which makes it cheaper than when the file grows. Preallocation is
// only an optimization: where it fails (a file system without fallocate,
// ENOSPC...) the segment grows with its data as it would without, and the
// failure is logged once per journal. A failure may leave part of the space
// allocated; the zeros are handled like a preallocated rest.
func (j *Journal) preallocate(f *os.File) bool {
	err := fileAllocate(f, j.o.SegmentBytes)
	if err == nil {
		return true
	}
	if !j.allocLogged {
		j.allocLogged = true
		klog.V(2).InfoS("event journal: cannot preallocate segment files, they grow as appended instead",
			"segment", f.Name(), "bytes", j.o.SegmentBytes, "err", err)
	}
	return false
}

// fileDatasync is the committer's sync of the active segment: fdatasync(2),
// which persists the data written and whatever is needed to read it back
// (file size, block allocation), but not timestamps. Tests stub it.
var fileDatasync = func(f *os.File) error {
	return fileCall(f, "fdatasync", unix.Fdatasync)
}

// fileAllocate preallocates the first size bytes of f with fallocate(2)
// mode 0, which also sets the file size if it is smaller. Tests stub it to
// fail, as on a file system without fallocate.
var fileAllocate = func(f *os.File, size int64) error {
	return fileCall(f, "fallocate", func(fd int) error { return unix.Fallocate(fd, 0, 0, size) })
}

// fileCall runs call on f's descriptor, again while it fails with EINTR, and
// wraps its error like the os package does.
func fileCall(f *os.File, op string, call func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var callErr error
	if err := rc.Control(func(fd uintptr) {
		for {
			if callErr = call(int(fd)); callErr != unix.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	if callErr != nil {
		return &os.PathError{Op: op, Path: f.Name(), Err: callErr}
	}
	return nil
}

// zeroChunk is what zeroTail compares file contents with.
var zeroChunk [64 << 10]byte

// zeroTail reports whether f holds only zero bytes from off to end.
func zeroTail(f io.ReaderAt, off, end int64) (bool, error) {
	buf := make([]byte, min(end-off, 4*int64(len(zeroChunk))))
	for off < end {
		n, err := f.ReadAt(buf[:min(int64(len(buf)), end-off)], off)
		for b := buf[:n]; len(b) > 0; {
			k := min(len(b), len(zeroChunk))
			if !bytes.Equal(b[:k], zeroChunk[:k]) {
				return false, nil
			}
			b = b[k:]
		}
		if err == io.EOF {
			return true, nil // the file is shorter than end: nothing more to check
		}
		if err != nil {
			return false, err
		}
		off += int64(n)
	}
	return true, nil
}
