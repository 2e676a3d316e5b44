package zmqbridge

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
)

// addPodEndpoint binds an endpoint in a directory of its own.
func addPodEndpoint(t *testing.T, b *Bridge, key string, scope Scope) (events, control string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), key)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	events, control = "ipc://"+dir+"/events.sock", "ipc://"+dir+"/control.sock"
	if err := b.AddEndpoint(key, Endpoint{Events: events, Control: control, Scope: scope, SendHWM: 1000}); err != nil {
		t.Fatal(err)
	}
	return events, control
}

// rawSocket makes a socket of the test's own context, connected to addr.
func rawSocket(t *testing.T, zctx *zmq.Context, typ zmq.Type, addr string) *zmq.Socket {
	t.Helper()
	s, err := zctx.NewSocket(typ)
	if err != nil {
		t.Fatal(err)
	}
	s.SetLinger(0)
	if err := s.Connect(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newContext(t *testing.T) *zmq.Context {
	zctx, err := zmq.NewContext()
	if err != nil {
		t.Fatal(err)
	}
	zctx.SetMaxSockets(8000)
	t.Cleanup(func() { zctx.Term() })
	return zctx
}

// call sends a request on a DEALER and waits for its reply.
func dealerCall(t *testing.T, d *zmq.Socket, req string, timeout time.Duration) (string, error) {
	t.Helper()
	if _, err := d.SendMessage("", req); err != nil {
		t.Fatal(err)
	}
	d.SetRcvtimeo(timeout)
	f, err := d.RecvMessage(0)
	if err != nil {
		return "", err
	}
	return f[len(f)-1], nil
}

// The ZeroMQ context fits every endpoint the bridge may bind, with room for
// its replies: with metrics on (4 sockets an endpoint) MaxEndpoints pod
// endpoints bind, the next is refused with ErrTooManyEndpoints, and every
// endpoint still answers. libzmq's default limit (1023 sockets) ran out near
// 250 endpoints, after which no reply could be sent.
func TestEndpointCapAndSocketLimit(t *testing.T) {
	dir := t.TempDir()
	const max = 300
	b, err := New(Options{Dir: dir, Node: "n1", Metrics: &gaugeMetrics{}, MaxEndpoints: max})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	root := t.TempDir()
	var last string
	for i := 0; i < max; i++ {
		last = filepath.Join(root, fmt.Sprint(i))
		if err := b.AddEndpoint(fmt.Sprint(i), Endpoint{Events: "ipc://" + last + "-e", Control: "ipc://" + last + "-c",
			Scope: Scope{Namespace: "a"}}); err != nil {
			t.Fatalf("endpoint %d of %d: %v", i+1, max, err)
		}
	}
	err = b.AddEndpoint("one-more", Endpoint{Events: "ipc://" + root + "/x-e", Control: "ipc://" + root + "/x-c", Scope: Scope{All: true}})
	if !errors.Is(err, ErrTooManyEndpoints) {
		t.Fatalf("endpoint %d: %v, want ErrTooManyEndpoints", max+1, err)
	}
	for _, ctl := range []string{"ipc://" + filepath.Join(dir, "control.sock"), "ipc://" + last + "-c"} {
		c, _ := Dial("ipc://unused", ctl)
		c.Timeout = 10 * time.Second
		if _, _, err := c.Replay(0, 1); err != nil {
			t.Errorf("replay on %s with %d endpoints bound: %v", ctl, max, err)
		}
		c.Close()
	}
	b.RemoveEndpoint("0")
	if err := b.AddEndpoint("again", Endpoint{Events: "ipc://" + root + "/y-e", Control: "ipc://" + root + "/y-c", Scope: Scope{All: true}}); err != nil {
		t.Fatalf("after a removal: %v", err)
	}
}

// A control message of more frames than a request has is dropped whole (no
// reply), and the next request on the same connection is answered.
func TestControlFramesBounded(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	_, podCtl := addPodEndpoint(t, b, "pod", Scope{Namespace: "a"})
	zctx := newContext(t)

	d := rawSocket(t, zctx, zmq.DEALER, podCtl)
	if _, err := d.SendMessage("", `{"op":"replay"}`, `{"op":"replay"}`, "x", "y"); err != nil {
		t.Fatal(err)
	}
	if r, err := dealerCall(t, d, `{"op":"replay","max":1}`, 5*time.Second); err != nil || !strings.Contains(r, `"last"`) {
		t.Fatalf("after a 5-frame message: reply %q, %v; want only the next request's answer", r, err)
	}
	d.SetRcvtimeo(300 * time.Millisecond)
	if f, err := d.RecvMessage(0); err == nil {
		t.Fatalf("the 5-frame message was answered: %q", f)
	}

}

// blockingFlusher holds every flush until released, counting them.
type blockingFlusher struct {
	b       *Bridge
	calls   atomic.Int32
	release chan struct{}
	started chan string
}

func (f *blockingFlusher) Flush(ctx context.Context, req FlushRequest) (uint64, float64, error) {
	f.calls.Add(1)
	select {
	case f.started <- req.VolumeID:
	default:
	}
	select {
	case <-f.release:
	case <-ctx.Done():
		return 0, 0, ctx.Err()
	}
	ms := 1.0
	seq, err := f.b.Emit(context.Background(), Event{Kind: KindAck, VolumeID: req.VolumeID, FlushMs: &ms, Trigger: TriggerRequest})
	return seq, ms, err
}

func newBlockingBridge(t *testing.T) (*Bridge, *blockingFlusher, string) {
	dir := t.TempDir()
	f := &blockingFlusher{release: make(chan struct{}), started: make(chan string, 100)}
	b, err := New(Options{Dir: dir, Node: "n1", Heartbeat: 100 * time.Millisecond, Flusher: f})
	if err != nil {
		t.Fatal(err)
	}
	f.b = b
	t.Cleanup(func() { b.Close() })
	return b, f, dir
}

// A fixed pool of workers serves replays and flushes, each endpoint from its
// own bounded queue: a pod whose flushes hang and that sends 1,000 replays
// at once gets an immediate "busy" for what its queue cannot hold, and
// another endpoint's replay is answered meanwhile.
func TestWorkerPoolBusyAndFair(t *testing.T) {
	b, f, _ := newBlockingBridge(t)
	_, hostileCtl := addPodEndpoint(t, b, "hostile", Scope{All: true})
	_, otherCtl := addPodEndpoint(t, b, "other", Scope{All: true})
	zctx := newContext(t)
	d := rawSocket(t, zctx, zmq.DEALER, hostileCtl)
	for i := 0; i < 8; i++ { // hanging flushes of 8 volumes
		d.SendMessage("", fmt.Sprintf(`{"op":"flush","volume_id":"v%d"}`, i))
	}
	for i := 0; i < 1000; i++ {
		d.SendMessage("", `{"op":"replay","since":0,"max":1}`)
	}
	d.SetRcvtimeo(2 * time.Second)
	busy, answered := 0, 0
	for {
		r, err := d.RecvMessage(0)
		if err != nil {
			break
		}
		if strings.Contains(r[len(r)-1], `"code":"busy"`) {
			busy++
		} else {
			answered++
		}
	}
	t.Logf("1,000 replays behind hanging flushes: %d busy, %d answered", busy, answered)
	if busy < 900 {
		t.Errorf("%d busy replies, want most of the 1,000 replays refused at once", busy)
	}
	c, _ := Dial("ipc://unused", otherCtl)
	defer c.Close()
	c.Timeout = 3 * time.Second
	if _, _, err := c.Replay(0, 1); err != nil {
		t.Fatalf("another endpoint's replay while the hostile one holds its workers: %v", err)
	}
	if n := f.calls.Load(); n > int32(DefaultWorkers/2) {
		t.Errorf("%d flushes of one endpoint running at once, want at most %d", n, DefaultWorkers/2)
	}
	close(f.release)
}

// Flushes of the same volume by the same requester coalesce: while one runs,
// every further request waits for one next flush. An endpoint starts at most
// FlushBurst flushes at once and FlushRate a second; past that it gets busy.
func TestFlushesCoalesceAndRateLimit(t *testing.T) {
	b, f, _ := newBlockingBridge(t)
	_, ctl := addPodEndpoint(t, b, "pod", Scope{All: true})
	zctx := newContext(t)
	d := rawSocket(t, zctx, zmq.DEALER, ctl)
	d.SendMessage("", `{"op":"flush","volume_id":"v"}`)
	<-f.started
	for i := 0; i < 50; i++ {
		d.SendMessage("", `{"op":"flush","volume_id":"v"}`)
	}
	time.Sleep(200 * time.Millisecond)
	close(f.release)
	d.SetRcvtimeo(5 * time.Second)
	seqs := map[string]int{}
	for i := 0; i < 51; i++ {
		r, err := d.RecvMessage(0)
		if err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		seqs[r[len(r)-1]]++
	}
	if n := f.calls.Load(); n != 2 {
		t.Errorf("51 flush requests of one volume ran %d flushes, want 2 (the running one, then one for all the rest): %v", n, seqs)
	}
	if len(seqs) != 2 {
		t.Errorf("replies %v, want two distinct acks", seqs)
	}

	// Rate: distinct volumes, far faster than FlushRate.
	busy := 0
	for i := 0; i < 40; i++ {
		r, err := dealerCall(t, d, fmt.Sprintf(`{"op":"flush","volume_id":"r%d"}`, i), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(r, `"busy"`) {
			busy++
		}
	}
	if busy < 20 {
		t.Errorf("%d of 40 back-to-back flushes refused as busy, want the rate limit to refuse most", busy)
	}
}

// A pod endpoint's subscriber queue holds about 1,000 events: a stalled
// subscriber does not make the node keep 100,000 of them (it replays).
func TestPodEndpointSendHWM(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	podEvents, _ := addPodEndpoint(t, b, "pod", Scope{All: true})
	zctx := newContext(t)
	sub := rawSocket(t, zctx, zmq.SUB, podEvents)
	sub.SetRcvhwm(1)
	sub.SetRcvbuf(4096)
	sub.SetSubscribe("")
	time.Sleep(300 * time.Millisecond)
	const n = 20000
	for i := 0; i < n; i++ {
		if _, err := b.EmitAsync(Event{Kind: KindAck, VolumeID: "v"}); err != nil {
			t.Fatal(err)
		}
	}
	b.journal.Sync(n)
	time.Sleep(500 * time.Millisecond)
	got := len(recvTopics(sub, 300*time.Millisecond))
	t.Logf("a stalled subscriber then got %d of %d events", got, n)
	if got > 6000 {
		t.Errorf("a stalled pod subscriber was queued %d events, want about 1,000 (+ socket buffers)", got)
	}
}

// The zero Scope sees nothing; a pod scope forgets a volume once the pod
// unpublishes it.
func TestScopes(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	zeroEv, zeroCtl := addPodEndpoint(t, b, "zero", Scope{})
	podEv, _ := addPodEndpoint(t, b, "pod", Scope{Namespace: "a", PodUID: "u1"})
	zctx := newContext(t)
	zsub := rawSocket(t, zctx, zmq.SUB, zeroEv)
	zsub.SetSubscribe("")
	psub := rawSocket(t, zctx, zmq.SUB, podEv)
	psub.SetSubscribe("")
	time.Sleep(300 * time.Millisecond)
	for _, ev := range []Event{
		{Kind: KindPublish, VolumeID: "v1", PVC: "p", Namespace: "a", PodUID: "u1"},
		{Kind: KindAck, VolumeID: "v1", PVC: "p", Namespace: "a"},
		{Kind: KindUnpublish, VolumeID: "v1", PVC: "p", Namespace: "a", PodUID: "u1"},
		{Kind: KindAck, VolumeID: "v1", PVC: "p", Namespace: "a"}, // no longer the pod's
		{Kind: KindPublish, VolumeID: "v1", PVC: "p", Namespace: "a", PodUID: "u2"},
		{Kind: KindAck, VolumeID: "v1", PVC: "p", Namespace: "a"},
	} {
		if _, err := b.Emit(context.Background(), ev); err != nil {
			t.Fatal(err)
		}
	}
	if got := recvTopics(zsub, 500*time.Millisecond); len(got) != 0 {
		t.Errorf("the zero Scope delivered %q", got)
	}
	c, _ := Dial("ipc://unused", zeroCtl)
	defer c.Close()
	c.Timeout = 5 * time.Second
	if evs, _, err := c.Replay(0, 0); err != nil || len(evs) != 0 {
		t.Errorf("the zero Scope replayed %d events (%v)", len(evs), err)
	}
	var kinds []string
	psub.SetRcvtimeo(500 * time.Millisecond)
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
		f, err := psub.RecvMessageBytes(0)
		if err != nil {
			break
		}
		var ev Event
		json.Unmarshal(f[1], &ev)
		if ev.Kind != KindHeartbeat {
			kinds = append(kinds, fmt.Sprintf("%d %s", ev.Seq, ev.Kind))
		}
	}
	if strings.Join(kinds, " ") != "1 publish 2 ack 3 unpublish" {
		t.Errorf("pod scope delivered %q, want 1 publish 2 ack 3 unpublish", kinds)
	}
}

// A socket file gets its mode whatever the process umask, by the binding
// thread's own umask (not a chmod of its path).
func TestSocketModeByUmask(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	for _, mode := range []os.FileMode{0o666, 0o600, 0o660} {
		d := filepath.Join(t.TempDir(), "m")
		os.MkdirAll(d, 0o755)
		key := fmt.Sprint(mode)
		if err := b.AddEndpoint(key, Endpoint{Events: "ipc://" + d + "/e.sock", Control: "ipc://" + d + "/c.sock", Mode: mode, Scope: Scope{All: true}}); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"e.sock", "c.sock"} {
			fi, err := os.Stat(filepath.Join(d, f))
			if err != nil || fi.Mode().Perm() != mode {
				t.Errorf("%s: mode %v (%v), want %v", f, fi.Mode().Perm(), err, mode)
			}
		}
	}
}

// A guarded endpoint: a raw ZMTP client streaming one endless multipart
// message of 1 GiB is cut at its third frame, so the process does not grow;
// REQ and SUB clients work through the relay; at most MaxConnections
// connections are held at once.
func TestGuardedEndpoint(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	pod := filepath.Join(t.TempDir(), "pod")
	os.MkdirAll(pod, 0o755)
	events, control := "ipc://"+pod+"/events.sock", "ipc://"+pod+"/control.sock"
	if err := b.AddEndpoint("pod", Endpoint{Events: events, Control: control, Scope: Scope{All: true}, Mode: 0o666, Guard: true}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(pod + "/control.sock"); err != nil || fi.Mode().Perm() != 0o666 {
		t.Fatalf("guarded control.sock: %v %v", fi.Mode(), err)
	}
	before := rss(t)
	err := streamEndlessMessage(pod+"/control.sock", 1<<30)
	grown := rss(t) - before
	t.Logf("a raw 1 GiB multipart message: %v; RSS growth %d MiB", err, grown>>20)
	if err == nil || grown > 64<<20 {
		t.Errorf("a 1 GiB multipart message through the guard: %v, RSS +%d MiB; want the connection cut early", err, grown>>20)
	}
	// Frames over the size limits, each a message of its own.
	for _, tc := range []struct {
		sock string
		size int
	}{{"/control.sock", maxMessageBytes + 1}, {"/events.sock", maxSubscriptionBytes + 1}} {
		if err := streamFrames(pod+tc.sock, tc.size, 0, 64<<20); err == nil {
			t.Errorf("64 MiB of %d-byte frames to %s went through", tc.size, tc.sock)
		}
	}
	c, _ := Dial(events, control)
	defer c.Close()
	c.Timeout = 5 * time.Second
	var got collector
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- c.Subscribe(ctx, nil, 0, got.handle) }()
	time.Sleep(300 * time.Millisecond)
	if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "an event through the relay", func() bool { return got.count() == 1 })
	cancel()
	<-errc
	var conns []net.Conn
	for i := 0; i < MaxConnections+10; i++ {
		cn, err := net.Dial("unix", pod+"/events.sock")
		if err != nil {
			t.Fatal(err)
		}
		defer cn.Close()
		conns = append(conns, cn)
	}
	time.Sleep(300 * time.Millisecond)
	cut := 0
	for _, cn := range conns {
		cn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if _, err := cn.Read(make([]byte, 1)); errors.Is(err, io.EOF) {
			cut++
		}
	}
	if cut < 10 {
		t.Errorf("%d of %d connections refused, want at least 10 past %d", cut, len(conns), MaxConnections)
	}
}

