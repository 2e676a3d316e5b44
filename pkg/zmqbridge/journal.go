package zmqbridge

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Record is one journaled event.
type Record struct {
	Seq   uint64
	Topic string
	Data  []byte // the event JSON
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
}

// ErrTruncated is returned by Read when the requested events were dropped by retention.
var ErrTruncated = errors.New("truncated")

var errClosed = errors.New("journal closed")

// Journal is an append-only log of events in checksummed segment files, with
// group commit, crash recovery and retention by size and age.
//
// Append only encodes the record into memory; the committer goroutine writes
// everything pending with one write(2) and then fdatasyncs the active
// segment, once per group commit. The active segment's file is preallocated
// to SegmentBytes (fallocate(2), where the file system supports it), so those
// writes land inside the file and the fdatasync has no size change to commit;
// its unused rest reads as zeros, which recovery takes for the end of the
// data. Sealing a segment truncates its file to its data and fsyncs it fully
// (its mtime dates it for MaxAge). A record survives a process crash once
// written (the committer writes within one group commit) and a power cut once
// Sync returned.
type Journal struct {
	o JournalOptions

	mu         sync.Mutex
	commitCond sync.Cond  // the committer waits here for work
	syncCond   sync.Cond  // Sync callers wait here for synced to advance
	segs       []*segment // oldest first; the last one is active
	active     *os.File
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
	retired                 []*os.File // sealed segments for the committer to close
	dirDirty                bool       // a segment file was created since the last directory fsync
	synced                  uint64     // every record with Seq <= synced is fsynced
	syncReq                 uint64     // highest seq a Sync caller waits for
	err                     error      // sticky write or fsync error
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
	segs, err := listSegments(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	j := &Journal{o: o, done: make(chan struct{})}
	j.commitCond.L = &j.mu
	j.syncCond.L = &j.mu
	if len(segs) == 0 {
		s := &segment{first: 1, path: filepath.Join(o.Dir, segName(1)), indexed: true}
		if j.active, j.prealloc, err = j.createSegment(s.path); err != nil {
			return nil, fmt.Errorf("journal: %w", err)
		}
		j.segs = []*segment{s}
	} else {
		for _, s := range segs[:len(segs)-1] {
			st, err := os.Stat(s.path)
			if err != nil {
				return nil, fmt.Errorf("journal: %w", err)
			}
			s.size, s.newest = st.Size(), st.ModTime()
			j.total += s.size
		}
		s := segs[len(segs)-1]
		if j.active, err = os.OpenFile(s.path, os.O_RDWR, 0); err != nil {
			return nil, fmt.Errorf("journal: %w", err)
		}
		// Recovery fsyncs the segment, so everything found is durable.
		if j.last, err = recoverSegment(j.active, s); err != nil {
			j.active.Close()
			return nil, fmt.Errorf("journal: recover %s: %w", s.path, err)
		}
		if s.size < o.SegmentBytes { // else the next Append seals it
			j.prealloc = j.preallocate(j.active)
		}
		j.total += s.size
		if n := len(s.index); n > 0 {
			j.ix.next = s.index[n-1].off + indexStride
		}
		j.segs = segs
	}
	if err := syncDir(o.Dir); err != nil {
		j.active.Close()
		return nil, fmt.Errorf("journal: %w", err)
	}
	j.synced, j.written = j.last, j.last
	j.retainLocked(o.Now())
	go j.commitLoop()
	return j, nil
}

// Append assigns the next sequence number, calls build(seq) to get the record's data
// (the JSON contains seq), and queues the record in memory: it does not write.
// The committer writes what is pending at its next group commit (which Sync or
// RequestSync asks for), as do Read, rotation and an Append that finds over
// 1 MiB pending. A record survives a process crash once written and a power
// cut once Sync returned; if the write fails, the journal fails (Err) and the
// records not yet written are lost. Safe for concurrent use; sequence order ==
// file order.
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
	if s.size >= j.o.SegmentBytes {
		// If the new segment cannot be created, the next Append retries.
		if err := j.rotateLocked(); err != nil && j.err != nil {
			return Record{}, err
		}
	}
	return Record{Seq: seq, Topic: topic, Data: data}, nil
}

// maxPending is how many encoded bytes Append lets wait for the committer
// before it writes them itself.
const maxPending = 1 << 20

// flushLocked writes the pending records to the active segment with one
// write(2). On failure it takes back a partial write, drops the pending
// records (their seqs were handed out: they are lost) and fails the journal.
func (j *Journal) flushLocked() error {
	if len(j.pend) == 0 {
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
		if j.err == nil {
			j.err = fmt.Errorf("journal: %w", err)
		}
		j.total -= s.size - off
		s.size = off
		for len(s.index) > 0 && s.index[len(s.index)-1].off >= off {
			s.index = s.index[:len(s.index)-1]
		}
		j.pend = j.pend[:0]
		j.syncCond.Broadcast()
		return j.err
	}
	j.written = j.last
	if cap(j.pend) > 4*maxPending {
		j.pend = nil // do not pin one huge record's buffer
	} else {
		j.pend = j.pend[:0]
	}
	return nil
}

