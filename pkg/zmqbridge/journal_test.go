package zmqbridge

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// eventData is the test payload for seq: it names seq, like the real event JSON.
func eventData(seq uint64) []byte {
	return fmt.Appendf(nil, `{"v":1,"seq":%d,"kind":"attach","volume_id":"vol-%d"}`, seq, seq%7)
}

func eventTopic(seq uint64) string {
	return fmt.Sprintf("attach/ns-%d/pvc-%d", seq%3, seq)
}

func openT(t testing.TB, o JournalOptions) *Journal {
	t.Helper()
	j, err := OpenJournal(o)
	if err != nil {
		t.Fatalf("OpenJournal: %v", err)
	}
	return j
}

func appendN(t testing.TB, j *Journal, n int) {
	t.Helper()
	for range n {
		want := j.Last() + 1
		rec, err := j.Append(eventTopic(want), eventData)
		if err != nil {
			t.Fatalf("Append: %v", err)
		}
		if rec.Seq != want {
			t.Fatalf("Append got seq %d, want %d", rec.Seq, want)
		}
	}
}

// checkRecs asserts recs are exactly the events from..to as appendN wrote them.
func checkRecs(t testing.TB, recs []Record, from, to uint64) {
	t.Helper()
	if uint64(len(recs)) != to-from+1 {
		t.Fatalf("got %d records, want %d..%d", len(recs), from, to)
	}
	for i, r := range recs {
		seq := from + uint64(i)
		if r.Seq != seq || r.Topic != eventTopic(seq) || !bytes.Equal(r.Data, eventData(seq)) {
			t.Fatalf("record %d = {%d %q %q}, want seq %d", i, r.Seq, r.Topic, r.Data, seq)
		}
	}
}

func readAll(t testing.TB, j *Journal, after uint64) []Record {
	t.Helper()
	var all []Record
	for {
		recs, err := j.Read(after, 0)
		var gap *GapError
		if errors.As(err, &gap) {
			return all // the caller checks what follows
		}
		if err != nil {
			t.Fatalf("Read(%d): %v", after, err)
		}
		if len(recs) == 0 {
			return all
		}
		all = append(all, recs...)
		after = recs[len(recs)-1].Seq
	}
}

func segFiles(t testing.TB, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(m)
	return m
}

func TestJournalRoundTrip(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, JournalOptions{Dir: dir})
	defer j.Close()
	if j.First() != 1 || j.Last() != 0 {
		t.Fatalf("new journal: First=%d Last=%d, want 1 and 0", j.First(), j.Last())
	}
	if recs, err := j.Read(0, 0); err != nil || recs == nil || len(recs) != 0 {
		t.Fatalf("Read on empty journal = %v, %v; want empty slice", recs, err)
	}
	appendN(t, j, 25)
	// Empty topic and empty data are fine too.
	if r, err := j.Append("", func(uint64) []byte { return nil }); err != nil || r.Seq != 26 {
		t.Fatalf("Append empty = %+v, %v", r, err)
	}
	recs, err := j.Read(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkRecs(t, recs[:25], 1, 25)
	if r := recs[25]; r.Seq != 26 || r.Topic != "" || len(r.Data) != 0 {
		t.Fatalf("last record = %+v", r)
	}
	// Paging.
	var paged []Record
	for after := uint64(0); after < 25; {
		page, err := j.Read(after, 7)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 || len(page) > 7 {
			t.Fatalf("page after %d has %d records", after, len(page))
		}
		paged = append(paged, page...)
		after = page[len(page)-1].Seq
	}
	checkRecs(t, paged[:25], 1, 25)
	if page, _ := j.Read(10, 3); len(page) != 3 || page[0].Seq != 11 {
		t.Fatalf("Read(10,3) = %v", page)
	}
	for _, after := range []uint64{26, 27, 1 << 62} {
		if recs, err := j.Read(after, 5); err != nil || recs == nil || len(recs) != 0 {
			t.Fatalf("Read(%d) = %v, %v; want empty slice", after, recs, err)
		}
	}
	// Bytes counts the data, not the preallocated rest of the segment file.
	data := append(encodedRecs(1, 25), encodeRecord(nil, 26, "", nil)...)
	if j.Bytes() != int64(len(data)) {
		t.Fatalf("Bytes() = %d, records are %d bytes", j.Bytes(), len(data))
	}
	seg := segFiles(t, dir)
	if len(seg) != 1 {
		t.Fatalf("%d segment files, want 1", len(seg))
	}
	checkFileData(t, seg[0], data)
	if n := fileSize(t, seg[0]); n != 16<<20 {
		t.Fatalf("segment file is %d bytes, want preallocated to the default 16 MiB", n)
	}
}

func TestJournalLimits(t *testing.T) {
	j := openT(t, JournalOptions{Dir: t.TempDir()})
	defer j.Close()
	big := string(make([]byte, 65536))
	if _, err := j.Append(big, eventData); err == nil {
		t.Fatal("Append accepted a 65536-byte topic")
	}
	if _, err := j.Append(big[:65535], eventData); err != nil {
		t.Fatalf("Append with a 65535-byte topic: %v", err)
	}
	huge := func(uint64) []byte { return make([]byte, 16<<20) }
	if _, err := j.Append("t", huge); err == nil {
		t.Fatal("Append accepted a 16 MiB record")
	}
	// A rejected record consumes no sequence number.
	if r, err := j.Append("t", eventData); err != nil || r.Seq != 2 {
		t.Fatalf("Append after rejection = %d, %v; want seq 2", r.Seq, err)
	}
	if recs, err := j.Read(0, 0); err != nil || len(recs) != 2 || len(recs[0].Topic) != 65535 {
		t.Fatalf("Read = %d records, %v", len(recs), err)
	}
}

