package zmqbridge

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"
)

// Record is one journaled event.
type Record struct {
	Seq   uint64
	Topic string
	Data  []byte // the event JSON
	gen   uint64 // the journal generation that appended it (see Repair)
}

// JournalOptions configures OpenJournal.
type JournalOptions struct {
	Dir string // created 0700 if missing
	// SegmentBytes is the size past which the active segment is sealed and a
	// new one started (default 16 MiB). The active segment's file is
	// preallocated to this size, so the disk holds up to this much more than
	// the journal's data (Bytes).
	SegmentBytes int64
	MaxBytes     int64            // drop oldest whole segments while the total exceeds this (default 256 MiB)
	MaxAge       time.Duration    // drop whole segments whose newest record is older than this (default 7 days); 0 = default
	Now          func() time.Time // for tests; default time.Now
	// OnSynced, if set, is called (not under any lock) each time records up
	// to seq became durable, with how long that sync (the committer's
	// fdatasync) took.
	OnSynced func(seq uint64, took time.Duration)
	// OnAppend, if set, is called under the journal's lock with each record
	// Append queues, in sequence order; it must return at once.
	OnAppend func(Record)
	// OnRewind, if set, is called under the journal's lock when a repair
	// dropped the records after seq, which never became durable (nobody saw
	// them): their sequence numbers are given again.
	OnRewind func(seq uint64)
}

// ErrTruncated is returned by Read (as a *GapError) when the requested events
// were dropped by retention or cut out of a corrupt segment.
var ErrTruncated = errors.New("truncated")

// GapError says the records after the asked-for sequence up to First-1 are
// gone; it matches ErrTruncated.
type GapError struct{ First uint64 }

func (e *GapError) Error() string {
	return fmt.Sprintf("truncated: the journal holds no record before %d", e.First)
}

// Is makes errors.Is(err, ErrTruncated) true.
func (e *GapError) Is(target error) bool { return target == ErrTruncated }

// ErrUnavailable wraps the error of a journal that failed (a write or fsync
// error: disk full, EIO): nothing can be appended until Repair succeeds.
var ErrUnavailable = errors.New("event journal unavailable")

var errClosed = errors.New("journal closed")

// noLimit is load's limit when every record found is kept.
const noLimit = math.MaxUint64

// Journal is an append-only log of events in checksummed segment files, with
// group commit, crash recovery, retention by size and age, and repair after
// a failed write or fsync.
//
// Append only encodes the record into memory; the committer goroutine writes
// everything pending with one write(2) and then fdatasyncs the active
// segment, once per group commit. The active segment's file is preallocated
// to SegmentBytes (fallocate(2), where the file system supports it), so those
// writes land inside the file and the fdatasync has no size change to commit;
// its unused rest reads as zeros, which recovery takes for the end of the
// data. Rotation truncates the full segment's file to its data and stamps its
// mtime (which dates it for MaxAge) under the lock; the committer then fsyncs
// it fully and creates the next segment's file, off the lock, before any
// record is written there. A record survives a process crash once written
// (the committer writes within one group commit) and a power cut once Sync
// returned.
type Journal struct {
	o     JournalOptions
	epoch string

	mu         sync.Mutex
	commitCond sync.Cond  // the committer waits here for work
	syncCond   sync.Cond  // Sync callers wait here for synced to advance
	segs       []*segment // oldest first; the last one is active
	// active is the active segment's file; nil while its file is not
	// created yet (the committer seals the previous one first: sealing).
	active  *os.File
	sealing *os.File // a full segment the committer must fsync before the next one starts
	// prealloc says the active file was preallocated to SegmentBytes: it is
	// longer than the active segment's data, the rest zeros.
	prealloc    bool
	allocLogged bool    // a failed preallocation was logged
	ix          indexer // sparse index state of the active segment
	// pend holds encoded records not yet written to the active segment;
	// they belong at offset size-len(pend) of it (size counts them).
	pend    []byte
	written uint64 // every record with Seq <= written is in the file
	last    uint64
	total   int64
	// Times of the active segment's first and latest appends (zero: empty).
	activeFirst, activeLast time.Time
	retired                 []*os.File        // sealed segments for the committer to close
	drop                    []string          // segment files retention dropped, removed after a directory fsync
	dirDirty                bool              // a segment file was created since the last directory fsync
	synced                  uint64            // every record with Seq <= synced is fsynced
	syncReq                 uint64            // highest seq a Sync caller waits for
	err                     error             // write or fsync error, until a repair
	gen                     uint64            // incremented by each successful repair
	lost                    map[uint64]uint64 // generation -> synced when it ended: its later records were lost
	repairReq               bool              // Repair waits for the committer to try
	repairs                 uint64            // repair attempts made
	closed                  bool
	stopped                 bool // the committer has exited
	done                    chan struct{}

	fsyncs atomic.Int64 // file fsyncs and fdatasyncs done, for tests
}

