package zmqbridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// replayAll pages a replay from since to the end; truncated is the error
// of the first page, if the journal no longer holds what followed since.
func replayAll(t *testing.T, c *Client, since uint64) (seqs []uint64, err error) {
	t.Helper()
	evs, _, err := c.Replay(since, MaxReplay)
	for _, raw := range evs {
		var ev Event
		if json.Unmarshal(raw, &ev) != nil {
			t.Fatalf("bad event %s", raw)
		}
		seqs = append(seqs, ev.Seq)
	}
	return seqs, err
}

// Retention keeps each namespace's newest events: pod A's endpoint flushes
// in a loop (each flush journals an ack in namespace a) until the journal
// has dropped many times its byte limit. Pod B, in namespace b, still
// replays its own last events from 0, with no "truncated"; A's endpoint and
// the node-wide one are told where their gap ends, and from there get A's
// newest events and everything after.
func TestNamespaceRetention(t *testing.T) {
	dir := t.TempDir()
	f := &fakeFlusher{}
	b, err := New(Options{Dir: dir, Node: "n1", Heartbeat: 100 * time.Millisecond, Flusher: f, FlushRate: 1e6, FlushBurst: 1e6,
		Journal: JournalOptions{SegmentBytes: 4 << 10, MaxBytes: 16 << 10, KeepPerClass: 5, KeepBytes: 8 << 10}})
	if err != nil {
		t.Fatal(err)
	}
	f.b = b
	defer b.Close()
	_, ctlA := addPodEndpoint(t, b, "a", Scope{Namespace: "a"})
	_, ctlB := addPodEndpoint(t, b, "b", Scope{Namespace: "b"})
	client := func(ctl string) *Client {
		c, err := Dial("ipc://unused", ctl)
		if err != nil {
			t.Fatal(err)
		}
		c.Timeout = 10 * time.Second
		t.Cleanup(c.Close)
		return c
	}
	var mine []uint64
	for _, k := range []string{KindAttach, KindPublish, KindAck} {
		seq, err := b.Emit(context.Background(), Event{Kind: k, VolumeID: "vb", PVC: "data", Namespace: "b"})
		if err != nil {
			t.Fatal(err)
		}
		mine = append(mine, seq)
	}
	orphan, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "no-pvc"}) // no namespace: a class of its own
	if err != nil {
		t.Fatal(err)
	}
	ca := client(ctlA)
	var acks []uint64
	for i := 0; i < 500; i++ {
		seq, _, err := ca.Flush("", "data", "a")
		if err != nil {
			t.Fatal(err)
		}
		acks = append(acks, seq)
	}
	waitFor(t, "retention", func() bool { return b.journal.First() > acks[len(acks)/2] })

	got, err := replayAll(t, client(ctlB), 0)
	if err != nil || len(got) != 3 || got[0] != mine[0] || got[2] != mine[2] {
		t.Fatalf("namespace b's replay from 0 after a's flush loop: %v, %v; want its events %v", got, err, mine)
	}
	if recs, _, _ := b.journal.Kept(0, func(ns string) bool { return ns == "" }); len(recs) != 1 || recs[0].Seq != orphan {
		t.Errorf("kept events without a namespace: %v, want %d", keptSeqs(recs), orphan)
	}
	first := b.journal.First()
	for name, c := range map[string]*Client{"a": ca, "node": dial(t, dir)} {
		_, err := replayAll(t, c, 0)
		var tr ErrTruncatedReplay
		if !errors.As(err, &tr) {
			t.Fatalf("%s replay from 0: %v, want truncated", name, err)
		}
		got, err := replayAll(t, c, tr.First-1)
		if err != nil {
			t.Fatalf("%s replay from %d: %v", name, tr.First-1, err)
		}
		// From the gap on, every event (all of them a's acks), none missing:
		// the newest 5 of a from dropped segments, then the segments' own.
		if len(got) == 0 || got[0] != tr.First || got[len(got)-1] != acks[len(acks)-1] || uint64(len(got)) != got[len(got)-1]-got[0]+1 {
			t.Fatalf("%s replay from %d: %v, want every event from %d to %d", name, tr.First-1, got, tr.First, acks[len(acks)-1])
		}
		if got[4] >= first || got[5] < first {
			t.Errorf("%s replay from %d: %v; want 5 events from before the first segment (%d), then the segments'", name, tr.First-1, got, first)
		}
	}
}

// keepOptions: a small journal keeping each class's newest 3 records; the
// class is the topic's middle part (x/<class>/y).
func keepOptions(dir string) JournalOptions {
	return JournalOptions{Dir: dir, SegmentBytes: 1000, MaxBytes: 3000, KeepPerClass: 3, KeepBytes: 1 << 20,
		Class: func(r Record) string { return TopicNamespace(r.Topic) }}
}

func appendClass(t *testing.T, j *Journal, class string, n int) (seqs []uint64) {
	t.Helper()
	for range n {
		r, err := j.Append("x/"+class+"/y", func(seq uint64) []byte { return []byte(fmt.Sprintf(`{"seq":%d,"pad":"%040d"}`, seq, 0)) })
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, r.Seq)
	}
	if err := j.Sync(j.Last()); err != nil {
		t.Fatal(err)
	}
	return seqs
}

func keptSeqs(recs []Record) []uint64 {
	var s []uint64
	for _, r := range recs {
		s = append(s, r.Seq)
	}
	return s
}

// waitKept waits until the keeper dropped the segments up to seq.
func waitKept(t *testing.T, j *Journal, seq uint64) {
	t.Helper()
	waitFor(t, "the keeper", func() bool { return j.First() > seq })
}

