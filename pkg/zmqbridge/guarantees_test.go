package zmqbridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
)

// The flush reply goes out only once its ack event was published: a
// subscriber has the ack when the reply arrives, even with a slow publisher.
func TestFlushReplyAfterAckPublished(t *testing.T) {
	beforePublish = func(r Record) {
		if strings.HasPrefix(r.Topic, KindAck+"/") {
			time.Sleep(300 * time.Millisecond)
		}
	}
	t.Cleanup(func() { beforePublish = nil })
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	zctx, _ := zmq.NewContext()
	defer zctx.Term()
	sub, _ := zctx.NewSocket(zmq.SUB)
	defer sub.Close()
	sub.SetLinger(0)
	sub.SetSubscribe(KindAck + "/")
	if err := sub.Connect("ipc://" + filepath.Join(dir, "events.sock")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	seq, _, err := dial(t, dir).Flush("v1", "", "")
	if err != nil {
		t.Fatal(err)
	}
	poller := zmq.NewPoller()
	poller.Add(sub, zmq.POLLIN)
	ready, err := poller.Poll(50 * time.Millisecond)
	if err != nil || len(ready) == 0 {
		t.Fatalf("the flush reply (seq %d) came before its ack event was published", seq)
	}
	frames, _ := sub.RecvMessageBytes(0)
	var ev Event
	if json.Unmarshal(frames[1], &ev); ev.Seq != seq {
		t.Fatalf("ack seq %d, reply seq %d", ev.Seq, seq)
	}
}

// Every event, heartbeat and control reply carries the journal's epoch; it
// survives a restart, and a journal made anew has another.
func TestEpochEverywhere(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	epoch := b.Epoch()
	if !validEpoch(epoch) {
		t.Fatalf("epoch %q", epoch)
	}
	zctx, _ := zmq.NewContext()
	defer zctx.Term()
	sub, _ := zctx.NewSocket(zmq.SUB)
	sub.SetLinger(0)
	sub.SetSubscribe("")
	sub.Connect("ipc://" + filepath.Join(dir, "events.sock"))
	time.Sleep(100 * time.Millisecond)
	if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	sub.SetRcvtimeo(3 * time.Second)
	for len(seen) < 2 {
		frames, err := sub.RecvMessageBytes(0)
		if err != nil {
			t.Fatalf("received %v: %v", seen, err)
		}
		var ev Event
		json.Unmarshal(frames[1], &ev)
		if ev.Epoch != epoch {
			t.Fatalf("%s message with epoch %q, want %q", ev.Kind, ev.Epoch, epoch)
		}
		seen[ev.Kind] = true
	}
	sub.Close()
	c := dial(t, dir)
	p, err := c.ReplayPage(0, 10)
	if err != nil || p.Epoch != epoch || len(p.Topics) != 1 || p.Topics[0] != "attach/v" {
		t.Fatalf("replay: epoch %q topics %v, %v", p.Epoch, p.Topics, err)
	}
	req, _ := zctx.NewSocket(zmq.REQ)
	defer req.Close()
	req.SetLinger(0)
	req.SetRcvtimeo(5 * time.Second)
	req.Connect("ipc://" + filepath.Join(dir, "control.sock"))
	for _, r := range []string{`{"op":"flush","volume_id":"v"}`, `{"op":"flush","volume_id":"missing"}`, `{"op":"nope"}`} {
		req.SendBytes([]byte(r), 0)
		reply, err := req.RecvBytes(0)
		var m struct{ Epoch string }
		if err != nil || json.Unmarshal(reply, &m) != nil || m.Epoch != epoch {
			t.Fatalf("reply to %s: %s, %v", r, reply, err)
		}
	}
	b.Close()
	b = newBridge(t, dir)
	if b.Epoch() != epoch {
		t.Fatalf("epoch after restart %q, want %q", b.Epoch(), epoch)
	}
	b.Close()
	if err := os.RemoveAll(filepath.Join(dir, "journal")); err != nil {
		t.Fatal(err)
	}
	b = newBridge(t, dir)
	defer b.Close()
	if b.Epoch() == epoch || b.Last() != 0 {
		t.Fatalf("journal made anew: epoch %q (was %q), last %d", b.Epoch(), epoch, b.Last())
	}
	// A client that knew the old epoch is told, rather than skipping the
	// new journal's events as already seen.
	b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "v"})
	c = dial(t, dir)
	c.Epoch = epoch
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var changed ErrEpochChanged
	if err := c.Subscribe(ctx, nil, 1, func(Event, []byte) error { return nil }); !errors.As(err, &changed) || changed.New != b.Epoch() {
		t.Fatalf("Subscribe across a new journal: %v", err)
	}
	var got []uint64
	c.OnEpochChange = func(ErrEpochChanged) error { return nil }
	c.Epoch = epoch
	err = c.Subscribe(ctx, nil, 1, func(ev Event, _ []byte) error {
		got = append(got, ev.Seq)
		return errors.New("enough")
	})
	if err == nil || err.Error() != "enough" || len(got) != 1 || got[0] != 1 {
		t.Fatalf("Subscribe with OnEpochChange: got %v, %v", got, err)
	}
}