// OpenJournal opens (or creates) the journal in o.Dir, drops a torn or corrupt
// tail of the newest segment, and applies retention.
func OpenJournal(o JournalOptions) (*Journal, error) {
	if o.Dir == "" {
		return nil, errors.New("journal: no directory")
	}
	if o.SegmentBytes <= 0 {
		o.SegmentBytes = 16 << 20
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = 256 << 20
	}
	if o.MaxAge <= 0 {
		o.MaxAge = 7 * 24 * time.Hour
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	j := &Journal{o: o, done: make(chan struct{}), lost: map[uint64]uint64{}}
	j.commitCond.L = &j.mu
	j.syncCond.L = &j.mu
	ld, err := j.load(noLimit)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	if j.epoch, err = loadEpoch(o.Dir, ld.fresh); err != nil {
		ld.active.Close()
		return nil, fmt.Errorf("journal: %w", err)
	}
	j.install(ld)
	j.synced = j.last
	j.retainLocked(o.Now())
	go j.commitLoop()
	return j, nil
}

// Append assigns the next sequence number, calls build(seq) to get the record's data
// (the JSON contains seq), and queues the record in memory: it does not write.
// The committer writes what is pending at its next group commit (which Sync or
// RequestSync asks for), as do Read, rotation and an Append that finds over
// 1 MiB pending. A record survives a process crash once written and a power
// cut once Sync returned; if the write fails, the journal fails (Err, wrapping
// ErrUnavailable) and the records not yet durable are lost: SyncRecord says
// so. Safe for concurrent use; sequence order == file order.
func (j *Journal) Append(topic string, build func(seq uint64) []byte) (Record, error) {
	if len(topic) > maxTopicLen {
		return Record{}, fmt.Errorf("journal: topic of %d bytes is longer than %d", len(topic), maxTopicLen)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return Record{}, errClosed
	}
	if j.err != nil {
		return Record{}, j.err
	}
	seq := j.last + 1
	data := build(seq)
	if n := payloadMin + len(topic) + len(data); n > maxPayload {
		return Record{}, fmt.Errorf("journal: record of %d bytes is larger than %d", n, maxPayload)
	}
	before := len(j.pend)
	j.pend = encodeRecord(j.pend, seq, topic, data)
	n := int64(len(j.pend) - before)
	s := j.segs[len(j.segs)-1]
	s.index = j.ix.add(s.index, seq, s.size)
	s.size += n
	j.total += n
	j.last = seq
	now := j.o.Now()
	if j.activeFirst.IsZero() {
		j.activeFirst = now
	}
	j.activeLast = now
	rec := Record{Seq: seq, Topic: topic, Data: data, gen: j.gen}
	if j.o.OnAppend != nil {
		j.o.OnAppend(rec)
	}
	if len(j.pend) > maxPending {
		// Keep memory bounded when nobody asks for a sync.
		if err := j.flushLocked(); err != nil {
			return Record{}, err
		}
	}
	if half := j.o.SegmentBytes / 2; s.size >= half && s.size-n < half && j.syncReq < seq {
		// Start writeback early so the fsync at rotation has less to do.
		j.syncReq = seq
		j.commitCond.Signal()
	}
	for j.err == nil && !j.closed && j.segs[len(j.segs)-1].size >= j.o.SegmentBytes {
		if j.sealing != nil {
			j.syncCond.Wait() // the committer is still sealing the previous segment
			continue
		}
		// If the segment cannot be sealed, the next Append retries.
		if err := j.rotateLocked(); err != nil && j.err != nil {
			return Record{}, err
		}
		break
	}
	return rec, nil
}

// maxPending is how many encoded bytes Append lets wait for the committer
// before it writes them itself.
const maxPending = 1 << 20

// failLocked fails the journal with err (the first error stays).
func (j *Journal) failLocked(err error) error {
	if j.err == nil {
		j.err = fmt.Errorf("%w: %w", ErrUnavailable, err)
		klog.ErrorS(err, "event journal failed: refusing events until it is repaired", "dir", j.o.Dir)
	}
	j.syncCond.Broadcast()
	return j.err
}

// flushLocked writes the pending records to the active segment with one
// write(2) (not while the committer is creating that segment's file). On
// failure it takes back a partial write, drops the pending records (their
// seqs were handed out: they are lost) and fails the journal.
func (j *Journal) flushLocked() error {
	if len(j.pend) == 0 || j.active == nil {
		return nil
	}
	s := j.segs[len(j.segs)-1]
	off := s.size - int64(len(j.pend))
	n, err := fileWriteAt(j.active, j.pend, off)
	if err != nil {
		if n > 0 {
			// Never leave a partial record behind: recovery would only drop
			// it, but Read would report it as corrupt.
			if terr := j.active.Truncate(off); terr != nil {
				err = fmt.Errorf("%w; partial write not undone: %w", err, terr)
			} else {
				j.prealloc = false // the preallocated rest went too
			}
		}
		j.total -= s.size - off
		s.size = off
		for len(s.index) > 0 && s.index[len(s.index)-1].off >= off {
			s.index = s.index[:len(s.index)-1]
		}
		j.pend = j.pend[:0]
		return j.failLocked(err)
	}
	j.written = j.last
	if cap(j.pend) > 4*maxPending {
		j.pend = nil // do not pin one huge record's buffer
	} else {
		j.pend = j.pend[:0]
	}
	return nil
}

// rotateLocked seals the active segment and starts the next one: it writes
// what is pending, truncates the file to its data (dropping the preallocated
// rest) and stamps its mtime, then hands the file to the committer, which
// fsyncs it and creates the next segment's file (off the lock) before any
// record is written there. Records appended meanwhile wait in memory. It
// applies retention. Only when sealing is nil.
func (j *Journal) rotateLocked() error {
	s := j.segs[len(j.segs)-1]
	// Write what is pending first: the mtime set below must be the last.
	if err := j.flushLocked(); err != nil {
		return err
	}
	// A sealed segment's file size is its data: OpenJournal takes it as the
	// segment's size without scanning, for Bytes and retention. A crash before
	// the committer's fsync leaves this segment the last one, which recovery
	// scans: either size is fine there. On failure nothing is sealed, and the
	// next Append retries.
	if err := j.active.Truncate(s.size); err != nil {
		return fmt.Errorf("journal: sealing: %w", err)
	}
	j.prealloc = false
	// Stamp the sealed segment's mtime with the time of its newest record, by
	// the journal's clock, so MaxAge holds across restarts.
	now := j.o.Now()
	newest := j.activeLast
	if newest.IsZero() {
		newest = now
	}
	_ = os.Chtimes(s.path, newest, newest)
	s.newest = newest
	ns := &segment{first: j.last + 1, path: filepath.Join(j.o.Dir, segName(j.last+1)), indexed: true}
	j.sealing, j.active = j.active, nil
	j.segs = append(j.segs, ns)
	j.ix = indexer{}
	j.activeFirst, j.activeLast = time.Time{}, time.Time{}
	j.retainLocked(now)
	j.commitCond.Signal()
	return nil
}

// Maintain applies retention on a quiet journal, where no rotation comes: it
// seals the active segment once its oldest record is past MaxAge or the
// journal is over MaxBytes, then drops what retention allows. Call it now
// and then (the bridge does every minute).
func (j *Journal) Maintain() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed || j.err != nil {
		return j.err
	}
	now := j.o.Now()
	if j.sealing == nil && !j.activeFirst.IsZero() && (now.Sub(j.activeFirst) > j.o.MaxAge || j.total > j.o.MaxBytes) {
		return j.rotateLocked()
	}
	j.retainLocked(now)
	return nil
}

