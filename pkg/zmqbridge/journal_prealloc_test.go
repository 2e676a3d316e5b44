package zmqbridge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// encodedRecs is the on-disk encoding of the records from..to as appendN
// writes them.
func encodedRecs(from, to uint64) []byte {
	var b []byte
	for seq := from; seq <= to; seq++ {
		b = encodeRecord(b, seq, eventTopic(seq), eventData(seq))
	}
	return b
}

// firstNonZero returns the index of the first byte of b that is not zero, or -1.
func firstNonZero(b []byte) int {
	for i, c := range b {
		if c != 0 {
			return i
		}
	}
	return -1
}

func allZero(b []byte) bool { return firstNonZero(b) < 0 }

// checkFileData asserts the file at path holds data, then zeros only (the
// preallocated rest of a segment, if any).
func checkFileData(t testing.TB, path string, data []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < len(data) || !bytes.Equal(b[:len(data)], data) {
		t.Fatalf("%s: %d bytes, does not start with the %d bytes of data expected", path, len(b), len(data))
	}
	if i := firstNonZero(b[len(data):]); i >= 0 {
		t.Fatalf("%s: byte %d after the %d bytes of data is not zero", path, len(data)+i, len(data))
	}
}

// stubDatasync replaces the committer's fdatasync with fn until the test
// ends. Tests using it must Close their journals before returning.
func stubDatasync(t *testing.T, fn func(*os.File) error) {
	orig := fileDatasync
	fileDatasync = fn
	t.Cleanup(func() { fileDatasync = orig })
}

// stubAllocate makes every preallocation fail with errno (EOPNOTSUPP, as on a
// file system without fallocate, if 0), after calling fn if set (which may
// change the file, as a failure half way would). It returns the count of
// attempts. Tests using it must Close their journals before returning.
func stubAllocate(t *testing.T, errno unix.Errno, fn func(f *os.File, size int64)) *atomic.Int64 {
	if errno == 0 {
		errno = unix.EOPNOTSUPP
	}
	var calls atomic.Int64
	orig := fileAllocate
	fileAllocate = func(f *os.File, size int64) error {
		calls.Add(1)
		if fn != nil {
			fn(f, size)
		}
		return &os.PathError{Op: "fallocate", Path: f.Name(), Err: errno}
	}
	t.Cleanup(func() { fileAllocate = orig })
	return &calls
}

