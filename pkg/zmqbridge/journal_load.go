package zmqbridge

// Loading a journal from its files (at open, and to repair it after a failed
// write or fsync) and its epoch.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/klog/v2"
)

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
	j.keepQueue = nil // retention queues the new segments again
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