// retainLocked drops the oldest sealed segments beyond MaxBytes or MaxAge:
// at once from the journal, and the committer removes their files after a
// directory fsync (so a new segment is durable before old ones go).
func (j *Journal) retainLocked(now time.Time) {
	for len(j.segs) > 1 {
		s := j.segs[0]
		if j.total <= j.o.MaxBytes && now.Sub(s.newest) <= j.o.MaxAge {
			return
		}
		j.drop = append(j.drop, s.path)
		j.total -= s.size
		j.segs[0] = nil
		j.segs = j.segs[1:]
	}
	if len(j.drop) > 0 {
		j.commitCond.Signal()
	}
}

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

// Repair asks the committer to bring a failed journal back and waits for
// that attempt (or ctx): the committer drops every record that never became
// durable (nobody saw them; their seqs are given again), reads the files as
// OpenJournal does and lets Append continue. It returns nil if the journal
// works, else why not (wrapping ErrUnavailable).
func (j *Journal) Repair(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		j.mu.Lock()
		j.syncCond.Broadcast()
		j.mu.Unlock()
	})
	defer stop()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.err == nil {
		return nil
	}
	if j.closed {
		return errClosed
	}
	attempt := j.repairs
	j.repairReq = true
	j.commitCond.Signal()
	for j.repairs == attempt && j.err != nil && !j.stopped {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%w: waiting for a repair: %w", ErrUnavailable, err)
		}
		j.syncCond.Wait()
	}
	return j.err
}