// rss is the process's resident set in bytes.
func rss(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		t.Fatal(err)
	}
	var size, res int64
	fmt.Sscan(string(b), &size, &res)
	return res * int64(os.Getpagesize())
}

// streamEndlessMessage connects to a unix socket as a DEALER speaking ZMTP
// 3.0 itself and sends one multipart message of total bytes that never ends
// (every frame has MORE set), from one reused buffer.
func streamEndlessMessage(path string, total int) error {
	return streamFrames(path, 64<<10, 0x01, total)
}

// streamFrames is streamEndlessMessage with frames of size bytes and flags
// (0x01: MORE), until total bytes are sent or the connection is cut.
func streamFrames(path string, size int, flags byte, total int) error {
	c, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	defer c.Close()
	greeting := make([]byte, 64)
	greeting[0], greeting[9], greeting[10] = 0xff, 0x7f, 3
	copy(greeting[12:], "NULL")
	if _, err := c.Write(greeting); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, make([]byte, 64)); err != nil {
		return err
	}
	ready := append([]byte{5}, "READY"...)
	ready = append(append(ready, 11), "Socket-Type"...)
	ready = append(binary.BigEndian.AppendUint32(ready, 6), "DEALER"...)
	if _, err := c.Write(append([]byte{0x04, byte(len(ready))}, ready...)); err != nil {
		return err
	}
	go io.Copy(io.Discard, c)
	frame := make([]byte, size)
	head := binary.BigEndian.AppendUint64([]byte{flags | 0x02}, uint64(len(frame))) // LONG
	for sent := 0; sent < total; sent += len(frame) {
		if _, err := c.Write(head); err != nil {
			return err
		}
		if _, err := c.Write(frame); err != nil {
			return err
		}
	}
	return nil
}

