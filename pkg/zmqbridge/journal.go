package zmqbridge

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
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
	// Class, with KeepPerClass > 0, makes retention keep the newest
	// KeepPerClass records of each class (Class(record), e.g. a namespace)
	// of the segments it drops, in a file of their own (see Kept), until
	// they are older than MaxAge or, past KeepBytes in all (default:
	// MaxBytes/8, at most 8 MiB), the class holding the most bytes lets its
	// oldest go. Kept records stay in memory.
	Class        func(Record) string
	KeepPerClass int
	KeepBytes    int64
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
	// kept is what retention kept of dropped segments; keepQueue the oldest
	// segments it drops, waiting for the keeper (keepLoop) to keep what it
	// keeps of them (a prefix of segs). Only when keeping.
	kept                         *keptSet
	keepQueue                    []*segment
	keepWake, keepStop, keepDone chan struct{}
	stopKeeper                   sync.Once

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
	if o.KeepBytes <= 0 {
		o.KeepBytes = min(o.MaxBytes/8, 8<<20)
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
	j.kept = &keptSet{lost: map[string]uint64{}}
	if j.keeping() {
		j.kept = j.loadKept(j.segs[0].first)
		j.keepWake, j.keepStop, j.keepDone = make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
		go j.keepLoop()
	}
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
	total := j.total
	for _, s := range j.keepQueue { // on their way out
		total -= s.size
	}
	if j.sealing == nil && !j.activeFirst.IsZero() && (now.Sub(j.activeFirst) > j.o.MaxAge || total > j.o.MaxBytes) {
		return j.rotateLocked()
	}
	j.retainLocked(now)
	return nil
}

// retainLocked drops the oldest sealed segments beyond MaxBytes or MaxAge:
// at once from the journal, and the committer removes their files after a
// directory fsync (so a new segment is durable before old ones go).
func (j *Journal) retainLocked(now time.Time) {
	if j.keeping() {
		j.retainKeptLocked(now)
		return
	}
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
	j.mu.Unlock()
	if j.keepStop != nil {
		// The keeper ends what it started (a kept file written stands for
		// segments that must then go), and the committer deletes them.
		j.stopKeeper.Do(func() { close(j.keepStop) })
		<-j.keepDone
	}
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