func TestJournalReopenContinues(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 250}
	j := openT(t, o)
	appendN(t, j, 10)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// Everything fails after Close.
	if _, err := j.Append("t", eventData); err == nil {
		t.Error("Append after Close succeeded")
	}
	if err := j.Sync(1); err == nil {
		t.Error("Sync after Close succeeded")
	}
	if _, err := j.Read(0, 0); err == nil {
		t.Error("Read after Close succeeded")
	}
	if err := j.Close(); err == nil {
		t.Error("second Close succeeded")
	}
	if n := len(segFiles(t, dir)); n < 3 {
		t.Fatalf("only %d segments, want rotation", n)
	}
	for round := range 3 {
		j = openT(t, o)
		if j.Last() != uint64(10+round) || j.First() != 1 {
			t.Fatalf("reopen %d: First=%d Last=%d", round, j.First(), j.Last())
		}
		appendN(t, j, 1)
		checkRecs(t, readAll(t, j, 0), 1, uint64(11+round))
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// tornSetup writes n records over several segments and returns the journal
// files' contents (the last segment's data only, without the preallocated
// rest) and the offset of the last record in the last segment.
func tornSetup(t *testing.T, n int) (o JournalOptions, files map[string][]byte, lastSeg string, lastOff int) {
	dir := t.TempDir()
	o = JournalOptions{Dir: dir, SegmentBytes: 400}
	j := openT(t, o)
	appendN(t, j, n)
	// Make sure the last segment holds more than one record.
	lastFirst := j.segs[len(j.segs)-1].first
	if lastFirst >= uint64(n) || len(j.segs) < 2 {
		t.Fatalf("bad setup: last segment starts at %d, %d segments", lastFirst, len(j.segs))
	}
	lastSize := j.segs[len(j.segs)-1].size
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	files = map[string][]byte{}
	for _, p := range segFiles(t, dir) {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files[filepath.Base(p)] = b
		lastSeg = filepath.Base(p)
	}
	// Keep only the last segment's data: its file is preallocated.
	if b := files[lastSeg]; int64(len(b)) != o.SegmentBytes || !allZero(b[lastSize:]) {
		t.Fatalf("bad setup: last segment file is %d bytes, not %d of data then zeros", len(b), lastSize)
	}
	files[lastSeg] = files[lastSeg][:lastSize]
	lastOff = len(files[lastSeg]) - len(encodeRecord(nil, uint64(n), eventTopic(uint64(n)), eventData(uint64(n))))
	return o, files, lastSeg, lastOff
}

// restore writes files into a fresh directory, with lastSeg replaced by tail.
func restore(t *testing.T, files map[string][]byte, lastSeg string, tail []byte) string {
	dir := t.TempDir()
	for name, b := range files {
		if name == lastSeg {
			b = tail
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// expectDropped reopens dir and checks record n is gone and 1..n-1 are intact.
func expectDropped(t *testing.T, o JournalOptions, dir string, n uint64, what string) {
	t.Helper()
	o.Dir = dir
	j := openT(t, o)
	defer j.Close()
	if j.Last() != n-1 {
		t.Fatalf("%s: Last() = %d, want %d", what, j.Last(), n-1)
	}
	checkRecs(t, readAll(t, j, 0), 1, n-1)
	// Seq n is handed out again: the torn record was never durable (its write
	// or its fsync did not complete, so no Sync(n) returned and, in the bridge,
	// it was never published).
	r, err := j.Append(eventTopic(n), eventData)
	if err != nil || r.Seq != n {
		t.Fatalf("%s: next Append = %d, %v; want %d", what, r.Seq, err, n)
	}
	checkRecs(t, readAll(t, j, 0), 1, n)
}

func TestJournalTornTail(t *testing.T) {
	const n = 12
	o, files, lastSeg, lastOff := tornSetup(t, n)
	full := files[lastSeg]
	for cut := lastOff; cut < len(full); cut++ {
		dir := restore(t, files, lastSeg, full[:cut])
		expectDropped(t, o, dir, n, fmt.Sprintf("cut at %d of %d", cut, len(full)))
		// The torn bytes were truncated, the file preallocated again, and
		// the record re-appended in place.
		path := filepath.Join(dir, lastSeg)
		checkFileData(t, path, full)
		if got := fileSize(t, path); got != o.SegmentBytes {
			t.Fatalf("cut at %d: segment file is %d bytes after re-append, want %d", cut, got, o.SegmentBytes)
		}
	}
	// Zeros after a whole record (a preallocated rest, or blocks a power
	// cut left unwritten) are the clean end of the data, and are kept.
	dir := restore(t, files, lastSeg, append(bytes.Clone(full), make([]byte, 1000)...))
	o.Dir = dir
	j := openT(t, o)
	if j.Last() != n || j.Bytes() != encodedSize(1, n) {
		t.Fatalf("zero tail: Last() = %d, Bytes() = %d, want %d and %d", j.Last(), j.Bytes(), n, encodedSize(1, n))
	}
	j.Close()
	path := filepath.Join(dir, lastSeg)
	checkFileData(t, path, full)
	if got := fileSize(t, path); got != int64(len(full))+1000 {
		t.Fatalf("zero tail: file is %d bytes, want %d (kept)", got, len(full)+1000)
	}
	// Garbage after a whole record is dropped.
	dir = restore(t, files, lastSeg, append(bytes.Clone(full), []byte("garbage, not a record")...))
	o.Dir = dir
	j = openT(t, o)
	if j.Last() != n {
		t.Fatalf("garbage tail: Last() = %d, want %d", j.Last(), n)
	}
	j.Close()
	checkFileData(t, filepath.Join(dir, lastSeg), full)
}

func TestJournalCorruptTail(t *testing.T) {
	const n = 12
	o, files, lastSeg, lastOff := tornSetup(t, n)
	full := files[lastSeg]
	for i := lastOff; i < len(full); i++ {
		b := bytes.Clone(full)
		b[i] ^= 0x40
		dir := restore(t, files, lastSeg, b)
		expectDropped(t, o, dir, n, fmt.Sprintf("flip at %d of %d", i, len(full)))
	}
	// A record whose seq is not previous+1 (but whose CRC is right) ends the
	// segment's data; as it may have been published, its seq is never given
	// again: the journal continues after it and reports the gap.
	bad := append(bytes.Clone(full[:lastOff]), encodeRecord(nil, n+1, "x", nil)...)
	o.Dir = restore(t, files, lastSeg, bad)
	j := openT(t, o)
	defer j.Close()
	if j.Last() != n+1 {
		t.Fatalf("seq gap: Last() = %d, want %d", j.Last(), n+1)
	}
	checkRecs(t, readAll(t, j, 0), 1, n-1)
	var gap *GapError
	if _, err := j.Read(n-1, 0); !errors.As(err, &gap) || gap.First != n+2 {
		t.Fatalf("Read(%d) over the cut = %v, want a gap up to %d", n-1, err, n+2)
	}
	if r, err := j.Append(eventTopic(n+2), eventData); err != nil || r.Seq != n+2 {
		t.Fatalf("Append = %d, %v; want %d", r.Seq, err, n+2)
	}
	checkRecs(t, readAll(t, j, n+1), n+2, n+2)
}

// Recovery never gives a sequence number again that may have been published:
// valid records after a corrupt one (here record 7 of 10 is damaged) make the
// journal continue after the highest of them, also after another restart.
func TestJournalRecoveryNeverReusesSeq(t *testing.T) {
	const n = 10
	b := validSegment(n)
	b[int(encodedSize(1, 6))+headerLen+12] ^= 0x20
	o := JournalOptions{Dir: t.TempDir(), SegmentBytes: 64 << 10}
	if err := os.WriteFile(filepath.Join(o.Dir, segName(1)), b, 0o600); err != nil {
		t.Fatal(err)
	}
	j := openT(t, o)
	if j.Last() != n {
		t.Fatalf("Last() = %d after recovery, want %d (records 8..10 are valid)", j.Last(), n)
	}
	r, err := j.Append(eventTopic(n+1), eventData)
	if err != nil || r.Seq != n+1 {
		t.Fatalf("Append = %d, %v; want %d", r.Seq, err, n+1)
	}
	if err := j.Sync(n + 1); err != nil {
		t.Fatal(err)
	}
	checkRecs(t, readAll(t, j, 0), 1, 6)
	var gap *GapError
	if _, err := j.Read(6, 0); !errors.As(err, &gap) || gap.First != n+1 {
		t.Fatalf("Read(6) = %v, want a gap up to %d", err, n+1)
	}
	j.Close()
	j = openT(t, o)
	defer j.Close()
	if j.Last() != n+1 {
		t.Fatalf("after another restart Last() = %d, want %d", j.Last(), n+1)
	}
	if _, err := j.Read(6, 0); !errors.As(err, &gap) || gap.First != n+1 {
		t.Fatalf("after another restart Read(6) = %v, want a gap up to %d", err, n+1)
	}
	checkRecs(t, readAll(t, j, n), n+1, n+1)
}

func TestJournalCorruptSealed(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 800}
	j := openT(t, o)
	appendN(t, j, 30)
	j.Close()
	segs := segFiles(t, dir)
	if len(segs) < 3 {
		t.Fatalf("%d segments, want >= 3", len(segs))
	}
	first, err := os.ReadFile(segs[0])
	if err != nil {
		t.Fatal(err)
	}
	// Offset of record 3 (a middle record of the first segment).
	off := 0
	for seq := uint64(1); seq < 3; seq++ {
		off += len(encodeRecord(nil, seq, eventTopic(seq), eventData(seq)))
	}
	rec3 := len(encodeRecord(nil, 3, eventTopic(3), eventData(3)))
	if off+rec3 >= len(first) {
		t.Fatal("record 3 is the last of its segment")
	}
	// Flip a bit of the data, crc, length or seq; or (pos -1) put a record that
	// is valid but has the wrong seq in place of record 3.
	for _, pos := range []int{off + headerLen + 20, off + 4, off, off + headerLen, -1} {
		b := bytes.Clone(first)
		if pos >= 0 {
			b[pos] ^= 0x01
		} else {
			copy(b[off:], encodeRecord(nil, 99, eventTopic(3), eventData(3)))
		}
		if err := os.WriteFile(segs[0], b, 0o600); err != nil {
			t.Fatal(err)
		}
		j := openT(t, o)
		if j.Last() != 30 {
			t.Fatalf("pos %d: Last() = %d after reopen; sealed segments are trusted", pos, j.Last())
		}
		for _, after := range []uint64{0, 2} {
			recs, err := j.Read(after, 0)
			if err == nil || errors.Is(err, ErrTruncated) || recs != nil {
				t.Fatalf("pos %d: Read(%d) over a corrupt record = %d records, %v", pos, after, len(recs), err)
			}
		}
		// Records before the corrupt one still read.
		if recs, err := j.Read(0, 2); err != nil {
			t.Fatalf("pos %d: Read(0,2): %v", pos, err)
		} else {
			checkRecs(t, recs, 1, 2)
		}
		// Later segments are unaffected.
		second := j.segs[1].first
		recs, err := j.Read(second-1, 0)
		if err != nil {
			t.Fatalf("pos %d: Read(%d): %v", pos, second-1, err)
		}
		checkRecs(t, recs, second, 30)
		j.Close()
	}
}

func TestJournalRetentionBytes(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 1000, MaxBytes: 4000}
	j := openT(t, o)
	appendN(t, j, 200)
	first := j.First()
	if first <= 1 {
		t.Fatalf("First() = %d, retention dropped nothing", first)
	}
	if j.Bytes() > o.MaxBytes || j.Bytes() < o.MaxBytes-2*o.SegmentBytes {
		t.Fatalf("Bytes() = %d with MaxBytes %d", j.Bytes(), o.MaxBytes)
	}
	if _, err := j.Read(0, 0); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Read(0) = %v, want ErrTruncated", err)
	}
	if _, err := j.Read(first-2, 0); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Read(First()-2) = %v, want ErrTruncated", err)
	}
	checkRecs(t, readAll(t, j, first-1), first, 200)
	if err := j.Sync(200); err != nil { // the committer removes dropped files
		t.Fatal(err)
	}
	if segs := segFiles(t, dir); filepath.Base(segs[0]) != segName(first) {
		t.Fatalf("oldest file %s, First() %d", segs[0], first)
	}
	j.Close()
	// Retention also runs on open.
	o.MaxBytes = 1500
	j = openT(t, o)
	defer j.Close()
	if j.First() <= first || j.Last() != 200 || j.Bytes() > 1500 {
		t.Fatalf("after reopen: First=%d Last=%d Bytes=%d", j.First(), j.Last(), j.Bytes())
	}
	checkRecs(t, readAll(t, j, j.First()-1), j.First(), 200)
}