// repairLocked runs on the committer while the journal has failed (Append
// refuses, so nothing else writes): it closes the files, removes dropped
// segments, and reloads the journal from disk keeping only records up to
// synced (load). The I/O is done off the lock.
func (j *Journal) repairLocked() {
	files := append(j.retired, j.active, j.sealing)
	drops, limit := j.drop, j.synced
	j.active, j.sealing, j.retired, j.drop = nil, nil, nil, nil
	j.mu.Unlock()
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
	err := syncDir(j.o.Dir)
	if err == nil {
		_ = j.commit(nil, false, drops, nil)
	}
	var ld *loaded
	if err == nil {
		ld, err = j.load(limit)
	}
	if err == nil && ld.last != limit {
		ld.active.Close()
		err = fmt.Errorf("records up to %d were synced but the files hold only up to %d", limit, ld.last)
	}
	j.mu.Lock()
	j.repairs++
	j.repairReq = false
	if err != nil {
		klog.ErrorS(err, "event journal repair failed", "dir", j.o.Dir)
		j.drop = append(j.drop, drops...)
	} else {
		klog.InfoS("event journal repaired: appending again", "dir", j.o.Dir, "lastSeq", limit, "lost", j.last-limit)
		j.lost[j.gen] = limit
		j.gen++
		j.install(ld)
		j.syncReq = limit // what was asked for beyond it is lost
		j.err = nil
		if j.o.OnRewind != nil {
			j.o.OnRewind(limit)
		}
	}
	j.syncCond.Broadcast()
}

