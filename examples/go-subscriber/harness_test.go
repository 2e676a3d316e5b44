// The test harness: a real bridge, the Go and Python subscribers, a relay
// that loses events or plays a namespace-scoped endpoint.

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

const total = 500

// out collects a subscriber's output; safe for concurrent use.
type out struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (o *out) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.Write(p)
}

func (o *out) String() string { o.mu.Lock(); defer o.mu.Unlock(); return o.buf.String() }

// seqs parses the complete lines printed so far.
func (o *out) seqs(t *testing.T) []uint64 {
	s := o.String()
	var seqs []uint64
	for _, line := range strings.Split(s[:strings.LastIndexByte(s, '\n')+1], "\n") {
		if line == "" {
			continue
		}
		var ev struct {
			Seq  uint64
			Kind string
		}
		if err := json.Unmarshal([]byte(line), &ev); err != nil || ev.Kind != "attach" {
			t.Fatalf("printed %q: not an attach event (%v)", line, err)
		}
		seqs = append(seqs, ev.Seq)
	}
	return seqs
}

// subscriber is a running Go or Python subscriber.
type subscriber struct {
	stdout, stderr out
	stop           func() error
}

type starter func(t *testing.T, dir string, args ...string) *subscriber

// startGo runs subscribe in-process with the same flags as the Python one.
func startGo(t *testing.T, dir string, args ...string) *subscriber {
	cfg, _, err := parseArgs(append([]string{"--dir", dir, "--timeout", "10"}, args...))
	if err != nil {
		t.Fatal(err)
	}
	s := &subscriber{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- subscribe(ctx, cfg, &s.stdout, &s.stderr) }()
	s.stop = func() error {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			return err
		}
		return nil
	}
	return s
}

// startPython runs the Python subscriber; stop sends SIGTERM.
func startPython(t *testing.T, dir string, args ...string) *subscriber {
	if err := exec.Command("/usr/bin/python3", "-c", "import zmq").Run(); err != nil {
		t.Skip("/usr/bin/python3 cannot import zmq:", err)
	}
	s := &subscriber{}
	cmd := exec.Command("/usr/bin/python3", append([]string{"../python-subscriber/subscriber.py", "--dir", dir, "--timeout", "10"}, args...)...)
	cmd.Stdout, cmd.Stderr = &s.stdout, &s.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	s.stop = func() error {
		cmd.Process.Signal(syscall.SIGTERM)
		return cmd.Wait()
	}
	return s
}

type flusher struct{ b *zmqbridge.Bridge }

func (f *flusher) Flush(ctx context.Context, req zmqbridge.FlushRequest) (uint64, float64, error) {
	if req.VolumeID != "v" && (req.PVC != "p" || req.Namespace != "ns") {
		return 0, 0, zmqbridge.Errorf(zmqbridge.CodeNotFound, "volume %s is not staged on this node", req.VolumeID)
	}
	ms := 1.5
	seq, err := f.b.Emit(ctx, zmqbridge.Event{Kind: zmqbridge.KindAck, VolumeID: "v", FlushMs: &ms, Trigger: zmqbridge.TriggerRequest})
	return seq, ms, err
}

func newBridge(t *testing.T, jo zmqbridge.JournalOptions) (string, *zmqbridge.Bridge) {
	dir := t.TempDir()
	return dir, newBridgeIn(t, dir, jo)
}

// newBridgeIn starts a bridge in dir (again, after a Close).
func newBridgeIn(t *testing.T, dir string, jo zmqbridge.JournalOptions) *zmqbridge.Bridge {
	f := &flusher{}
	b, err := zmqbridge.New(zmqbridge.Options{Dir: dir, Node: "n1", Driver: "d", Heartbeat: 100 * time.Millisecond, Journal: jo, Flusher: f})
	if err != nil {
		t.Fatal(err)
	}
	f.b = b
	t.Cleanup(func() { b.Close() })
	return b
}

