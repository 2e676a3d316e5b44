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
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
)

type fakeFlusher struct {
	b *Bridge
}

func (f *fakeFlusher) Flush(ctx context.Context, req FlushRequest) (uint64, float64, error) {
	if req.VolumeID == "missing" {
		return 0, 0, errors.New("volume missing is not staged on this node")
	}
	ms := 1.5
	seq, err := f.b.Emit(ctx, Event{Kind: KindAck, VolumeID: req.VolumeID, Namespace: req.Namespace, PVC: req.PVC, FlushMs: &ms, Trigger: TriggerRequest})
	return seq, ms, err
}

func newBridge(t *testing.T, dir string) *Bridge {
	t.Helper()
	f := &fakeFlusher{}
	b, err := New(Options{Dir: dir, Node: "n1", Driver: "d", Heartbeat: 100 * time.Millisecond, Flusher: f})
	if err != nil {
		t.Fatal(err)
	}
	f.b = b
	return b
}

func dial(t *testing.T, dir string) *Client {
	t.Helper()
	c, err := Dial("ipc://"+filepath.Join(dir, "events.sock"), "ipc://"+filepath.Join(dir, "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	c.Timeout = 10 * time.Second
	t.Cleanup(c.Close)
	return c
}

// collector gathers delivered events.
type collector struct {
	mu   sync.Mutex
	seqs []uint64
	evs  []Event
}

func (c *collector) handle(ev Event, _ []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seqs = append(c.seqs, ev.Seq)
	c.evs = append(c.evs, ev)
	return nil
}

func (c *collector) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seqs)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSocketsAndTopics(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	for _, n := range []string{"events.sock", "control.sock"} {
		fi, err := os.Stat(filepath.Join(dir, n))
		if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
			t.Fatalf("%s: %v %v", n, fi.Mode(), err)
		}
	}
	// A raw SUB with a prefix subscription selects by kind and namespace.
	zctx, _ := zmq.NewContext()
	defer zctx.Term()
	sub, _ := zctx.NewSocket(zmq.SUB)
	defer sub.Close()
	sub.SetLinger(0)
	sub.SetSubscribe("publish/team-a/")
	sub.Connect("ipc://" + filepath.Join(dir, "events.sock"))
	time.Sleep(100 * time.Millisecond)
	for _, e := range []Event{
		{Kind: KindAttach, VolumeID: "v1", PVC: "data", Namespace: "team-a"},
		{Kind: KindPublish, VolumeID: "v1", PVC: "data", Namespace: "team-b"},
		{Kind: KindPublish, VolumeID: "v1", PVC: "data", Namespace: "team-a", Pod: "p"},
	} {
		if _, err := b.Emit(context.Background(), e); err != nil {
			t.Fatal(err)
		}
	}
	sub.SetRcvtimeo(5 * time.Second)
	frames, err := sub.RecvMessageBytes(0)
	if err != nil {
		t.Fatal(err)
	}
	var ev Event
	json.Unmarshal(frames[1], &ev)
	if string(frames[0]) != "publish/team-a/data" || ev.Seq != 3 || ev.Pod != "p" || ev.V != 1 || ev.Node != "n1" || ev.Driver != "d" {
		t.Fatalf("got topic %q event %+v", frames[0], ev)
	}
	if _, err := time.Parse(time.RFC3339Nano, ev.Time); err != nil {
		t.Fatalf("time %q: %v", ev.Time, err)
	}
}

// A subscriber that disconnects during 10,000 events and reconnects with
// subscribe-then-replay ends with all of them, once each, in order.
func TestReconnectLosesNothing(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	const total = 10000
	var got collector
	emitDone := make(chan error, 1)
	go func() {
		for i := 0; i < total; i++ {
			if _, err := b.EmitAsync(Event{Kind: KindAck, VolumeID: fmt.Sprintf("v%d", i)}); err != nil {
				emitDone <- err
				return
			}
		}
		emitDone <- nil
	}()
	// First connection: gets some, then goes away mid-stream.
	c1 := dial(t, dir)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- c1.Subscribe(ctx, nil, 0, got.handle) }()
	waitFor(t, "some events", func() bool { return got.count() > 100 })
	cancel()
	<-errc
	if err := <-emitDone; err != nil {
		t.Fatal(err)
	}
	got.mu.Lock()
	last := got.seqs[len(got.seqs)-1]
	got.mu.Unlock()
	// Reconnect from the last sequence seen.
	c2 := dial(t, dir)
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	go func() { errc <- c2.Subscribe(ctx2, nil, last, got.handle) }()
	waitFor(t, "all events", func() bool { return got.count() >= total })
	time.Sleep(200 * time.Millisecond) // anything extra would be a duplicate
	got.mu.Lock()
	defer got.mu.Unlock()
	if len(got.seqs) != total {
		t.Fatalf("%d events delivered, want %d", len(got.seqs), total)
	}
	for i, s := range got.seqs {
		if s != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i, s)
		}
	}
}

func TestRestartContinuesSequence(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	for i := 0; i < 5; i++ {
		b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "v"})
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b = newBridge(t, dir)
	defer b.Close()
	seq, err := b.Emit(context.Background(), Event{Kind: KindDetach, VolumeID: "v"})
	if err != nil || seq != 6 {
		t.Fatalf("first event after restart: seq %d, %v", seq, err)
	}
	events, last, err := dial(t, dir).Replay(0, 0)
	if err != nil || len(events) != 6 || last != 6 {
		t.Fatalf("replay: %d events, last %d, %v", len(events), last, err)
	}
}