// Read returns records with Seq > after, in order, at most max (max <= 0 means 1000),
// including records appended but not yet synced (it writes them first).
// It returns a *GapError (ErrTruncated) if the records right after `after`
// are gone (retention, or cut out of a corrupt segment), and an error if one
// is corrupt. After a failed write it returns the records that were written,
// then the journal's error.
func (j *Journal) Read(after uint64, max int) ([]Record, error) {
	if max <= 0 {
		max = 1000
	}
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return nil, errClosed
	}
	if after >= j.last {
		j.mu.Unlock()
		return []Record{}, nil
	}
	for min(j.last, after+uint64(max)) > j.written && j.sealing != nil && j.err == nil && !j.closed {
		j.syncCond.Wait() // the records asked for wait for the next segment's file
	}
	if j.closed {
		j.mu.Unlock()
		return nil, errClosed
	}
	if min(j.last, after+uint64(max)) > j.written {
		_ = j.flushLocked() // a failure is sticky in j.err, and written stays put
	}
	last := j.written
	if after >= last {
		err := j.err // records after written were lost by a failed write
		j.mu.Unlock()
		return nil, err
	}
	if after+1 < j.segs[0].first {
		first := j.segs[0].first
		j.mu.Unlock()
		return nil, &GapError{First: first}
	}
	want := after + 1
	stop := min(last, after+uint64(max))
	i := sort.Search(len(j.segs), func(i int) bool { return j.segs[i].first > want }) - 1
	var views []segView
	for k := i; k < len(j.segs) && j.segs[k].first <= stop; k++ {
		v := segView{segment: *j.segs[k], end: last}
		if k+1 < len(j.segs) {
			v.end, v.sealed = j.segs[k+1].first-1, true
		}
		views = append(views, v)
	}
	j.mu.Unlock()

	out := make([]Record, 0, stop-after)
	for _, v := range views {
		if want > stop {
			break
		}
		if v.first > want { // a segment file is missing
			if len(out) > 0 {
				return out, nil
			}
			return nil, &GapError{First: v.first}
		}
		var err error
		if out, err = j.readSegment(&v, want, min(v.end, stop), out); err != nil {
			var short *shortError
			if errors.As(err, &short) && v.sealed {
				// Recovery cut this segment short (a corrupt record with
				// valid ones after it): the rest up to the next segment is gone.
				if len(out) > 0 {
					return out, nil
				}
				return nil, &GapError{First: v.end + 1}
			}
			return nil, err
		}
		want = min(v.end, stop) + 1
	}
	return out, nil
}

// First returns the lowest seq still held (Last()+1 when empty).
func (j *Journal) First() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.segs[0].first
}

// Last returns the highest seq appended (0 for a brand-new journal).
func (j *Journal) Last() uint64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.last
}

// Bytes returns the total size of the journal's data, counting records
// appended but not yet written. The preallocated rest of the active
// segment's file is not counted.
func (j *Journal) Bytes() int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.total
}

// Close writes what is pending, syncs and closes; further calls return an
// error. The active segment's file keeps its preallocated rest (zeros after
// the data), which the next OpenJournal takes for the end of the data and
// keeps as the segment's preallocation.
func (j *Journal) Close() error {
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		return errClosed
	}
	j.closed = true
	j.commitCond.Signal()
	j.syncCond.Broadcast()
	j.mu.Unlock()
	<-j.done
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

// loaded is what load found on disk.
type loaded struct {
	segs     []*segment
	active   *os.File
	prealloc bool
	last     uint64
	total    int64
	ix       indexer
	newest   time.Time // time of the active segment's newest record (zero: it has none)
	fresh    bool      // there was no segment: a new journal
}