func TestJournalRetentionAge(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	o := JournalOptions{Dir: dir, SegmentBytes: 1000, MaxAge: 24 * time.Hour, Now: clock}
	j := openT(t, o)
	appendN(t, j, 30) // several segments, all "new"
	if j.First() != 1 {
		t.Fatalf("First() = %d before anything is old", j.First())
	}
	advance(25 * time.Hour)
	// The active segment gets a new record before it is sealed, so it stays.
	keep := j.segs[len(j.segs)-1].first
	for i := 0; j.First() == 1 && i < 100; i++ { // the next rotation drops the old segments
		appendN(t, j, 1)
	}
	if j.First() != keep {
		t.Fatalf("First() = %d, want %d (every old segment dropped, no new one)", j.First(), keep)
	}
	if _, err := j.Read(0, 0); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Read(0) = %v, want ErrTruncated", err)
	}
	checkRecs(t, readAll(t, j, j.First()-1), j.First(), j.Last())
	last := j.Last()
	j.Close()
	// Segment ages survive a restart (their mtimes follow the journal's clock).
	j = openT(t, o)
	if j.First() != keep || j.Last() != last {
		t.Fatalf("reopen, nothing old: First=%d Last=%d, want %d %d", j.First(), j.Last(), keep, last)
	}
	j.Close()
	advance(25 * time.Hour)
	j = openT(t, o)
	defer j.Close()
	active := j.segs[len(j.segs)-1].first
	if len(j.segs) != 1 || j.First() != active || j.Last() != last {
		t.Fatalf("reopen, all old: %d segments, First=%d Last=%d", len(j.segs), j.First(), j.Last())
	}
}