// With the journal failing to write (disk full), Emit fails (ErrUnavailable)
// instead of losing the event, Healthy says so, a flush gets an error reply
// with code "unavailable"; once writes work again Emit repairs the journal
// and the sequence goes on, no lost event ever published or replayed.
func TestEmitFailsWhileJournalCannotWrite(t *testing.T) {
	var fail atomic.Bool
	orig := fileWriteAt
	fileWriteAt = func(f *os.File, b []byte, off int64) (int, error) {
		if fail.Load() {
			return 0, syscall.ENOSPC
		}
		return orig(f, b, off)
	}
	t.Cleanup(func() { fileWriteAt = orig })
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	c := dial(t, dir)
	var col collector
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dial(t, dir).Subscribe(ctx, nil, 0, col.handle) }()
	defer func() { cancel(); <-done }()
	emit := func(v string) (uint64, error) {
		return b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: v})
	}
	if _, err := emit("ok-1"); err != nil {
		t.Fatal(err)
	}
	fail.Store(true)
	for i := 0; i < 3; i++ {
		if seq, err := emit("lost"); !errors.Is(err, ErrUnavailable) || seq != 0 {
			t.Fatalf("Emit with writes failing = %d, %v; want ErrUnavailable", seq, err)
		}
	}
	if b.Healthy() == nil {
		t.Fatal("Healthy() = nil while the journal cannot write")
	}
	seq, _, err := c.Flush("v", "", "")
	var re *ReplyError
	if !errors.As(err, &re) || re.Code != CodeUnavailable || seq != 0 {
		t.Fatalf("flush while the journal cannot write: seq %d, %v", seq, err)
	}
	fail.Store(false)
	for i := 2; i <= 4; i++ {
		seq, err := emit(fmt.Sprintf("ok-%d", i))
		if err != nil || seq != uint64(i) {
			t.Fatalf("Emit once writes work = %d, %v; want %d", seq, err, i)
		}
	}
	if err := b.Healthy(); err != nil {
		t.Fatal(err)
	}
	events, last, err := c.Replay(0, 0)
	if err != nil || last != 4 || len(events) != 4 {
		t.Fatalf("replay: %d events, last %d, %v", len(events), last, err)
	}
	for i, raw := range events {
		var ev Event
		json.Unmarshal(raw, &ev)
		if ev.Seq != uint64(i+1) || ev.VolumeID != fmt.Sprintf("ok-%d", i+1) {
			t.Fatalf("replayed %s", raw)
		}
	}
	waitFor(t, "the subscriber", func() bool { return col.count() >= 4 })
	col.mu.Lock()
	defer col.mu.Unlock()
	for i, ev := range col.evs {
		if ev.Seq != uint64(i+1) || ev.VolumeID != fmt.Sprintf("ok-%d", i+1) {
			t.Fatalf("subscriber got %+v as event %d", ev, i)
		}
	}
}

// Close never hangs and never races on the ZeroMQ context: endpoints added
// while it runs are refused or closed, and a flush worker still running is
// waited for before the context terminates (run with -race).
func TestCloseWaitsForWorkersAndRefusesEndpoints(t *testing.T) {
	dir := t.TempDir()
	f := &slowFlusher{d: 300 * time.Millisecond}
	b, err := New(Options{Dir: dir, Node: "n1", Heartbeat: 100 * time.Millisecond, Flusher: f})
	if err != nil {
		t.Fatal(err)
	}
	zctx, _ := zmq.NewContext()
	defer zctx.Term()
	req, _ := zctx.NewSocket(zmq.DEALER)
	defer req.Close()
	req.SetLinger(0)
	req.Connect("ipc://" + filepath.Join(dir, "control.sock"))
	for i := 0; i < 5; i++ {
		req.SendMessage("", `{"op":"flush","volume_id":"v"}`)
		req.SendMessage("", `{"op":"replay","since":0}`)
	}
	waitFor(t, "a flush in progress", func() bool { return f.started.Load() > 0 })
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() { // endpoints keep coming while Close runs
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			d := filepath.Join(dir, fmt.Sprintf("p%d", i))
			os.MkdirAll(d, 0o700)
			b.AddEndpoint(fmt.Sprint(i), Endpoint{Events: "ipc://" + d + "/e.sock", Control: "ipc://" + d + "/c.sock"})
		}
	}()
	time.Sleep(20 * time.Millisecond)
	closed := make(chan error, 1)
	go func() { closed <- b.Close() }()
	select {
	case <-closed:
	case <-time.After(workerGrace + 5*time.Second):
		t.Fatal("Close hangs")
	}
	close(stop)
	wg.Wait()
	d := filepath.Join(dir, "late")
	os.MkdirAll(d, 0o700)
	if err := b.AddEndpoint("late", Endpoint{Events: "ipc://" + d + "/e.sock", Control: "ipc://" + d + "/c.sock"}); err == nil {
		t.Fatal("AddEndpoint after Close succeeded")
	}
	if f.running.Load() != 0 {
		t.Fatal("Close returned while a flush worker was still running")
	}
}