// copyJournal copies the segment files of dir as they are now into a new
// directory, as a crash (or a power cut after the last Sync) would leave them.
func copyJournal(t *testing.T, dir string) string {
	t.Helper()
	dst := t.TempDir()
	for _, p := range segFiles(t, dir) {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, filepath.Base(p)), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// A new segment's file is preallocated to SegmentBytes, its logical size is
// its data; a reopen after Close finds exactly the records and appends after
// them.
func TestJournalPreallocated(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 64 << 10}
	j := openT(t, o)
	seg := filepath.Join(dir, segName(1))
	if !j.prealloc || fileSize(t, seg) != o.SegmentBytes {
		t.Fatalf("new segment: preallocated %v, file %d bytes, want %d", j.prealloc, fileSize(t, seg), o.SegmentBytes)
	}
	appendN(t, j, 10)
	if err := j.Sync(10); err != nil {
		t.Fatal(err)
	}
	if j.Bytes() != encodedSize(1, 10) || j.segs[0].size != encodedSize(1, 10) {
		t.Fatalf("Bytes() = %d, segment size %d, want %d", j.Bytes(), j.segs[0].size, encodedSize(1, 10))
	}
	if got := fileSize(t, seg); got != o.SegmentBytes {
		t.Fatalf("segment file is %d bytes after appends, want %d", got, o.SegmentBytes)
	}
	checkFileData(t, seg, encodedRecs(1, 10))
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// Close keeps the preallocated rest.
	if got := fileSize(t, seg); got != o.SegmentBytes {
		t.Fatalf("segment file is %d bytes after Close, want %d", got, o.SegmentBytes)
	}
	for round := range 3 {
		j = openT(t, o)
		last := uint64(10 + 5*round)
		if j.Last() != last || j.Bytes() != encodedSize(1, last) || !j.prealloc {
			t.Fatalf("reopen %d: Last() = %d, Bytes() = %d, preallocated %v; want %d, %d, true",
				round, j.Last(), j.Bytes(), j.prealloc, last, encodedSize(1, last))
		}
		checkRecs(t, readAll(t, j, 0), 1, last)
		appendN(t, j, 5)
		if err := j.Sync(last + 5); err != nil {
			t.Fatal(err)
		}
		checkRecs(t, readAll(t, j, 0), 1, last+5)
		checkFileData(t, seg, encodedRecs(1, last+5))
		if got := fileSize(t, seg); got != o.SegmentBytes {
			t.Fatalf("reopen %d: segment file is %d bytes, want %d", round, got, o.SegmentBytes)
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// The committer fdatasyncs the active segment; full fsyncs are for sealing
// (and recovery and directories).
func TestJournalCommitterDatasyncs(t *testing.T) {
	var mu sync.Mutex
	var fsynced, datasynced []string // segment files only
	stubSync(t, func(f *os.File) error {
		if name := filepath.Base(f.Name()); strings.HasSuffix(name, segSuffix) {
			mu.Lock()
			fsynced = append(fsynced, name)
			mu.Unlock()
		}
		return f.Sync()
	})
	datasync := fileDatasync
	stubDatasync(t, func(f *os.File) error {
		mu.Lock()
		datasynced = append(datasynced, filepath.Base(f.Name()))
		mu.Unlock()
		return datasync(f)
	})
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 1 << 10}
	j := openT(t, o)
	seg1 := segName(1)
	for seq := uint64(1); seq <= 3; seq++ {
		appendN(t, j, 1)
		if err := j.Sync(seq); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	if len(datasynced) != 3 || datasynced[0] != seg1 || datasynced[2] != seg1 {
		t.Errorf("fdatasyncs for 3 Syncs: %v, want 3 of %s", datasynced, seg1)
	}
	for _, name := range fsynced {
		if name == seg1 {
			t.Errorf("active segment fsynced: %v", fsynced)
		}
	}
	fsynced, datasynced = nil, nil
	mu.Unlock()
	// Rotation seals segment 1 with a full fsync.
	for len(segFiles(t, dir)) < 2 {
		appendN(t, j, 1)
	}
	mu.Lock()
	if len(fsynced) != 1 || fsynced[0] != seg1 {
		t.Errorf("fsyncs at rotation: %v, want one of %s", fsynced, seg1)
	}
	mu.Unlock()
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// Sealing truncates a segment file to its data, so sizes stay exact across
// a reopen; the active segment stays preallocated.
func TestJournalSealedTruncated(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 1000}
	j := openT(t, o)
	appendN(t, j, 60)
	// A record larger than a segment: the file grows past its preallocation.
	big := bytes.Repeat([]byte("b"), 3000)
	if _, err := j.Append("big", func(uint64) []byte { return big }); err != nil {
		t.Fatal(err)
	}
	appendN(t, j, 3)
	if err := j.Sync(j.Last()); err != nil {
		t.Fatal(err)
	}
	files := segFiles(t, dir)
	if len(files) < 4 || len(files) != len(j.segs) {
		t.Fatalf("%d segment files, %d segments", len(files), len(j.segs))
	}
	var data int64
	for i, s := range j.segs {
		got := fileSize(t, files[i])
		if s.path != files[i] {
			t.Fatalf("segment %d is %s, file %s", i, s.path, files[i])
		}
		data += s.size
		if i == len(j.segs)-1 {
			if got != o.SegmentBytes || !j.prealloc {
				t.Fatalf("active segment file is %d bytes (preallocated %v), want %d", got, j.prealloc, o.SegmentBytes)
			}
			break
		}
		if got != s.size {
			t.Fatalf("sealed segment %s is %d bytes on disk, %d of data", files[i], got, s.size)
		}
	}
	if j.Bytes() != data {
		t.Fatalf("Bytes() = %d, segments hold %d", j.Bytes(), data)
	}
	last, bytesBefore := j.Last(), j.Bytes()
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, o)
	defer j.Close()
	if j.Last() != last || j.Bytes() != bytesBefore {
		t.Fatalf("reopen: Last() = %d, Bytes() = %d, want %d and %d", j.Last(), j.Bytes(), last, bytesBefore)
	}
	recs := readAll(t, j, 0)
	checkRecs(t, recs[:60], 1, 60)
	if r := recs[60]; r.Seq != 61 || r.Topic != "big" || !bytes.Equal(r.Data, big) {
		t.Fatalf("record 61 = {%d %q %d bytes}", r.Seq, r.Topic, len(r.Data))
	}
	checkRecs(t, recs[61:], 62, last)
}

// Maintain seals a quiet, partly filled segment: its file is truncated to its
// data before its mtime is stamped, and a reopen counts just the data.
func TestJournalMaintainSealTruncates(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 1 << 20, MaxAge: time.Hour, Now: clock}
	j := openT(t, o)
	appendN(t, j, 3)
	mu.Lock()
	now = now.Add(2 * time.Hour)
	newest := now
	mu.Unlock()
	appendN(t, j, 1)
	if err := j.Maintain(); err != nil { // the oldest record is past MaxAge: seal
		t.Fatal(err)
	}
	if len(j.segs) != 2 || j.segs[1].first != 5 {
		t.Fatalf("%d segments after Maintain, want segment 1 sealed and 5 active", len(j.segs))
	}
	seg := filepath.Join(dir, segName(1))
	st, err := os.Stat(seg)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != encodedSize(1, 4) || !st.ModTime().Equal(newest) {
		t.Fatalf("sealed segment: %d bytes, mtime %v; want %d, %v", st.Size(), st.ModTime(), encodedSize(1, 4), newest)
	}
	checkFileData(t, seg, encodedRecs(1, 4))
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, o)
	defer j.Close()
	if j.Bytes() != encodedSize(1, 4) || j.First() != 1 || j.Last() != 4 {
		t.Fatalf("reopen: Bytes() = %d, First=%d Last=%d; want %d, 1, 4", j.Bytes(), j.First(), j.Last(), encodedSize(1, 4))
	}
	checkRecs(t, readAll(t, j, 0), 1, 4)
}