func TestJournalSeqNeverReused(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 1, MaxBytes: 1}
	j := openT(t, o)
	appendN(t, j, 5) // every record fills a segment; all sealed ones are dropped
	if err := j.Sync(5); err != nil {
		t.Fatal(err)
	}
	if n := len(segFiles(t, dir)); n != 1 || j.First() != 6 || j.Last() != 5 || j.Bytes() != 0 {
		t.Fatalf("%d files, First=%d Last=%d Bytes=%d", n, j.First(), j.Last(), j.Bytes())
	}
	if recs, err := j.Read(5, 0); err != nil || len(recs) != 0 {
		t.Fatalf("Read(Last) = %v, %v", recs, err)
	}
	if _, err := j.Read(4, 0); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Read(4) = %v, want ErrTruncated", err)
	}
	j.Close()
	j = openT(t, o)
	if j.Last() != 5 || j.First() != 6 {
		t.Fatalf("reopen: First=%d Last=%d, want 6 5", j.First(), j.Last())
	}
	appendN(t, j, 1)
	j.Close()

	// A lone segment whose content is all garbage keeps the seq its name implies.
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, segName(42)), []byte("garbage, not a record"), 0o600); err != nil {
		t.Fatal(err)
	}
	j = openT(t, JournalOptions{Dir: dir})
	defer j.Close()
	if j.Last() != 41 || j.First() != 42 {
		t.Fatalf("garbage segment 42: First=%d Last=%d", j.First(), j.Last())
	}
	if r, err := j.Append("t", eventData); err != nil || r.Seq != 42 {
		t.Fatalf("Append = %d, %v; want 42", r.Seq, err)
	}
}

// stubSync replaces every fsync with fn until the test ends. Tests using it
// must Close their journals before returning.
func stubSync(t *testing.T, fn func(*os.File) error) {
	orig := fileSync
	fileSync = fn
	t.Cleanup(func() { fileSync = orig })
}

func TestJournalRotationSealsDurably(t *testing.T) {
	var mu sync.Mutex
	var synced []string
	var dir string
	stubSync(t, func(f *os.File) error {
		mu.Lock()
		defer mu.Unlock()
		name := filepath.Base(f.Name())
		synced = append(synced, name)
		// A sealed segment is fsynced before the next one's file exists, so
		// no later record can be durable while one of it is torn.
		var seq uint64
		if _, err := fmt.Sscanf(name, "%020d.seg", &seq); err == nil {
			if _, err := os.Stat(filepath.Join(dir, segName(seq+1))); err == nil {
				t.Errorf("segment %s exists before %s was sealed", segName(seq+1), name)
			}
		}
		return f.Sync()
	})
	dir = t.TempDir()
	j := openT(t, JournalOptions{Dir: dir, SegmentBytes: 1})
	defer j.Close()
	for seq := uint64(1); seq <= 3; seq++ {
		appendN(t, j, 1)
		if err := j.Sync(seq); err != nil {
			t.Fatal(err)
		}
		// Once the next record is durable, the segment before it is sealed.
		mu.Lock()
		if seq > 1 && !slices.Contains(synced, segName(seq-1)) {
			t.Errorf("segment %s sealed but not fsynced (fsyncs: %v)", segName(seq-1), synced)
		}
		mu.Unlock()
	}
}