// rotateLocked seals the active segment, starts a new one and applies
// retention. Sealing truncates the file to its data (dropping the
// preallocated rest), stamps its mtime and fsyncs it, in that order.
func (j *Journal) rotateLocked() error {
	s := j.segs[len(j.segs)-1]
	// Write what is pending first: the mtime set below must be the last.
	if err := j.flushLocked(); err != nil {
		return err
	}
	// A sealed segment's file size is its data: OpenJournal takes it as the
	// segment's size without scanning, for Bytes and retention. A crash before
	// the fsync below leaves this segment the last one, which recovery scans:
	// either size is fine there. On failure nothing is sealed, and the next
	// Append retries.
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
	// Seal durably before anything lands in the next segment: a torn record can
	// then only be in the last segment, which is all recovery scans.
	if err := j.fsync(j.active); err != nil {
		j.err = fmt.Errorf("journal: %w", err)
		return j.err
	}
	ns := &segment{first: j.last + 1, path: filepath.Join(j.o.Dir, segName(j.last+1)), indexed: true}
	f, prealloc, err := j.createSegment(ns.path)
	if err != nil {
		return err
	}
	j.prealloc = prealloc
	s.newest = newest
	j.activeFirst, j.activeLast = time.Time{}, time.Time{}
	j.retired = append(j.retired, j.active)
	j.active = f
	j.segs = append(j.segs, ns)
	j.ix = indexer{}
	j.dirDirty = true
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
	if !j.activeFirst.IsZero() && (now.Sub(j.activeFirst) > j.o.MaxAge || j.total > j.o.MaxBytes) {
		return j.rotateLocked()
	}
	j.retainLocked(now)
	return nil
}

// retainLocked drops the oldest sealed segments beyond MaxBytes or MaxAge.
func (j *Journal) retainLocked(now time.Time) {
	for len(j.segs) > 1 {
		s := j.segs[0]
		if j.total <= j.o.MaxBytes && now.Sub(s.newest) <= j.o.MaxAge {
			return
		}
		if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return // try again at the next rotation
		}
		j.total -= s.size
		j.segs[0] = nil
		j.segs = j.segs[1:]
	}
}

// commitLoop is the group committer: each round writes everything appended
// so far and fdatasyncs the active segment, on behalf of every Sync caller
// waiting at that moment. fdatasync persists the data and what reading it
// back needs (the file size, if the write grew the file), but not the mtime,
// which matters only once the segment is sealed, and sealing fsyncs fully.
// The write happens under mu (Appends wait for it; the batch is small), the
// sync outside it.
func (j *Journal) commitLoop() {
	defer close(j.done)
	j.mu.Lock()
	defer j.mu.Unlock()
	for {
		for !j.closed && len(j.retired) == 0 && (j.syncReq <= j.synced || j.err != nil) {
			j.commitCond.Wait()
		}
		retired, closing := j.retired, j.closed
		_ = j.flushLocked() // a failure is sticky in j.err
		target, f, dirty := j.written, j.active, j.dirDirty
		if j.err != nil || (j.syncReq <= j.synced && !closing) {
			f = nil // only retired files to close
		} else {
			j.dirDirty = false
		}
		j.retired = nil
		j.mu.Unlock()
		start := time.Now()
		err := j.commit(retired, f, dirty)
		took := time.Since(start)
		j.mu.Lock()
		if err != nil && j.err == nil {
			j.err = fmt.Errorf("journal: %w", err)
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
			if err := j.active.Close(); err != nil && j.err == nil {
				j.err = fmt.Errorf("journal: %w", err)
			}
			j.stopped = true
		}
		j.syncCond.Broadcast()
		if closing {
			return
		}
	}
}

// commit closes the retired files (rotation fsynced them) and, unless active
// is nil, fsyncs the directory if dirty and fdatasyncs the active file. Only
// the committer closes files, so none is closed under its sync.
func (j *Journal) commit(retired []*os.File, active *os.File, dirty bool) error {
	var err error
	for _, f := range retired {
		if e := f.Close(); err == nil {
			err = e
		}
	}
	if active == nil || err != nil {
		return err
	}
	if dirty {
		if err := syncDir(j.o.Dir); err != nil {
			return err
		}
	}
	return j.datasync(active)
}

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

// Err returns the journal's sticky write or fsync error, if any.
func (j *Journal) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}

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

// Read returns records with Seq > after, in order, at most max (max <= 0 means 1000),
// including records appended but not yet synced (it writes them first).
// It returns ErrTruncated if retention dropped any of them, and an error if one is corrupt.
// After a failed write it returns the records that were written, then the journal's error.
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
		j.mu.Unlock()
		return nil, ErrTruncated
	}
	want := after + 1
	stop := min(last, after+uint64(max))
	i := sort.Search(len(j.segs), func(i int) bool { return j.segs[i].first > want }) - 1
	var views []segView
	for k := i; k < len(j.segs) && j.segs[k].first <= stop; k++ {
		v := segView{segment: *j.segs[k], end: last}
		if k+1 < len(j.segs) {
			v.end = j.segs[k+1].first - 1
		}
		views = append(views, v)
	}
	j.mu.Unlock()

	out := make([]Record, 0, stop-after)
	for _, v := range views {
		if want > stop {
			break
		}
		if v.first > want {
			return nil, fmt.Errorf("journal: %w: no record %d before %s", errCorrupt, want, v.path)
		}
		var err error
		if out, err = j.readSegment(&v, want, min(v.end, stop), out); err != nil {
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
	j.mu.Unlock()
	<-j.done
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.err
}