// slowFlusher takes d for every flush, ignoring its context.
type slowFlusher struct {
	d                time.Duration
	started, running atomic.Int32
}

func (f *slowFlusher) Flush(context.Context, FlushRequest) (uint64, float64, error) {
	f.started.Add(1)
	f.running.Add(1)
	defer f.running.Add(-1)
	time.Sleep(f.d)
	return 0, 0, Errorf(CodeNotFound, "no such volume")
}

// Retention removes old segment files only after a directory fsync made the
// newer segments' creation durable.
func TestJournalDirSyncBeforeDelete(t *testing.T) {
	var mu sync.Mutex
	var ops []string
	dir := t.TempDir()
	stubSync(t, func(f *os.File) error {
		mu.Lock()
		if f.Name() == dir {
			ops = append(ops, "dirsync")
		}
		mu.Unlock()
		return f.Sync()
	})
	stubAllocate(t, 0, func(f *os.File, _ int64) {
		mu.Lock()
		ops = append(ops, "create "+filepath.Base(f.Name()))
		mu.Unlock()
	})
	origRemove := fileRemove
	fileRemove = func(p string) error {
		mu.Lock()
		ops = append(ops, "remove "+filepath.Base(p))
		mu.Unlock()
		return origRemove(p)
	}
	t.Cleanup(func() { fileRemove = origRemove })
	j := openT(t, JournalOptions{Dir: dir, SegmentBytes: 1, MaxBytes: 1})
	appendN(t, j, 6)
	if err := j.Sync(6); err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	removes, synced := 0, true
	for _, op := range ops {
		switch {
		case strings.HasPrefix(op, "create"):
			synced = false
		case op == "dirsync":
			synced = true
		case strings.HasPrefix(op, "remove"):
			removes++
			if !synced {
				t.Fatalf("%s before a directory fsync after the last segment creation: %v", op, ops)
			}
		}
	}
	if removes < 4 {
		t.Fatalf("%d segments removed: %v", removes, ops)
	}
}

// MaxAge applies to the records the journal found at start: a quiet node
// restarted drops them once they are older than MaxAge.
func TestJournalAgeAfterRestart(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	o := JournalOptions{Dir: dir, MaxAge: 24 * time.Hour, Now: clock}
	j := openT(t, o)
	appendN(t, j, 3)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	now = now.Add(25 * time.Hour)
	mu.Unlock()
	j = openT(t, o)
	defer j.Close()
	if err := j.Maintain(); err != nil { // seals the aged active segment
		t.Fatal(err)
	}
	if err := j.Maintain(); err != nil { // and drops it
		t.Fatal(err)
	}
	if j.First() != 4 || j.Last() != 3 {
		t.Fatalf("after MaxAge: First=%d Last=%d, want 4 3", j.First(), j.Last())
	}
	if _, err := j.Read(0, 0); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Read(0) = %v, want truncated", err)
	}
}

// A failed fdatasync (a sticky EIO: the kernel may have dropped the dirty
// pages) loses the records it covered; Repair drops them from the files and
// appending goes on from the last durable seq: nobody ever sees the lost ones.
func TestJournalRepairAfterFsyncError(t *testing.T) {
	var fail atomic.Bool
	stubDatasync(t, func(f *os.File) error {
		if fail.Load() {
			return errors.New("EIO")
		}
		return f.Sync()
	})
	dir := t.TempDir()
	o := JournalOptions{Dir: dir}
	j := openT(t, o)
	appendN(t, j, 2)
	if err := j.Sync(2); err != nil {
		t.Fatal(err)
	}
	fail.Store(true)
	lost, err := j.Append("lost", func(uint64) []byte { return []byte("never durable") })
	if err != nil {
		t.Fatal(err)
	}
	if err := j.SyncRecord(context.Background(), lost); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("SyncRecord = %v, want ErrUnavailable", err)
	}
	fail.Store(false)
	if err := j.Repair(context.Background()); err != nil {
		t.Fatalf("Repair: %v", err)
	}
	if j.Last() != 2 || j.Err() != nil {
		t.Fatalf("after repair: Last() = %d, Err() = %v", j.Last(), j.Err())
	}
	if err := j.SyncRecord(context.Background(), lost); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("SyncRecord of the lost record after the repair = %v", err)
	}
	appendN(t, j, 1)
	r3, _ := j.Read(2, 0)
	if err := j.Sync(3); err != nil || len(r3) != 1 || r3[0].Topic == "lost" {
		t.Fatalf("after repair: %v, %+v", err, r3)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openT(t, o)
	defer j.Close()
	checkRecs(t, readAll(t, j, 0), 1, 3)
}