// The sealing fsync runs off the journal's lock: Err (health), Last and
// First answer while it hangs, and Appends queue in memory meanwhile.
func TestJournalSealOffLock(t *testing.T) {
	release := make(chan struct{})
	var blocked atomic.Bool
	stubSync(t, func(f *os.File) error {
		if filepath.Base(f.Name()) == segName(1) {
			blocked.Store(true)
			<-release
		}
		return f.Sync()
	})
	dir := t.TempDir()
	j := openT(t, JournalOptions{Dir: dir, SegmentBytes: encodedSize(1, 3)})
	defer j.Close()
	appendN(t, j, 3) // seals segment 1: its fsync hangs
	waitFor(t, "the sealing fsync", blocked.Load)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := j.Err(); err != nil {
			t.Error(err)
		}
		if j.Last() != 3 || j.First() != 1 {
			t.Errorf("Last() = %d, First() = %d", j.Last(), j.First())
		}
		appendN(t, j, 1)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Error("Err/Last/Append blocked behind the sealing fsync")
	}
	close(release)
	<-done
	if err := j.Sync(4); err != nil {
		t.Fatal(err)
	}
	checkRecs(t, readAll(t, j, 0), 1, 4)
}

func TestJournalFsyncErrorSticky(t *testing.T) {
	var fail atomic.Bool
	stubDatasync(t, func(f *os.File) error {
		if fail.Load() {
			return errors.New("EIO")
		}
		return f.Sync()
	})
	j := openT(t, JournalOptions{Dir: t.TempDir()})
	appendN(t, j, 2)
	if err := j.Sync(2); err != nil {
		t.Fatal(err)
	}
	fail.Store(true)
	appendN(t, j, 1)
	if err := j.Sync(3); err == nil {
		t.Fatal("Sync succeeded although fsync failed")
	}
	if err := j.Sync(2); err != nil {
		t.Fatalf("Sync of records synced before the failure: %v", err)
	}
	if _, err := j.Append("t", eventData); err == nil {
		t.Fatal("Append succeeded after a failed fsync")
	}
	if err := j.Close(); err == nil {
		t.Fatal("Close reported no error after a failed fsync")
	}
}

func TestJournalGroupCommit(t *testing.T) {
	j := openT(t, JournalOptions{Dir: t.TempDir()})
	defer j.Close()
	const workers, each = 50, 20
	seqs := make(chan uint64, workers*each)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				r, err := j.Append("ack/x", eventData)
				if err == nil {
					err = j.Sync(r.Seq)
				}
				if err == nil {
					j.mu.Lock()
					if j.synced < r.Seq {
						err = fmt.Errorf("Sync(%d) returned with synced=%d", r.Seq, j.synced)
					}
					j.mu.Unlock()
				}
				if err != nil {
					errs <- err
					return
				}
				seqs <- r.Seq
			}
		}()
	}
	wg.Wait()
	close(seqs)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	var got []uint64
	for s := range seqs {
		got = append(got, s)
	}
	sort.Slice(got, func(a, b int) bool { return got[a] < got[b] })
	if len(got) != workers*each {
		t.Fatalf("%d seqs, want %d", len(got), workers*each)
	}
	for i, s := range got {
		if s != uint64(i+1) {
			t.Fatalf("seq #%d is %d: not unique and contiguous", i, s)
		}
	}
	fsyncs := j.fsyncs.Load()
	t.Logf("%d Append+Sync pairs took %d fsyncs", workers*each, fsyncs)
	if fsyncs == 0 || fsyncs > workers*each/4 {
		t.Fatalf("%d fsyncs for %d syncs: no group commit", fsyncs, workers*each)
	}
	// Syncing what is already synced costs nothing.
	if err := j.Sync(j.Last()); err != nil || j.fsyncs.Load() != fsyncs {
		t.Fatalf("redundant Sync: %v, fsyncs %d -> %d", err, fsyncs, j.fsyncs.Load())
	}
}

func TestJournalConcurrentReadAppend(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, JournalOptions{Dir: dir, SegmentBytes: 8 << 10, MaxBytes: 1 << 30})
	defer j.Close()
	const total = 3000
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range total {
			if _, err := j.Append("t", eventData); err != nil {
				errc <- err
				return
			}
		}
	}()
	for r := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for after := uint64(0); after < total; {
				recs, err := j.Read(after, 50+r*30)
				if err != nil {
					errc <- err
					return
				}
				for _, rec := range recs {
					after++
					if rec.Seq != after || !bytes.Equal(rec.Data, eventData(after)) {
						errc <- fmt.Errorf("reader %d: got seq %d, want %d", r, rec.Seq, after)
						return
					}
				}
				if r == 0 {
					_ = j.Sync(after)
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
}

// TestJournalReplaySealed replays from the middle of sealed segments after a
// reopen, which exercises the lazily built sparse index.
func TestJournalReplaySealed(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 200 << 10}
	j := openT(t, o)
	appendN(t, j, 10000)
	if s := j.segs[len(j.segs)-1]; len(s.index) < int(s.size/indexStride) || s.index[0] != (idxEntry{s.first, 0}) {
		t.Fatalf("active segment index: %d entries for %d bytes", len(s.index), s.size)
	}
	j.Close()
	j = openT(t, o)
	defer j.Close()
	if len(j.segs) < 4 {
		t.Fatalf("%d segments", len(j.segs))
	}
	for _, after := range []uint64{9999, 7777, 5000, 1234, 3, 0} {
		recs, err := j.Read(after, 100)
		if err != nil {
			t.Fatal(err)
		}
		checkRecs(t, recs, after+1, min(after+100, 10000))
	}
	start := time.Now()
	checkRecs(t, readAll(t, j, 0), 1, 10000)
	t.Logf("replayed 10000 events in %v", time.Since(start))
	// Every segment now has a sparse index, so Read never rescans a whole one.
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, s := range j.segs {
		if want := int(s.size / indexStride); !s.indexed || len(s.index) < want {
			t.Errorf("segment %d: indexed %v, %d entries for %d bytes", s.first, s.indexed, len(s.index), s.size)
		}
	}
}