// emit emits total attach events, 3 ms apart, in namespaces ns (in turn;
// default "ns"), pausing after pauseAt of them until resume is called.
func emit(t *testing.T, b *zmqbridge.Bridge, pauseAt int, ns ...string) (resume func(), done <-chan struct{}) {
	if len(ns) == 0 {
		ns = []string{"ns"}
	}
	ch, finished := make(chan struct{}), make(chan struct{})
	var once sync.Once
	resume = func() { once.Do(func() { close(ch) }) }
	go func() {
		defer close(finished)
		for i := 1; i <= total; i++ {
			if _, err := b.EmitAsync(zmqbridge.Event{Kind: "attach", VolumeID: "v", PVC: "p", Namespace: ns[(i-1)%len(ns)]}); err != nil {
				t.Error(err)
				return
			}
			if i == pauseAt {
				<-ch
			}
			time.Sleep(3 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { resume(); <-finished })
	return resume, finished
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// checkSeqs fails unless seqs is exactly from..to, each once, in order.
func checkSeqs(t *testing.T, seqs []uint64, from uint64) {
	t.Helper()
	if uint64(len(seqs)) != total-from+1 {
		t.Errorf("printed %d events, want %d (seqs %d..%d)", len(seqs), total-from+1, from, total)
	}
	for i, s := range seqs {
		if s != from+uint64(i) {
			t.Fatalf("event #%d has seq %d, want %d (printed: %v)", i, s, from+uint64(i), seqs)
		}
	}
}

func stop(t *testing.T, s *subscriber) {
	t.Helper()
	if err := s.stop(); err != nil {
		t.Fatalf("subscriber failed: %v; stderr:\n%s", err, s.stderr.String())
	}
}

func last(t *testing.T, s *subscriber) uint64 {
	if seqs := s.stdout.seqs(t); len(seqs) > 0 {
		return seqs[len(seqs)-1]
	}
	return 0
}

var starters = map[string]starter{"go": startGo, "python": startPython}

// relay republishes the bridge's messages (heartbeats, and the events pass
// admits) on a PUB socket of its own. With a scope it also serves control
// requests, answering replays with that namespace's events only, the node's
// "last", and "next" (how far it looked), as a namespace-scoped endpoint does. It returns --events
// and --control for a subscriber.
func relay(t *testing.T, dir, scope string, pass func(ev zmqbridge.Event) bool) (args []string) {
	tmp := t.TempDir()
	zctx, _ := zmq.NewContext()
	sub, _ := zctx.NewSocket(zmq.SUB)
	pub, _ := zctx.NewSocket(zmq.PUB)
	router, _ := zctx.NewSocket(zmq.ROUTER)
	req, _ := zctx.NewSocket(zmq.REQ)
	for _, s := range []*zmq.Socket{sub, pub, router, req} {
		s.SetLinger(0)
	}
	sub.SetSubscribe("")
	for _, err := range []error{
		sub.Connect("ipc://" + filepath.Join(dir, "events.sock")), pub.Bind("ipc://" + tmp + "/events.sock"),
		req.Connect("ipc://" + filepath.Join(dir, "control.sock")), router.Bind("ipc://" + tmp + "/control.sock"),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	args = []string{"--events", "ipc://" + tmp + "/events.sock"}
	if scope != "" {
		args = append(args, "--control", "ipc://"+tmp+"/control.sock")
	}
	call := func(r map[string]any) (rep struct {
		Events []json.RawMessage `json:"events"`
		Last   uint64            `json:"last"`
		Next   uint64            `json:"next"`
	}) {
		b, _ := json.Marshal(r)
		req.SendBytes(b, 0)
		b, _ = req.RecvBytes(0)
		json.Unmarshal(b, &rep)
		return
	}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() { // owns the sockets
		defer close(done)
		defer zctx.Term()
		defer func() { sub.Close(); pub.Close(); router.Close(); req.Close() }()
		poller := zmq.NewPoller()
		poller.Add(sub, zmq.POLLIN)
		poller.Add(router, zmq.POLLIN)
		for {
			select {
			case <-stop:
				return
			default:
			}
			ready, _ := poller.Poll(50 * time.Millisecond)
			for _, p := range ready {
				frames, err := p.Socket.RecvMessageBytes(0)
				if err != nil {
					continue
				}
				var ev zmqbridge.Event
				if p.Socket == sub {
					if json.Unmarshal(frames[1], &ev) == nil && (ev.Kind == zmqbridge.KindHeartbeat || pass(ev)) {
						pub.SendMessage(frames)
					}
					continue
				}
				var r map[string]any // a replay: scan to the node's last, keep the scope's events
				json.Unmarshal(frames[2], &r)
				kept, rep := []json.RawMessage{}, call(r)
				for {
					for _, raw := range rep.Events { // ev ends as the page's last event
						if json.Unmarshal(raw, &ev) == nil && ev.Namespace == scope {
							kept = append(kept, raw)
						}
					}
					if len(rep.Events) == 0 || ev.Seq >= rep.Last {
						break
					}
					r["since"] = ev.Seq
					rep = call(r)
				}
				rep.Events, rep.Next = kept, rep.Last // it scanned to the end
				b, _ := json.Marshal(rep)
				router.SendMessage(frames[0], "", b)
			}
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
	return args
}