// load reads the segment files: sealed ones by their size, the newest one
// record by record (recoverSegment), keeping records up to limit only (a
// repair drops what never became durable, and any segment file holding only
// such records). If a corrupt record is followed by valid ones, the segment
// is cut there and the next one starts after the highest valid seq found,
// so no sequence number that may have been published is given again.
func (j *Journal) load(limit uint64) (*loaded, error) {
	o := j.o
	segs, err := listSegments(o.Dir)
	if err != nil {
		return nil, err
	}
	for limit != noLimit && len(segs) > 1 && segs[len(segs)-1].first > limit+1 {
		if err := os.Remove(segs[len(segs)-1].path); err != nil {
			return nil, err
		}
		segs = segs[:len(segs)-1]
	}
	ld := &loaded{}
	if len(segs) == 0 {
		first := uint64(1)
		if limit != noLimit {
			first = limit + 1
		}
		s := &segment{first: first, path: filepath.Join(o.Dir, segName(first)), indexed: true}
		if ld.active, ld.prealloc, err = j.createSegment(s.path); err != nil {
			return nil, err
		}
		ld.segs, ld.last, ld.fresh = []*segment{s}, first-1, limit == noLimit
	} else {
		for _, s := range segs[:len(segs)-1] {
			st, err := os.Stat(s.path)
			if err != nil {
				return nil, err
			}
			s.size, s.newest = st.Size(), st.ModTime()
			ld.total += s.size
		}
		s := segs[len(segs)-1]
		f, err := os.OpenFile(s.path, os.O_RDWR, 0)
		if err != nil {
			return nil, err
		}
		// Recovery fsyncs the segment, so everything found is durable.
		last, after, err := recoverSegment(f, s, limit)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("recover %s: %w", s.path, err)
		}
		ld.total += s.size
		if after > last {
			klog.ErrorS(nil, "event journal recovery: a corrupt record is followed by valid ones; "+
				"continuing after the highest of them (the records in between are reported as truncated)",
				"segment", s.path, "lastGoodSeq", last, "highestSeq", after)
			f.Close()
			s = &segment{first: after + 1, path: filepath.Join(o.Dir, segName(after+1)), indexed: true}
			if f, ld.prealloc, err = j.createSegment(s.path); err != nil {
				return nil, err
			}
			segs, last = append(segs, s), after
		} else if s.size < o.SegmentBytes { // else the next Append seals it
			ld.prealloc = j.preallocate(f)
		}
		if s.size > 0 {
			// Its records' times are not known: the file's mtime (its last
			// write) dates them, so MaxAge applies after a restart too.
			ld.newest = s.newest
		}
		if n := len(s.index); n > 0 {
			ld.ix.next = s.index[n-1].off + indexStride
		}
		ld.segs, ld.active, ld.last = segs, f, last
	}
	if err := syncDir(o.Dir); err != nil {
		ld.active.Close()
		return nil, err
	}
	return ld, nil
}

// install makes what load found the journal's state (under mu, or before
// the committer starts).
func (j *Journal) install(ld *loaded) {
	j.segs, j.active, j.sealing, j.prealloc, j.ix = ld.segs, ld.active, nil, ld.prealloc, ld.ix
	j.total, j.last, j.written, j.pend = ld.total, ld.last, ld.last, nil
	j.activeFirst, j.activeLast = ld.newest, ld.newest
	j.dirDirty = false
}

// epochFile holds the journal's epoch, in its directory.
const epochFile = "epoch"

// loadEpoch reads the journal's epoch, or makes a new one (16 random bytes,
// hex) for a new journal, or when the file is missing or damaged.
func loadEpoch(dir string, fresh bool) (string, error) {
	path := filepath.Join(dir, epochFile)
	if !fresh {
		b, err := os.ReadFile(path)
		if err == nil {
			if e := strings.TrimSpace(string(b)); validEpoch(e) {
				return e, nil
			}
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", err
		}
	}
	var raw [16]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", err
	}
	e := hex.EncodeToString(raw[:])
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	_, err = f.WriteString(e + "\n")
	if err == nil {
		err = fileSync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return "", fmt.Errorf("writing the journal epoch: %w", err)
	}
	if !fresh {
		klog.InfoS("event journal: new epoch for an existing journal (its epoch file was missing or damaged)", "dir", dir, "epoch", e)
	}
	return e, nil
}

func validEpoch(e string) bool {
	if len(e) != 32 {
		return false
	}
	_, err := hex.DecodeString(e)
	return err == nil
}