// validSegment returns the bytes of a segment holding records 1..n.
func validSegment(n int) []byte {
	var b []byte
	for seq := uint64(1); seq <= uint64(n); seq++ {
		b = encodeRecord(b, seq, eventTopic(seq), eventData(seq))
	}
	return b
}

// FuzzJournalRecover feeds any bytes to recovery as the newest segment, with
// or without zeros after them (the preallocated rest of a segment): recovery
// must keep exactly the valid prefix, keep a tail of zeros and drop any other
// tail, and appends must then continue right after the prefix.
func FuzzJournalRecover(f *testing.F) {
	seg := validSegment(5)
	torn := encodeRecord(nil, 6, eventTopic(6), eventData(6))
	f.Add(seg, uint16(0))
	f.Add(seg[:len(seg)-3], uint16(0))
	f.Add(append(bytes.Clone(seg), 0, 0, 0, 0), uint16(0))
	f.Add([]byte{}, uint16(0))
	f.Add(seg, uint16(5000))                                           // clean end in a preallocated file
	f.Add(seg[:len(seg)-3], uint16(100))                               // torn, then zeros
	f.Add(append(bytes.Clone(seg), torn[:headerLen+3]...), uint16(64)) // torn record inside the preallocated area
	f.Add([]byte{}, uint16(4096))                                      // a new, preallocated segment
	// fsync only costs time here (tens of executions a second instead of thousands).
	defer func(orig func(*os.File) error) { fileSync = orig }(fileSync)
	fileSync = func(*os.File) error { return nil }
	defer func(orig func(*os.File) error) { fileDatasync = orig }(fileDatasync)
	fileDatasync = func(*os.File) error { return nil }
	const segBytes = 4 << 10
	f.Fuzz(func(t *testing.T, in []byte, zeros uint16) {
		dir := t.TempDir()
		path := filepath.Join(dir, segName(1))
		b := append(bytes.Clone(in), make([]byte, zeros)...)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		o := JournalOptions{Dir: dir, SegmentBytes: segBytes}
		j, err := OpenJournal(o)
		if err != nil {
			t.Fatalf("OpenJournal: %v", err)
		}
		defer j.Close()
		recs := readAll(t, j, 0)
		if uint64(len(recs)) > j.Last() || j.First() != 1 {
			t.Fatalf("%d records, First=%d Last=%d", len(recs), j.First(), j.Last())
		}
		if cut := uint64(len(recs)); cut < j.Last() {
			// Valid records after a corrupt one: their seqs are not given
			// again, and the hole is reported.
			var gap *GapError
			if _, err := j.Read(cut, 0); !errors.As(err, &gap) || gap.First != j.Last()+1 {
				t.Fatalf("Read(%d) = %v, want a gap up to %d", cut, err, j.Last()+1)
			}
		}
		// Every record read back is, byte for byte, a record of the input with
		// a matching CRC; together they are exactly the file's kept prefix.
		var re []byte
		for i, r := range recs {
			if r.Seq != uint64(i+1) {
				t.Fatalf("record #%d has seq %d", i, r.Seq)
			}
			start := len(re)
			re = encodeRecord(re, r.Seq, r.Topic, r.Data)
			if !bytes.Equal(re[start:], b[start:len(re)]) {
				t.Fatalf("record %d does not match the input bytes", r.Seq)
			}
			p := b[start+headerLen : len(re)]
			if crc32.Checksum(p, castagnoli) != uint32(b[start+4])|uint32(b[start+5])<<8|uint32(b[start+6])<<16|uint32(b[start+7])<<24 {
				t.Fatalf("record %d has a bad CRC", r.Seq)
			}
		}
		if j.Bytes() != int64(len(re)) {
			t.Fatalf("Bytes() = %d, records are %d", j.Bytes(), len(re))
		}
		// The file holds the records, then zeros only: a zero tail is kept
		// as it was, any other is dropped; the rest is preallocated.
		checkFileData(t, path, re)
		kept := fileSize(t, path)
		if allZero(b[len(re):]) && kept < int64(len(b)) {
			t.Fatalf("zero tail truncated: file kept %d of %d bytes", kept, len(b))
		}
		if j.prealloc && kept < segBytes && j.Last() == uint64(len(recs)) { // else a new segment is active
			t.Fatalf("preallocated file is %d bytes, want %d", kept, segBytes)
		}
		// Appends continue right after the records, and a reopen finds them.
		cut := j.Last()
		r, err := j.Append("t", eventData)
		if err != nil || r.Seq != j.Last() || r.Seq != cut+1 {
			t.Fatalf("Append after recovery = %d, %v", r.Seq, err)
		}
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		j = openT(t, o)
		defer j.Close()
		again := readAll(t, j, 0)
		if cut > uint64(len(recs)) {
			again = append(again, readAll(t, j, cut)...)
		}
		if len(again) != len(recs)+1 || !slices.EqualFunc(again[:len(recs)], recs, func(a, b Record) bool {
			return a.Seq == b.Seq && a.Topic == b.Topic && bytes.Equal(a.Data, b.Data)
		}) {
			t.Fatalf("after append and reopen: %d records, want the %d recovered and the new one", len(again), len(recs))
		}
		if n := again[len(recs)]; n.Seq != r.Seq || n.Topic != "t" || !bytes.Equal(n.Data, eventData(r.Seq)) {
			t.Fatalf("appended record read back as %+v", n)
		}
	})
}