// Copies of the journal directory taken after Sync at several points, as a
// crash leaves it (no Close), recover every synced record and nothing else,
// with or without a torn record written after the last good one inside the
// preallocated area; appends then continue right after the records.
func TestJournalCrashCopies(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 2 << 10, MaxBytes: 1 << 30}
	j := openT(t, o)
	defer j.Close()
	// recoverCopy reopens a copy in which the last segment may have had tail
	// written at the end of its data, and checks records 1..last are there.
	recoverCopy := func(what string, last uint64, tail []byte) {
		t.Helper()
		c := copyJournal(t, dir)
		files := segFiles(t, c)
		lastFile := files[len(files)-1]
		j.mu.Lock()
		dataEnd := j.segs[len(j.segs)-1].size
		j.mu.Unlock()
		if tail != nil {
			f, err := os.OpenFile(lastFile, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(tail, dataEnd); err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
		co := o
		co.Dir = c
		r := openT(t, co)
		if r.Last() != last {
			t.Fatalf("%s: recovered Last() = %d, want %d", what, r.Last(), last)
		}
		checkRecs(t, readAll(t, r, 0), 1, last)
		// The torn bytes are gone, the rest of the file is zeros again.
		b, err := os.ReadFile(lastFile)
		if err != nil {
			t.Fatal(err)
		}
		if int64(len(b)) < dataEnd || !allZero(b[dataEnd:]) {
			t.Fatalf("%s: last segment not clean after its %d bytes of data", what, dataEnd)
		}
		if _, err := r.Append(eventTopic(last+1), eventData); err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		r = openT(t, co)
		checkRecs(t, readAll(t, r, 0), 1, last+1)
		r.Close()
	}
	next := func(seq uint64) []byte { return encodeRecord(nil, seq, eventTopic(seq), eventData(seq)) }
	step := func(n int) uint64 {
		appendN(t, j, n)
		last := j.Last()
		if err := j.Sync(last); err != nil {
			t.Fatal(err)
		}
		return last
	}
	// Right after open: an empty, preallocated segment.
	recoverCopy("empty", 0, nil)
	recoverCopy("empty, torn", 0, next(1)[:7])
	for _, n := range []int{1, 3, 7, 1, 12, 2} {
		last := step(n)
		rec := next(last + 1)
		recoverCopy(fmt.Sprintf("at %d", last), last, nil)
		recoverCopy(fmt.Sprintf("at %d, torn header", last), last, rec[:5])
		recoverCopy(fmt.Sprintf("at %d, torn body", last), last, rec[:len(rec)-1])
		recoverCopy(fmt.Sprintf("at %d, bad CRC", last), last, append(bytes.Clone(rec[:len(rec)-1]), rec[len(rec)-1]^1))
	}
	// Right after a rotation: the new segment is empty.
	activeSize := func() int64 {
		j.mu.Lock()
		defer j.mu.Unlock()
		return j.segs[len(j.segs)-1].size
	}
	for activeSize() > 0 {
		step(1)
	}
	if len(j.segs) < 2 {
		t.Fatal("no rotation")
	}
	last := j.Last()
	recoverCopy("after rotation", last, nil)
	recoverCopy("after rotation, torn", last, next(last + 1)[:20])
}

// A torn record followed by a stale whole record further on (blocks of one
// write reached the disk, one between them did not) is dropped whole: the
// record appended in its place after recovery, of the same length, must not
// make the stale one readable after the next crash.
func TestJournalStaleRecordAfterTorn(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 64 << 10}
	j := openT(t, o)
	appendN(t, j, 5)
	if err := j.Sync(5); err != nil {
		t.Fatal(err)
	}
	c := copyJournal(t, dir)
	j.Close()
	six := encodeRecord(nil, 6, eventTopic(6), eventData(6))
	stale := encodeRecord(nil, 7, "stale", []byte("never synced"))
	tail := append(bytes.Clone(six[:10]), make([]byte, len(six)-10)...)
	tail = append(tail, stale...)
	f, err := os.OpenFile(filepath.Join(c, segName(1)), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(tail, encodedSize(1, 5)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	o.Dir = c
	r := openT(t, o)
	// The whole record 7 after the torn one may have been published: its
	// seq is not given again, the journal continues at 8.
	if r.Last() != 7 {
		t.Fatalf("Last() = %d, want 7", r.Last())
	}
	appendN(t, r, 1) // record 8
	if err := r.Sync(8); err != nil {
		t.Fatal(err)
	}
	crashed := copyJournal(t, c)
	r.Close()
	o.Dir = crashed
	r = openT(t, o)
	defer r.Close()
	if r.Last() != 8 {
		t.Fatalf("after the second crash: Last() = %d, want 8", r.Last())
	}
	checkRecs(t, readAll(t, r, 0), 1, 5)
	var gap *GapError
	if _, err := r.Read(5, 0); !errors.As(err, &gap) || gap.First != 8 {
		t.Fatalf("Read(5) = %v, want a gap up to 8", err)
	}
	checkRecs(t, readAll(t, r, 7), 8, 8)
}

// A crash at rotation after the sealed segment was truncated (or before),
// but before the next segment exists: the full segment is the last one, with
// or without its zeros; recovery keeps its records, and the next Append adds
// its record to it, seals it (truncated to its data) and starts the next
// segment.
func TestJournalCrashAtRotation(t *testing.T) {
	const n = 10
	o := JournalOptions{SegmentBytes: encodedSize(1, n)}
	data := encodedRecs(1, n)
	for _, zeros := range []int{0, 100, 5000} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, segName(1)), append(bytes.Clone(data), make([]byte, zeros)...), 0o600); err != nil {
			t.Fatal(err)
		}
		o.Dir = dir
		j := openT(t, o)
		if j.Last() != n || j.prealloc {
			t.Fatalf("zeros %d: Last() = %d, preallocated %v; want %d, false", zeros, j.Last(), j.prealloc, n)
		}
		appendN(t, j, 1)
		if err := j.Sync(n + 1); err != nil {
			t.Fatal(err)
		}
		files := segFiles(t, dir)
		if len(files) != 2 || filepath.Base(files[1]) != segName(n+2) {
			t.Fatalf("zeros %d: files %v, want segments 1 and %d", zeros, files, n+2)
		}
		sealed := encodedRecs(1, n+1)
		if got := fileSize(t, files[0]); got != int64(len(sealed)) {
			t.Fatalf("zeros %d: sealed segment is %d bytes, want %d", zeros, got, len(sealed))
		}
		checkFileData(t, files[0], sealed)
		if j.Bytes() != int64(len(sealed)) || !j.prealloc {
			t.Fatalf("zeros %d: Bytes() = %d, preallocated %v; want %d, true", zeros, j.Bytes(), j.prealloc, len(sealed))
		}
		checkRecs(t, readAll(t, j, 0), 1, n+1)
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// Without preallocation (fallocate unsupported, or failing half way) the
// journal works as before: files grow with their data.
func TestJournalNoPrealloc(t *testing.T) {
	for _, tc := range []struct {
		name    string
		partial bool
	}{{"unsupported", false}, {"ENOSPC half way", true}} {
		t.Run(tc.name, func(t *testing.T) {
			var fn func(*os.File, int64)
			errno := unix.EOPNOTSUPP
			if tc.partial {
				errno = unix.ENOSPC
				// Part of the space allocated (zeros), then a failure.
				fn = func(f *os.File, size int64) {
					if st, err := f.Stat(); err == nil && st.Size() < size/2 {
						_ = f.Truncate(size / 2)
					}
				}
			}
			calls := stubAllocate(t, errno, fn)
			dir := t.TempDir()
			o := JournalOptions{Dir: dir, SegmentBytes: 1000}
			j := openT(t, o)
			if j.prealloc || calls.Load() != 1 {
				t.Fatalf("preallocated %v after %d attempts", j.prealloc, calls.Load())
			}
			appendN(t, j, 30)
			if err := j.Sync(30); err != nil {
				t.Fatal(err)
			}
			files := segFiles(t, dir)
			if int64(len(files)) != calls.Load() || len(files) < 3 {
				t.Fatalf("%d segment files, %d preallocation attempts", len(files), calls.Load())
			}
			var data []byte
			for i, p := range files {
				last := uint64(30)
				if i+1 < len(files) {
					last = j.segs[i+1].first - 1
				}
				seg := encodedRecs(j.segs[i].first, last)
				checkFileData(t, p, seg)
				// Sealed segments are their data; the active one may have
				// the zeros of the failed preallocation after it.
				want := int64(len(seg))
				if i+1 == len(files) && tc.partial {
					want = max(want, o.SegmentBytes/2)
				}
				if got := fileSize(t, p); got != want {
					t.Fatalf("segment %s is %d bytes, want %d", p, got, want)
				}
				data = append(data, seg...)
			}
			if !bytes.Equal(data, encodedRecs(1, 30)) || j.Bytes() != int64(len(data)) {
				t.Fatalf("Bytes() = %d, segments hold %d bytes", j.Bytes(), len(data))
			}
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			j = openT(t, o)
			defer j.Close()
			if j.Last() != 30 || j.Bytes() != int64(len(data)) {
				t.Fatalf("reopen: Last() = %d, Bytes() = %d", j.Last(), j.Bytes())
			}
			appendN(t, j, 1)
			checkRecs(t, readAll(t, j, 0), 1, 31)
		})
	}
}

// A failed fsync sealing a segment fails the journal, like the committer's:
// the records waiting for the next segment are lost (SyncRecord says so).
func TestJournalSealFsyncErrorSticky(t *testing.T) {
	var fail atomic.Bool
	stubSync(t, func(f *os.File) error {
		if fail.Load() {
			return errors.New("EIO")
		}
		return f.Sync()
	})
	dir := t.TempDir()
	j := openT(t, JournalOptions{Dir: dir, SegmentBytes: encodedSize(1, 3)})
	appendN(t, j, 2)
	if err := j.Sync(2); err != nil {
		t.Fatal(err)
	}
	fail.Store(true)
	rec, err := j.Append(eventTopic(3), eventData) // seals segment 1
	if err != nil {
		t.Fatal(err)
	}
	if err := j.SyncRecord(context.Background(), rec); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("SyncRecord = %v although sealing failed", err)
	}
	if j.Err() == nil {
		t.Fatal("Err() = nil after a failed sealing fsync")
	}
	if len(segFiles(t, dir)) != 1 {
		t.Fatal("a new segment was started although sealing failed")
	}
	if err := j.Close(); err == nil {
		t.Fatal("Close reported no error after a failed fsync")
	}
}