func TestControlRequests(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	for i := 0; i < 30; i++ {
		b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: fmt.Sprintf("v%d", i)})
	}
	c := dial(t, dir)
	events, last, err := c.Replay(10, 5)
	if err != nil || len(events) != 5 || last != 30 {
		t.Fatalf("paged replay: %d events, last %d, %v", len(events), last, err)
	}
	var first Event
	json.Unmarshal(events[0], &first)
	if first.Seq != 11 {
		t.Fatalf("first replayed seq %d, want 11", first.Seq)
	}
	seq, ms, err := c.Flush("v3", "", "")
	if err != nil || seq != 31 || ms != 1.5 {
		t.Fatalf("flush: seq %d ms %v err %v", seq, ms, err)
	}
	if _, _, err := c.Flush("missing", "", ""); err == nil || !strings.Contains(err.Error(), "not staged") {
		t.Fatalf("flush of a missing volume: %v", err)
	}
	if b.Last() != 31 {
		t.Fatalf("a failed flush published something: last %d", b.Last())
	}

	// Malformed requests get error replies and the bridge keeps serving.
	zctx, _ := zmq.NewContext()
	defer zctx.Term()
	req, _ := zctx.NewSocket(zmq.REQ)
	defer req.Close()
	req.SetLinger(0)
	req.SetRcvtimeo(5 * time.Second)
	req.Connect("ipc://" + filepath.Join(dir, "control.sock"))
	for _, tc := range []struct {
		frames []string
		want   string
	}{
		{[]string{"{nope"}, "bad JSON"},
		{[]string{`{"op":"explode"}`}, "unknown op"},
		{[]string{`{"op":"replay"}`, `{"op":"replay"}`}, "expected one JSON frame, got 2"},
		{[]string{`{"op":"replay","since":1,"pad":"` + strings.Repeat("x", 100<<10) + `"}`}, "exceeds"},
		{[]string{""}, "bad JSON"},
	} {
		if _, err := req.SendMessage(tc.frames); err != nil {
			t.Fatal(err)
		}
		reply, err := req.RecvBytes(0)
		if err != nil {
			t.Fatalf("no reply to %.30q: %v", tc.frames, err)
		}
		if !strings.Contains(string(reply), tc.want) || !strings.Contains(string(reply), `"error"`) {
			t.Errorf("reply to %.30q = %s, want an error containing %q", tc.frames, reply, tc.want)
		}
	}
	if _, last, err := c.Replay(0, 1); err != nil || last != 31 {
		t.Fatalf("bridge stopped serving: %v", err)
	}
}

func TestCloseIsQuickWithStuckSubscriber(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	zctx, _ := zmq.NewContext()
	sub, _ := zctx.NewSocket(zmq.SUB)
	sub.SetRcvhwm(1)
	sub.SetSubscribe("")
	sub.Connect("ipc://" + filepath.Join(dir, "events.sock")) // never reads
	time.Sleep(50 * time.Millisecond)
	for i := 0; i < 20000; i++ {
		if _, err := b.EmitAsync(Event{Kind: KindAck, VolumeID: "v"}); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Close took %s with a stuck subscriber", d)
	}
	sub.SetLinger(0)
	sub.Close()
	zctx.Term()
	// Nothing journaled was lost.
	j, err := OpenJournal(JournalOptions{Dir: filepath.Join(dir, "journal")})
	if err != nil || j.Last() != 20000 {
		t.Fatalf("journal after close: last %d, %v", j.Last(), err)
	}
	j.Close()
}

// A scoped replay reads at most maxReplayScan records per request and says
// how far it looked ("next"), so a namespace with few events behind many of
// others' costs bounded work per request and still loses nothing.
func TestScopedReplayIsBounded(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	scoped := filepath.Join(t.TempDir(), "a")
	os.MkdirAll(scoped, 0o755)
	if err := b.AddEndpoint("a", Endpoint{Events: "ipc://" + scoped + "/events.sock", Control: "ipc://" + scoped + "/control.sock",
		Scope: Scope{Namespace: "a"}}); err != nil {
		t.Fatal(err)
	}
	const others = 25000
	for i := 0; i < others; i++ {
		if _, err := b.EmitAsync(Event{Kind: KindAttach, VolumeID: "v", PVC: "p", Namespace: "b"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "mine", PVC: "p", Namespace: "a"}); err != nil {
		t.Fatal(err)
	}
	c, _ := Dial("ipc://"+scoped+"/events.sock", "ipc://"+scoped+"/control.sock")
	defer c.Close()
	c.Timeout = 10 * time.Second
	p, err := c.ReplayPage(0, 0)
	if err != nil || len(p.Events) != 0 || p.Next != maxReplayScan || p.Last != others+1 {
		t.Fatalf("first page: %d events, next %d, last %d, %v; want 0, %d, %d", len(p.Events), p.Next, p.Last, err, maxReplayScan, others+1)
	}
	events, _, err := c.Replay(0, 0)
	if err != nil || len(events) != 1 || !strings.Contains(string(events[0]), `"volume_id":"mine"`) {
		t.Fatalf("paged replay: %s %v", events, err)
	}
	var got collector
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- c.Subscribe(ctx, nil, 0, got.handle) }()
	waitFor(t, "the scoped event", func() bool { return got.count() == 1 })
	time.Sleep(300 * time.Millisecond)
	if got.count() != 1 || got.evs[0].VolumeID != "mine" {
		t.Fatalf("subscriber got %+v", got.evs)
	}
	cancel()
	<-errc
}