func BenchmarkAppend(b *testing.B) {
	j := openT(b, JournalOptions{Dir: b.TempDir(), MaxBytes: 1 << 40})
	defer j.Close()
	data := bytes.Repeat([]byte("x"), 200)
	build := func(uint64) []byte { return data }
	b.SetBytes(int64(len(encodeRecord(nil, 1, "attach/ns/pvc", data))))
	b.ResetTimer()
	start := time.Now()
	for b.Loop() {
		if _, err := j.Append("attach/ns/pvc", build); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "appends/s")
}

func BenchmarkAppendSyncParallel(b *testing.B) {
	j := openT(b, JournalOptions{Dir: b.TempDir(), MaxBytes: 1 << 40})
	defer j.Close()
	data := bytes.Repeat([]byte("x"), 200)
	build := func(uint64) []byte { return data }
	b.SetParallelism(16)
	start := j.fsyncs.Load()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r, err := j.Append("ack/ns/pvc", build)
			if err == nil {
				err = j.Sync(r.Seq)
			}
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(j.fsyncs.Load()-start)/float64(b.N), "fsyncs/op")
}

func BenchmarkReplay10k(b *testing.B) {
	dir := b.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 1 << 20}
	j := openT(b, o)
	appendN(b, j, 10000)
	j.Close()
	j = openT(b, o)
	defer j.Close()
	for b.Loop() {
		if n := len(readAll(b, j, 0)); n != 10000 {
			b.Fatalf("replayed %d", n)
		}
	}
}

// A quiet journal (no rotation) still drops what MaxAge allows when maintained.
func TestJournalMaintainQuiet(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	o := JournalOptions{Dir: t.TempDir(), MaxAge: time.Hour, Now: clock}
	j := openT(t, o)
	defer j.Close()
	appendN(t, j, 10) // one small active segment: no rotation will ever come
	if err := j.Maintain(); err != nil || j.First() != 1 {
		t.Fatalf("Maintain before anything is old: First=%d, %v", j.First(), err)
	}
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	if err := j.Maintain(); err != nil { // seals the old active segment
		t.Fatal(err)
	}
	if err := j.Maintain(); err != nil { // and drops it
		t.Fatal(err)
	}
	if j.First() != 11 || j.Last() != 10 {
		t.Fatalf("after maintenance: First=%d Last=%d, want 11 and 10", j.First(), j.Last())
	}
	if _, err := j.Read(0, 0); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Read(0) = %v, want ErrTruncated", err)
	}
	if rec, err := j.Append("t", func(uint64) []byte { return []byte("x") }); err != nil || rec.Seq != 11 {
		t.Fatalf("append after maintenance: %+v %v", rec, err)
	}
}

// fileSize returns the size of the file at path.
func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// encodedSize is the on-disk size of the records from..to as appendN writes them.
func encodedSize(from, to uint64) int64 {
	var n int64
	for seq := from; seq <= to; seq++ {
		n += int64(len(encodeRecord(nil, seq, eventTopic(seq), eventData(seq))))
	}
	return n
}

// Append leaves the write to the committer, but a record appended and not
// yet synced is readable: Read writes it first.
func TestJournalReadUnsynced(t *testing.T) {
	dir := t.TempDir()
	j := openT(t, JournalOptions{Dir: dir})
	defer j.Close()
	seg := filepath.Join(dir, segName(1))
	appendN(t, j, 3)
	// Nobody asked for a sync, so nothing is written yet: the preallocated
	// file holds zeros only.
	checkFileData(t, seg, nil)
	if j.Bytes() != encodedSize(1, 3) {
		t.Fatalf("Bytes() = %d, want %d", j.Bytes(), encodedSize(1, 3))
	}
	checkRecs(t, readAll(t, j, 0), 1, 3)
	checkFileData(t, seg, encodedRecs(1, 3))
	if got := j.fsyncs.Load(); got != 0 {
		t.Fatalf("Read did %d fsyncs; it should only write", got)
	}
	// Once written, the records survive a process crash: a copy of the files
	// as they are now (no fsync, no Close) recovers them.
	crashed := t.TempDir()
	b, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(crashed, segName(1)), b, 0o600); err != nil {
		t.Fatal(err)
	}
	c := openT(t, JournalOptions{Dir: crashed})
	checkRecs(t, readAll(t, c, 0), 1, 3)
	c.Close()
	// Records appended after a Read are read too; Sync still works.
	appendN(t, j, 2)
	recs, err := j.Read(3, 0)
	if err != nil {
		t.Fatal(err)
	}
	checkRecs(t, recs, 4, 5)
	if err := j.Sync(5); err != nil {
		t.Fatal(err)
	}
}

// Without syncs, Append writes itself once 1 MiB is pending, so memory stays
// bounded; the file plus what is pending is always the segment's size.
func TestJournalPendingBounded(t *testing.T) {
	// Without preallocation the file size shows what was written.
	stubAllocate(t, 0, nil)
	dir := t.TempDir()
	j := openT(t, JournalOptions{Dir: dir, SegmentBytes: 64 << 20})
	defer j.Close()
	seg := filepath.Join(dir, segName(1))
	data := bytes.Repeat([]byte("x"), 1000)
	var flushed bool
	for range 3000 {
		if _, err := j.Append("t", func(uint64) []byte { return data }); err != nil {
			t.Fatal(err)
		}
		j.mu.Lock()
		pend, size := len(j.pend), j.segs[0].size
		j.mu.Unlock()
		if pend > maxPending {
			t.Fatalf("%d bytes pending after Append, limit %d", pend, maxPending)
		}
		if on := fileSize(t, seg); on+int64(pend) != size {
			t.Fatalf("file %d + pending %d bytes != segment size %d", on, pend, size)
		} else if on > 0 {
			flushed = true
		}
	}
	if !flushed {
		t.Fatal("3 MB appended, nothing written")
	}
}