// The journal keeps each class's newest records of the segments retention
// drops, knows what it let go (Kept's lost), and both survive a restart; a
// kept file that cannot be read counts everything before the segments lost.
func TestJournalKeepsEachClass(t *testing.T) {
	dir := t.TempDir()
	o := keepOptions(dir)
	j := openT(t, o)
	b := appendClass(t, j, "b", 5)
	a := appendClass(t, j, "a", 200)
	waitKept(t, j, b[4])
	check := func(what string, j *Journal) {
		t.Helper()
		recs, lost, first := j.Kept(0, func(c string) bool { return c == "b" })
		if fmt.Sprint(keptSeqs(recs)) != fmt.Sprint(b[2:]) || lost != b[1] {
			t.Errorf("%s: b's kept records %v, lost through %d; want %v, %d", what, keptSeqs(recs), lost, b[2:], b[1])
		}
		recs, lost, _ = j.Kept(0, func(c string) bool { return c == "a" })
		if len(recs) != 3 || recs[2].Seq != first-1 || lost != recs[0].Seq-1 {
			t.Errorf("%s: a's kept records %v, lost through %d, first segment at %d; want the 3 before it", what, keptSeqs(recs), lost, first)
		}
		if _, lost, _ := j.Kept(0, nil); lost != first-4 {
			t.Errorf("%s: every class lost through %d, want %d", what, lost, first-4)
		}
		if got := readAll(t, j, first-1); len(got) == 0 || got[len(got)-1].Seq != a[len(a)-1] {
			t.Errorf("%s: the segments hold %d records", what, len(got))
		}
	}
	waitFor(t, "the journal within MaxBytes", func() bool { return j.Bytes() <= o.MaxBytes })
	check("kept", j)
	j.Close()
	j = openT(t, o)
	check("after a restart", j)
	j.Close()

	if err := os.WriteFile(filepath.Join(dir, keptFile), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	j = openT(t, o)
	defer j.Close()
	recs, lost, first := j.Kept(0, func(c string) bool { return c == "b" })
	if len(recs) != 0 || lost != first-1 {
		t.Errorf("damaged kept file: b's kept records %v, lost through %d; want none, %d", keptSeqs(recs), lost, first-1)
	}
}

// Past KeepBytes the class holding the most bytes lets its oldest go: a
// class with few records keeps them all.
func TestJournalKeepBytesFair(t *testing.T) {
	o := keepOptions(t.TempDir())
	o.KeepPerClass = 10
	size := int64(headerLen + payloadMin + len("x/a/y") + len(fmt.Sprintf(`{"seq":%d,"pad":"%040d"}`, 100, 0)))
	o.KeepBytes = 8 * size
	j := openT(t, o)
	defer j.Close()
	for max, want := range map[int64]int64{16000: 2000, 0: 8 << 20} { // 1/8 of MaxBytes (default 256 MiB), at most 8 MiB
		d := openT(t, JournalOptions{Dir: t.TempDir(), MaxBytes: max})
		if d.o.KeepBytes != want {
			t.Errorf("default KeepBytes %d for MaxBytes %d, want %d", d.o.KeepBytes, max, want)
		}
		d.Close()
	}
	b := appendClass(t, j, "b", 3)
	appendClass(t, j, "a", 200)
	waitKept(t, j, b[2])
	waitFor(t, "the journal within MaxBytes", func() bool { return j.Bytes() <= o.MaxBytes })
	recs, _, _ := j.Kept(0, func(c string) bool { return c == "b" })
	if fmt.Sprint(keptSeqs(recs)) != fmt.Sprint(b) {
		t.Errorf("b's kept records %v, want all of %v (a holds more)", keptSeqs(recs), b)
	}
	if recs, _, _ := j.Kept(0, func(c string) bool { return c == "a" }); len(recs) != 5 {
		t.Errorf("a keeps %d records, want 5 (8 fit)", len(recs))
	}
}

// Kept records age out like segments (MaxAge, checked by Maintain): their
// seqs then count as lost.
func TestJournalKeptAge(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	o := keepOptions(t.TempDir())
	o.MaxAge = time.Hour
	o.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	j := openT(t, o)
	defer j.Close()
	b := appendClass(t, j, "b", 5)
	appendClass(t, j, "a", 200)
	waitKept(t, j, b[4])
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	if err := j.Maintain(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b's kept records to age out", func() bool {
		recs, lost, _ := j.Kept(0, func(c string) bool { return c == "b" })
		return len(recs) == 0 && lost == b[4]
	})
}

// A crash after the kept file was written but before the dropped segments
// were deleted (here: their deletion fails) loses nothing: on start the
// segments hold those records again, and what the kept file said was let go
// among them is not counted lost.
func TestJournalKeptCrashBeforeDelete(t *testing.T) {
	fileRemove = func(string) error { return errors.New("no: the process died first") }
	t.Cleanup(func() { fileRemove = os.Remove })
	dir := t.TempDir()
	o := keepOptions(dir)
	j := openT(t, o)
	b := appendClass(t, j, "b", 5)
	a := appendClass(t, j, "a", 200)
	waitKept(t, j, b[4])
	if _, err := os.Stat(filepath.Join(dir, keptFile)); err != nil {
		t.Fatal(err)
	}
	j.Close()
	fileRemove = os.Remove
	j = openT(t, o)
	defer j.Close()
	recs, lost, first := j.Kept(0, nil)
	if first != 1 || len(recs) != 0 || lost != 0 {
		t.Fatalf("after the crash: first segment at %d, kept %v, lost through %d; want 1, none, 0", first, keptSeqs(recs), lost)
	}
	if got := readAll(t, j, 0); len(got) != len(a)+len(b) {
		t.Fatalf("the segments hold %d records, want %d", len(got), len(a)+len(b))
	}
}