// Client retries a request answered with code busy (with backoff, within its
// Timeout) instead of returning the busy reply as an error.
func TestClientRetriesBusy(t *testing.T) {
	b, f, _ := newBlockingBridge(t)
	_, ctl := addPodEndpoint(t, b, "pod", Scope{All: true})
	zctx := newContext(t)
	d := rawSocket(t, zctx, zmq.DEALER, ctl)
	d.SetRcvtimeo(5 * time.Second)
	// Spend the endpoint's flush burst until one is refused busy.
	refused := false
	for i := 0; i < 4*DefaultFlushBurst && !refused; i++ {
		r, err := dealerCall(t, d, fmt.Sprintf(`{"op":"flush","volume_id":"b%d"}`, i), 50*time.Millisecond)
		refused = err == nil && strings.Contains(r, `"code":"busy"`)
	}
	if !refused {
		t.Fatal("no flush refused busy: cannot test the client's retry")
	}
	go func() { time.Sleep(time.Second); close(f.release) }()
	c, _ := Dial("ipc://unused", ctl)
	defer c.Close()
	c.Timeout = 10 * time.Second
	if _, _, err := c.Flush("x", "", ""); err != nil {
		t.Fatalf("flush through a busy endpoint: %v, want the client to retry until it is answered", err)
	}
}