// stubWriteAt makes every record write fail once fail is set: half of the
// bytes land in the file when partial is set, none otherwise. Tests using it
// must Close their journals before returning.
func stubWriteAt(t *testing.T, fail, partial *atomic.Bool) {
	orig := fileWriteAt
	fileWriteAt = func(f *os.File, b []byte, off int64) (int, error) {
		if !fail.Load() {
			return orig(f, b, off)
		}
		n := 0
		if partial.Load() {
			n, _ = orig(f, b[:len(b)/2], off)
		}
		return n, errors.New("injected EIO")
	}
	t.Cleanup(func() { fileWriteAt = orig })
}

// A failed write fails the journal for good; the records written before it
// survive a reopen exactly, those appended after are lost.
func TestJournalWriteErrorSticky(t *testing.T) {
	var fail, partial atomic.Bool
	stubWriteAt(t, &fail, &partial)
	big := func(uint64) []byte { return make([]byte, maxPending) }
	for _, tc := range []struct {
		name string
		seg  int64 // SegmentBytes; 0 = default
		// trigger makes the journal write seqs 6.. and returns the error the
		// caller saw, if any.
		trigger func(j *Journal) error
	}{
		{"committer", 0, func(j *Journal) error {
			appendN(t, j, 3)
			return j.Sync(8)
		}},
		{"read", 0, func(j *Journal) error {
			appendN(t, j, 3)
			recs, err := j.Read(5, 0)
			if err == nil {
				t.Errorf("Read past the failed write = %d records, no error", len(recs))
			}
			return err
		}},
		{"rotation", encodedSize(1, 7), func(j *Journal) error {
			appendN(t, j, 1)
			_, err := j.Append(eventTopic(7), eventData) // reaches SegmentBytes
			return err
		}},
		{"pending over 1 MiB", 0, func(j *Journal) error {
			appendN(t, j, 1)
			_, err := j.Append("t", big)
			return err
		}},
	} {
		for _, part := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/partial=%v", tc.name, part), func(t *testing.T) {
				fail.Store(false)
				partial.Store(part)
				dir := t.TempDir()
				o := JournalOptions{Dir: dir, SegmentBytes: tc.seg}
				j := openT(t, o)
				appendN(t, j, 5)
				if err := j.Sync(5); err != nil {
					t.Fatal(err)
				}
				fail.Store(true)
				if err := tc.trigger(j); err == nil {
					t.Fatal("the failed write was reported to nobody")
				}
				if j.Err() == nil {
					t.Fatal("Err() = nil after a failed write")
				}
				if err := j.Sync(j.Last()); err == nil {
					t.Fatal("Sync of lost records succeeded")
				}
				if err := j.Sync(5); err != nil {
					t.Fatalf("Sync of records synced before the failure: %v", err)
				}
				if _, err := j.Append("t", eventData); err == nil {
					t.Fatal("Append succeeded on a failed journal")
				}
				// What was written is still readable, and nothing else is.
				recs, err := j.Read(0, 0)
				if err != nil {
					t.Fatal(err)
				}
				checkRecs(t, recs, 1, 5)
				if _, err := j.Read(5, 0); err == nil {
					t.Fatal("Read of lost records succeeded")
				}
				// No partial write is left behind: the file holds records
				// 1..5, then zeros at most (the preallocated rest).
				if segs := segFiles(t, dir); len(segs) != 1 {
					t.Fatalf("%d segment files, want 1", len(segs))
				}
				checkFileData(t, filepath.Join(dir, segName(1)), encodedRecs(1, 5))
				if j.Bytes() != encodedSize(1, 5) {
					t.Fatalf("Bytes() = %d, records 1..5 are %d", j.Bytes(), encodedSize(1, 5))
				}
				if err := j.Close(); err == nil {
					t.Fatal("Close reported no error after a failed write")
				}
				fail.Store(false)
				j = openT(t, o)
				defer j.Close()
				if j.Last() != 5 {
					t.Fatalf("reopen: Last() = %d, want 5", j.Last())
				}
				checkRecs(t, readAll(t, j, 0), 1, 5)
				if r, err := j.Append(eventTopic(6), eventData); err != nil || r.Seq != 6 {
					t.Fatalf("Append after reopen = %d, %v; want 6", r.Seq, err)
				}
			})
		}
	}
}

// Appenders that sync, a reader and rotation, all at once; then every record
// is found once, in order, after a reopen.
func TestJournalConcurrentAppendSyncRead(t *testing.T) {
	dir := t.TempDir()
	o := JournalOptions{Dir: dir, SegmentBytes: 4 << 10, MaxBytes: 1 << 30}
	j := openT(t, o)
	const workers, each = 4, 400
	const total = workers * each
	errc := make(chan error, workers+1)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r, err := j.Append("t", eventData)
				if err == nil && i%3 != 2 { // not every Append is synced at once
					err = j.Sync(r.Seq)
				}
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for after := uint64(0); after < total; {
			recs, err := j.Read(after, 100)
			if err != nil {
				errc <- fmt.Errorf("Read(%d): %w", after, err)
				return
			}
			for _, rec := range recs {
				after++
				if rec.Seq != after || !bytes.Equal(rec.Data, eventData(after)) {
					errc <- fmt.Errorf("reader: got seq %d, want %d", rec.Seq, after)
					return
				}
			}
		}
	}()
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if err := j.Sync(total); err != nil {
		t.Fatal(err)
	}
	if n := len(segFiles(t, dir)); n < 10 {
		t.Fatalf("%d segments: no rotation under load", n)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, o)
	defer j.Close()
	if j.First() != 1 || j.Last() != total {
		t.Fatalf("reopen: First=%d Last=%d, want 1 and %d", j.First(), j.Last(), total)
	}
	recs := readAll(t, j, 0)
	if len(recs) != total {
		t.Fatalf("%d records after reopen, want %d", len(recs), total)
	}
	for i, r := range recs {
		if seq := uint64(i + 1); r.Seq != seq || !bytes.Equal(r.Data, eventData(seq)) {
			t.Fatalf("record #%d has seq %d, want %d", i, r.Seq, seq)
		}
	}
}
