package cephfs

// Flush through ceph-fuse. What makes a completed write durable:
//
// A write(2) through ceph-fuse completes once the daemon has it in its object
// cache (client_oc, on by default); the cache writes it to the OSDs up to
// client_oc_max_dirty_age (5 s) later, and the new size reaches the MDS with
// the next cap flush. A daemon killed before that loses both.
//
// syncfs(2) on the mount does not reach the daemon: ceph-fuse links libfuse 2,
// which has no syncfs operation, and the kernel sends FUSE_SYNCFS only to
// virtiofs anyway. It only writes back the kernel's dirty pages (shared
// mmaps) to the daemon. fsync(2) of a file does reach it (FUSE_FSYNC ->
// Client::ll_fsync), which writes that inode's cached data to the OSDs,
// flushes its dirty caps (size, mtime) to the MDS and waits for both; fsync of
// a directory waits for its pending metadata operations to be journaled. Any
// descriptor of the inode will do. So Flush is syncfs, then fsync of every
// regular file and directory of the mount.
//
// Not covered: a file renamed into a directory the walk has already passed,
// while the walk runs, and files that are unlinked but still open (whose data
// no other client can read anyway).

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

const (
	// maxFlushDepth bounds how deep the flush walks (one descriptor per level).
	maxFlushDepth = 1024
	// flushWorkers fsync files side by side (a dirty file waits for the OSDs).
	flushWorkers = 4
	// readBatch is how many directory entries the walk reads at a time.
	readBatch = 256
)

// syncStats counts what a flush walked.
type syncStats struct{ files, dirs int }

// runFlush runs syncFn on the mount of type fsType at target, one at a time per
// target: a caller whose ctx ends returns at once, and the flush it started
// stops at the next file (or when a hung syscall returns), still holding its
// target so that hung flushes never pile up.
func runFlush(ctx context.Context, locks *rcsi.KeyLocks, target, fsType string, syncFn func(context.Context, string) (syncStats, error)) error {
	mi, err := mountAt(target)
	if err != nil {
		return err
	}
	if mi == nil || mi.FsType != fsType {
		return &codedError{code: codes.FailedPrecondition, msg: "flushing " + target + ": " + ErrNotMounted.Error(), err: ErrNotMounted}
	}
	if hasOption(mi, "ro") {
		return nil // a read-only mount holds no writes
	}
	unlock, err := locks.Lock(ctx, target)
	if err != nil {
		return coded(codes.DeadlineExceeded, "an earlier flush of %s is still running: %v", target, err)
	}
	type result struct {
		st  syncStats
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		defer unlock()
		st, err := syncFn(ctx, target)
		done <- result{st, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			return r.err
		}
		klog.V(3).InfoS("mount flushed", "target", target, "files", r.st.files, "dirs", r.st.dirs, "duration", time.Since(start))
		return nil
	case <-ctx.Done():
		return coded(codes.DeadlineExceeded, "flush of %s did not finish in time (%s): %v", target, time.Since(start).Round(time.Millisecond), ctx.Err())
	}
}

// syncTree is syncfs on the mount at root, then fsync of every regular file
// and directory below it, never following a symbolic link nor leaving the
// mount's file system.
func syncTree(ctx context.Context, root string) (syncStats, error) {
	var st syncStats
	rootFd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return st, flushErr("opening", root, err)
	}
	rootDir := os.NewFile(uintptr(rootFd), root)
	var rs unix.Stat_t
	if err := unix.Fstat(rootFd, &rs); err != nil {
		rootDir.Close()
		return st, flushErr("stat of", root, err)
	}
	if err := unix.Syncfs(rootFd); err != nil {
		rootDir.Close()
		return st, flushErr("syncfs of", root, err)
	}

	// Workers fsync the files the walk opens.
	files := make(chan fileToSync, flushWorkers*2)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	failed := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return firstErr != nil
	}
	for i := 0; i < flushWorkers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for f := range files {
				if err := unix.Fsync(f.fd); err != nil {
					fail(flushErr("fsync of", f.path, err))
				}
				unix.Close(f.fd)
			}
		}()
	}

	type frame struct {
		dir     *os.File
		path    string
		pending []os.DirEntry
	}
	stack := []frame{{dir: rootDir, path: root}}
	var walkErr error
	for len(stack) > 0 && walkErr == nil {
		if err := ctx.Err(); err != nil {
			walkErr = coded(codes.DeadlineExceeded, "flush of %s stopped: %v", root, err)
			break
		}
		if failed() {
			break
		}
		top := &stack[len(stack)-1]
		if len(top.pending) == 0 {
			ents, err := top.dir.ReadDir(readBatch)
			if len(ents) == 0 {
				if err != nil && !errors.Is(err, io.EOF) {
					walkErr = flushErr("reading", top.path, err)
					break
				}
				// Done with it: wait for its pending metadata operations.
				if err := unix.Fsync(int(top.dir.Fd())); err != nil {
					walkErr = flushErr("fsync of", top.path, err)
					break
				}
				st.dirs++
				top.dir.Close()
				stack = stack[:len(stack)-1]
				continue
			}
			top.pending = ents
		}
		e := top.pending[0]
		top.pending = top.pending[1:]
		t := e.Type()
		if !t.IsDir() && !t.IsRegular() {
			continue // symbolic links and special files hold no data of their own
		}
		path := filepath.Join(top.path, e.Name())
		flags := unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC | unix.O_NOCTTY | unix.O_NONBLOCK
		if t.IsDir() {
			flags |= unix.O_DIRECTORY
		}
		fd, err := unix.Openat(int(top.dir.Fd()), e.Name(), flags, 0)
		if err != nil {
			if vanished(err) {
				continue // removed or replaced meanwhile: nothing of it to flush
			}
			walkErr = flushErr("opening", path, err)
			break
		}
		var fs unix.Stat_t
		if err := unix.Fstat(fd, &fs); err != nil {
			unix.Close(fd)
			walkErr = flushErr("stat of", path, err)
			break
		}
		switch {
		case fs.Dev != rs.Dev:
			unix.Close(fd) // another file system mounted inside
		case t.IsDir() && fs.Mode&unix.S_IFMT == unix.S_IFDIR:
			if len(stack) >= maxFlushDepth {
				unix.Close(fd)
				walkErr = coded(codes.FailedPrecondition, "flush of %s: directories nest deeper than %d levels", root, maxFlushDepth)
				break
			}
			stack = append(stack, frame{dir: os.NewFile(uintptr(fd), path), path: path})
		case fs.Mode&unix.S_IFMT == unix.S_IFREG:
			st.files++
			files <- fileToSync{fd: fd, path: path}
		default:
			unix.Close(fd) // its type changed meanwhile
		}
	}
	for _, fr := range stack {
		fr.dir.Close()
	}
	close(files)
	wg.Wait()
	if walkErr != nil {
		return st, walkErr
	}
	return st, firstErr
}

type fileToSync struct {
	fd   int
	path string
}

// vanished says whether opening a directory entry failed because it is gone
// or is no longer what it was (now a symbolic link, a socket...).
func vanished(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENXIO) ||
		errors.Is(err, unix.ENOTDIR)
}

// flushErr names what failed; the code follows the errno (EIO Internal,
// EDQUOT ResourceExhausted, ENOTCONN of a dead mount FailedPrecondition...).
func flushErr(what, path string, err error) error {
	code := rcsi.Code(err)
	if deadMount(err) {
		code = codes.FailedPrecondition
	}
	return &codedError{code: code, msg: "flush: " + what + " " + path + ": " + err.Error(), err: err}
}
