package zmqbridge

// The journal's group committer: writes, syncs, sealing and retention's
// deletions, and the Sync calls that wait for it.

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"k8s.io/klog/v2"
)

// work says whether the committer has something to do.
func (j *Journal) work() bool {
	if j.closed || len(j.retired) > 0 {
		return true
	}
	if j.err != nil {
		return j.repairReq
	}
	return j.sealing != nil || len(j.drop) > 0 || j.syncReq > j.synced
}

// commitLoop is the group committer: each round writes everything appended
// so far and fdatasyncs the active segment, on behalf of every Sync caller
// waiting at that moment. fdatasync persists the data and what reading it
// back needs (the file size, if the write grew the file), but not the mtime,
// which matters only once the segment is sealed, and sealing fsyncs fully.
// The write happens under mu (Appends wait for it; the batch is small), the
// syncs, the sealing and repairs outside it.
func (j *Journal) commitLoop() {
	defer close(j.done)
	j.mu.Lock()
	defer j.mu.Unlock()
	for {
		for !j.work() {
			j.commitCond.Wait()
		}
		if j.err != nil && j.repairReq && !j.closed {
			j.repairLocked()
			continue
		}
		if j.sealing != nil && j.err == nil {
			j.sealLocked()
		}
		retired, closing := j.retired, j.closed
		_ = j.flushLocked() // a failure is sticky in j.err
		target, f := j.written, j.active
		var drops []string
		dir := false
		if j.err == nil {
			dir, drops = j.dirDirty || len(j.drop) > 0, j.drop
			j.dirDirty, j.drop = false, nil
		}
		if j.err != nil || (j.syncReq <= j.synced && !closing) {
			f = nil // no data sync this round
		}
		j.retired = nil
		j.mu.Unlock()
		start := time.Now()
		err := j.commit(retired, dir, drops, f)
		took := time.Since(start)
		j.mu.Lock()
		if err != nil {
			j.failLocked(err)
		}
		if err == nil && f != nil && target > j.synced {
			j.synced = target
			if hook := j.o.OnSynced; hook != nil {
				j.mu.Unlock()
				hook(target, took)
				j.mu.Lock()
			}
		}
		if closing {
			for _, f := range []*os.File{j.active, j.sealing} {
				if f == nil {
					continue
				}
				if err := f.Close(); err != nil && j.err == nil {
					j.err = fmt.Errorf("journal: %w", err)
				}
			}
			j.stopped = true
		}
		j.syncCond.Broadcast()
		if closing {
			return
		}
	}
}

// sealLocked fsyncs the segment rotation sealed and creates the next one's
// file, both off the lock; on failure the journal fails (Repair retries).
func (j *Journal) sealLocked() {
	old, ns := j.sealing, j.segs[len(j.segs)-1]
	j.mu.Unlock()
	err := j.fsync(old)
	var f *os.File
	var prealloc bool
	if err == nil {
		f, prealloc, err = j.createSegment(ns.path)
	}
	j.mu.Lock()
	if err != nil {
		j.failLocked(fmt.Errorf("sealing %s: %w", old.Name(), err))
		return
	}
	j.sealing = nil
	j.retired = append(j.retired, old)
	j.active, j.prealloc = f, prealloc
	j.dirDirty = true
	j.syncCond.Broadcast() // Appends waiting to rotate again
}

// commit closes the retired files (the committer fsynced them when sealing),
// fsyncs the directory if dir and then removes the segment files retention
// dropped, and fdatasyncs active unless it is nil. Only the committer closes
// files, so none is closed under its sync.
func (j *Journal) commit(retired []*os.File, dir bool, drops []string, active *os.File) error {
	var err error
	for _, f := range retired {
		if e := f.Close(); err == nil {
			err = e
		}
	}
	if err != nil {
		return err
	}
	if dir {
		if err := syncDir(j.o.Dir); err != nil {
			return err
		}
	}
	for _, p := range drops {
		if err := fileRemove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			klog.ErrorS(err, "event journal retention: removing a dropped segment", "segment", p)
		}
	}
	if active == nil {
		return nil
	}
	return j.datasync(active)
}

// fileRemove removes a dropped segment file; tests stub it.
var fileRemove = os.Remove

// fsync is a full fsync of a segment file (sealing).
func (j *Journal) fsync(f *os.File) error {
	j.fsyncs.Add(1)
	return fileSync(f)
}

// datasync is the committer's fdatasync of the active segment file.
func (j *Journal) datasync(f *os.File) error {
	j.fsyncs.Add(1)
	return fileDatasync(f)
}

// RequestSync asks for records up to seq to be made durable without waiting
// (OnSynced tells when).
func (j *Journal) RequestSync(seq uint64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if seq > j.syncReq && !j.closed {
		j.syncReq = seq
		j.commitCond.Signal()
	}
}

// Err returns the journal's write or fsync error, if it failed and was not
// repaired since. It never waits for a sync.
func (j *Journal) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

// Epoch is the journal's random ID, made when the journal was created (and
// kept in its directory): a journal lost and created again has another.
func (j *Journal) Epoch() string { return j.epoch }

// Sync blocks until every record with Seq <= seq is synced to disk (the
// committer's fdatasync). Group commit: concurrent callers share syncs (one
// background committer goroutine), so N concurrent Append+Sync pairs cost far
// fewer than N syncs.
func (j *Journal) Sync(seq uint64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return errClosed
	}
	seq = min(seq, j.last)
	for j.synced < seq {
		if j.err != nil {
			return j.err
		}
		if j.stopped {
			return errClosed
		}
		if seq > j.syncReq {
			j.syncReq = seq
			j.commitCond.Signal()
		}
		j.syncCond.Wait()
	}
	return nil
}

// SyncRecord blocks until r (returned by Append) is durable, the journal
// fails, or ctx ends. A record lost by a failed write or fsync is reported
// as such (ErrUnavailable) even after a repair gave its seq to another.
func (j *Journal) SyncRecord(ctx context.Context, r Record) error {
	stop := context.AfterFunc(ctx, func() {
		j.mu.Lock()
		j.syncCond.Broadcast()
		j.mu.Unlock()
	})
	defer stop()
	j.mu.Lock()
	defer j.mu.Unlock()
	for {
		if r.gen != j.gen && r.Seq > j.lost[r.gen] {
			return fmt.Errorf("%w: record %d was lost by a failed write or fsync", ErrUnavailable, r.Seq)
		}
		if j.synced >= r.Seq {
			return nil
		}
		if j.err != nil {
			return j.err
		}
		if j.stopped {
			return errClosed
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%w: waiting for the journal's fsync: %w", ErrUnavailable, err)
		}
		if r.Seq > j.syncReq {
			j.syncReq = r.Seq
			j.commitCond.Signal()
		}
		j.syncCond.Wait()
	}
}
