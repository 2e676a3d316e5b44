package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// TestStateRestart stops a subscriber with a state file halfway, emits more
// while it is down and restarts it: together the two runs print each event once.
func TestStateRestart(t *testing.T) {
	for name, start := range starters {
		t.Run(name, func(t *testing.T) {
			dir, b := newBridge(t, zmqbridge.JournalOptions{})
			state := filepath.Join(t.TempDir(), "last-seq")
			resume, done := emit(t, b, 300)
			s1 := start(t, dir, "--state", state)
			waitFor(t, "120 events printed", func() bool { return last(t, s1) >= 120 })
			stop(t, s1)
			resume() // events 301.. are emitted while no subscriber runs
			time.Sleep(100 * time.Millisecond)
			first := s1.stdout.seqs(t)
			if n := len(first); n >= 300 {
				t.Fatalf("first run printed %d events; it should have stopped halfway", n)
			}
			s2 := start(t, dir, "--state", state)
			<-done
			waitFor(t, "the last event to be printed", func() bool { return last(t, s2) >= total })
			time.Sleep(300 * time.Millisecond)
			stop(t, s2)
			checkSeqs(t, append(first, s2.stdout.seqs(t)...), 1)
			if b, err := os.ReadFile(state); err != nil || strings.Fields(string(b))[0] != fmt.Sprint(total) {
				t.Errorf("state file holds %q (%v), want %d", b, err, total)
			}
		})
	}
}

// TestMidStream starts a subscriber after some events were emitted, while
// the rest are being emitted (replay and live messages race), directly and
// through a relay that loses events (gaps and heartbeats trigger replays).
func TestMidStream(t *testing.T) {
	for name, start := range starters {
		for _, lossy := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/lossy=%v", name, lossy), func(t *testing.T) {
				dir, b := newBridge(t, zmqbridge.JournalOptions{})
				var args []string
				if lossy { // every 10th event and the last 5 (only heartbeats reveal those) are lost
					args = relay(t, dir, "", func(ev zmqbridge.Event) bool { return ev.Seq%10 != 0 && ev.Seq <= total-5 })
				}
				resume, _ := emit(t, b, 150)
				waitFor(t, "150 events", func() bool { return b.Last() >= 150 })
				s := start(t, dir, args...)
				resume()
				waitFor(t, "the last event to be printed", func() bool { return last(t, s) >= total })
				time.Sleep(300 * time.Millisecond) // a duplicate would show up now
				stop(t, s)
				checkSeqs(t, s.stdout.seqs(t), 1)
			})
		}
	}
}

// TestTruncated replays from 0 a journal whose oldest segments were dropped:
// the subscriber warns and prints everything from the first retained event.
func TestTruncated(t *testing.T) {
	for name, start := range starters {
		t.Run(name, func(t *testing.T) {
			dir, b := newBridge(t, zmqbridge.JournalOptions{SegmentBytes: 4 << 10, MaxBytes: 16 << 10})
			for i := 0; i < total; i++ {
				if _, err := b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: "v", PVC: "p", Namespace: "ns"}); err != nil {
					t.Fatal(err)
				}
			}
			s := start(t, dir, "--since", "0")
			waitFor(t, "the last event to be printed", func() bool { return last(t, s) >= total })
			stop(t, s)
			seqs := s.stdout.seqs(t)
			if seqs[0] <= 1 || !strings.Contains(s.stderr.String(), "truncated") {
				t.Fatalf("no truncation reported: first seq %d, stderr %q", seqs[0], s.stderr.String())
			}
			checkSeqs(t, seqs, seqs[0])
		})
	}
}

// TestFlush asks for flushes (by volume ID, by PVC) and prints the ack's
// sequence, or the error.
func TestFlush(t *testing.T) {
	dir, b := newBridge(t, zmqbridge.JournalOptions{})
	python := exec.Command("/usr/bin/python3", "-c", "import zmq").Run() == nil
	for _, args := range [][]string{{"--flush-volume", "v"}, {"--flush-pvc", "p", "--flush-namespace", "ns"}, {"--flush-volume", "w"}} {
		cfg, req, err := parseArgs(append([]string{"--dir", dir}, args...))
		if err != nil || req == nil {
			t.Fatalf("parseArgs(%q) = %v, %v", args, req, err)
		}
		var o out
		err = flush(context.Background(), cfg, req, &o, io.Discard)
		want := fmt.Sprintf(`{"seq":%d,"flush_ms":1.5,"epoch":"%s"}`, b.Last(), b.Epoch())
		if args[1] == "w" {
			want = fmt.Sprintf(`{"error":"volume w is not staged on this node","code":"not_found","epoch":"%s"}`, b.Epoch())
			if err == nil {
				t.Errorf("flush %q did not fail", args)
			}
		} else if err != nil {
			t.Errorf("flush %q: %v", args, err)
		}
		if got := strings.TrimSpace(o.String()); got != want {
			t.Errorf("go flush %q printed %q, want %q", args, got, want)
		}
		if !python {
			continue
		}
		before := b.Last()
		py, err := exec.Command("/usr/bin/python3", append([]string{"../python-subscriber/subscriber.py", "--dir", dir}, args...)...).Output()
		if args[1] != "w" {
			want = fmt.Sprintf(`{"seq":%d,"flush_ms":1.5,"epoch":"%s"}`, before+1, b.Epoch())
		}
		if got := strings.TrimSpace(string(py)); got != want || (err == nil) != (args[1] != "w") {
			t.Errorf("python flush %q printed %q (%v), want %q", args, got, err, want)
		}
	}
	if !python {
		t.Skip("/usr/bin/python3 cannot import zmq")
	}
}

// TestTopic prints only the events whose topic has the --topic prefix.
func TestTopic(t *testing.T) {
	for name, start := range starters {
		t.Run(name, func(t *testing.T) {
			dir, b := newBridge(t, zmqbridge.JournalOptions{})
			for i := 1; i <= 20; i++ {
				ns := map[bool]string{true: "a", false: "ab"}[i%2 == 1] // "attach/a/" is not a prefix of "attach/ab/"
				if _, err := b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: "v", PVC: "p", Namespace: ns}); err != nil {
					t.Fatal(err)
				}
			}
			s := start(t, dir, "--topic", "attach/a/")
			waitFor(t, "event 19 to be printed", func() bool { return last(t, s) >= 19 })
			time.Sleep(300 * time.Millisecond)
			stop(t, s)
			if got, want := fmt.Sprint(s.stdout.seqs(t)), "[1 3 5 7 9 11 13 15 17 19]"; got != want {
				t.Errorf("printed seqs %s, want %s", got, want)
			}
		})
	}
}

// TestScoped subscribes to a namespace-scoped endpoint: sequence numbers
// skip the other namespace's events, and the state file ends at the node's last.
func TestScoped(t *testing.T) {
	for name, start := range starters {
		t.Run(name, func(t *testing.T) {
			dir, b := newBridge(t, zmqbridge.JournalOptions{})
			args := relay(t, dir, "a", func(ev zmqbridge.Event) bool { return ev.Namespace == "a" })
			state := filepath.Join(t.TempDir(), "last-seq")
			resume, done := emit(t, b, 150, "a", "other")
			waitFor(t, "150 events", func() bool { return b.Last() >= 150 })
			s := start(t, dir, append(args, "--state", state)...)
			resume()
			<-done
			waitFor(t, "the state file to reach the last event", func() bool {
				b, _ := os.ReadFile(state)
				f := strings.Fields(string(b))
				return len(f) > 0 && f[0] == fmt.Sprint(total)
			})
			stop(t, s)
			var want []uint64
			for seq := uint64(1); seq < total; seq += 2 {
				want = append(want, seq)
			}
			if got := s.stdout.seqs(t); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("printed seqs %v, want the odd ones 1..%d", got, total-1)
			}
		})
	}
}

// TestTopicVolumeID: events of volumes without a PVC have the topic
// <kind>/<volume_id>; --topic selects by it.
func TestTopicVolumeID(t *testing.T) {
	for name, start := range starters {
		t.Run(name, func(t *testing.T) {
			dir, b := newBridge(t, zmqbridge.JournalOptions{})
			for i := 1; i <= 10; i++ {
				vol := map[bool]string{true: "vol-x", false: "vol-y"}[i%3 == 0]
				if _, err := b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: vol}); err != nil {
					t.Fatal(err)
				}
			}
			s := start(t, dir, "--topic", "attach/vol-x")
			waitFor(t, "event 9 to be printed", func() bool { return last(t, s) >= 9 })
			time.Sleep(300 * time.Millisecond)
			stop(t, s)
			if got, want := fmt.Sprint(s.stdout.seqs(t)), "[3 6 9]"; got != want {
				t.Errorf("printed seqs %s, want %s", got, want)
			}
		})
	}
}

// TestEpochChange: the node's journal is lost and made anew (seqs start again
// at 1, with another epoch). A subscriber resuming from its state file warns
// and prints the new journal's events instead of taking them for seen ones.
func TestEpochChange(t *testing.T) {
	for name, start := range starters {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			b := newBridgeIn(t, dir, zmqbridge.JournalOptions{})
			state := filepath.Join(t.TempDir(), "last-seq")
			for i := 0; i < 5; i++ {
				b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: "v"})
			}
			s := start(t, dir, "--state", state)
			waitFor(t, "5 events", func() bool { return last(t, s) >= 5 })
			stop(t, s)
			b.Close()
			if err := os.RemoveAll(filepath.Join(dir, "journal")); err != nil {
				t.Fatal(err)
			}
			b = newBridgeIn(t, dir, zmqbridge.JournalOptions{})
			for i := 0; i < 3; i++ {
				b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: "v"})
			}
			s = start(t, dir, "--state", state)
			waitFor(t, "the new journal's 3 events", func() bool { return len(s.stdout.seqs(t)) >= 3 })
			b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: "v"})
			waitFor(t, "a live event", func() bool { return last(t, s) >= 4 })
			time.Sleep(300 * time.Millisecond)
			stop(t, s)
			if got := fmt.Sprint(s.stdout.seqs(t)); got != "[1 2 3 4]" {
				t.Errorf("printed %s after the new journal, want [1 2 3 4]; stderr %q", got, s.stderr.String())
			}
			if !strings.Contains(s.stderr.String(), "WARNING") {
				t.Errorf("no warning about the new journal: %q", s.stderr.String())
			}
			if st, _ := os.ReadFile(state); !strings.Contains(string(st), b.Epoch()) {
				t.Errorf("state file %q lacks the new epoch %s", st, b.Epoch())
			}
		})
	}
}

// gatedFlusher holds a flush of volume "slow" until gate is closed; other
// volumes are flushed as flusher does.
type gatedFlusher struct {
	flusher
	gate chan struct{}
}

func (f *gatedFlusher) Flush(ctx context.Context, req zmqbridge.FlushRequest) (uint64, float64, error) {
	if req.VolumeID == "slow" {
		<-f.gate
		return 0, 0, zmqbridge.Errorf(zmqbridge.CodeNotFound, "volume slow is not staged on this node")
	}
	return f.flusher.Flush(ctx, req)
}

// busyBridge starts a bridge whose control endpoint answers busy: its one
// worker holds a flush until release is called, and a replay fills its
// queue of one. It returns the bridge's directory.
func busyBridge(t *testing.T) (dir string, b *zmqbridge.Bridge, release func()) {
	dir = t.TempDir()
	f := &gatedFlusher{gate: make(chan struct{})}
	b, err := zmqbridge.New(zmqbridge.Options{Dir: dir, Node: "n1", Driver: "d", Heartbeat: 100 * time.Millisecond,
		Flusher: f, Workers: 1, Queue: 1})
	if err != nil {
		t.Fatal(err)
	}
	f.b = b
	release = sync.OnceFunc(func() { close(f.gate) })
	t.Cleanup(func() { release(); b.Close() })
	zctx, _ := zmq.NewContext()
	var socks []*zmq.Socket
	t.Cleanup(func() {
		for _, s := range socks {
			s.Close()
		}
		zctx.Term()
	})
	dealer := func() *zmq.Socket {
		s, _ := zctx.NewSocket(zmq.DEALER)
		s.SetLinger(0)
		s.SetRcvtimeo(5 * time.Second)
		if err := s.Connect("ipc://" + filepath.Join(dir, "control.sock")); err != nil {
			t.Fatal(err)
		}
		socks = append(socks, s)
		return s
	}
	dealer().SendMessage("", `{"op":"flush","volume_id":"slow"}`)
	time.Sleep(200 * time.Millisecond) // on the worker
	dealer().SendMessage("", `{"op":"replay"}`)
	time.Sleep(200 * time.Millisecond) // queued
	probe := dealer()
	probe.SendMessage("", `{"op":"replay"}`)
	if rep, err := probe.RecvMessage(0); err != nil || !strings.Contains(rep[len(rep)-1], `"code":"busy"`) {
		t.Fatalf("the endpoint is not busy: %q, %v", rep, err)
	}
	return dir, b, release
}

// TestBusyRetried: on a real endpoint that answers busy, the subscriber's
// replay and a flush request are retried with backoff (each retry reported
// on stderr) and succeed once the endpoint has room again.
func TestBusyRetried(t *testing.T) {
	for name, start := range starters {
		t.Run(name+"/subscribe", func(t *testing.T) {
			dir, b, release := busyBridge(t)
			for i := 0; i < 5; i++ {
				if _, err := b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: "v", PVC: "p", Namespace: "ns"}); err != nil {
					t.Fatal(err)
				}
			}
			s := start(t, dir)
			time.Sleep(time.Second) // busy replies meanwhile
			release()
			waitFor(t, "the 5 events to be printed", func() bool { return last(t, s) >= 5 })
			stop(t, s)
			if got := fmt.Sprint(s.stdout.seqs(t)); got != "[1 2 3 4 5]" {
				t.Errorf("printed %s, want [1 2 3 4 5]", got)
			}
			if !strings.Contains(s.stderr.String(), "code busy") {
				t.Errorf("no busy reply reported: %q", s.stderr.String())
			}
		})
		t.Run(name+"/flush", func(t *testing.T) {
			if name == "python" && exec.Command("/usr/bin/python3", "-c", "import zmq").Run() != nil {
				t.Skip("/usr/bin/python3 cannot import zmq")
			}
			dir, b, release := busyBridge(t)
			var stdout, stderr out
			done := make(chan error, 1)
			if name == "go" {
				cfg, req, err := parseArgs([]string{"--dir", dir, "--timeout", "10", "--flush-volume", "v"})
				if err != nil {
					t.Fatal(err)
				}
				go func() { done <- flush(context.Background(), cfg, req, &stdout, &stderr) }()
			} else {
				cmd := exec.Command("/usr/bin/python3", "../python-subscriber/subscriber.py", "--dir", dir, "--timeout", "10", "--flush-volume", "v")
				cmd.Stdout, cmd.Stderr = &stdout, &stderr
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				go func() { done <- cmd.Wait() }()
			}
			time.Sleep(time.Second) // busy replies meanwhile
			release()
			if err := <-done; err != nil {
				t.Fatalf("flush: %v; stdout %q, stderr %q", err, stdout.String(), stderr.String())
			}
			want := fmt.Sprintf(`{"seq":%d,"flush_ms":1.5,"epoch":"%s"}`, b.Last(), b.Epoch())
			if got := strings.TrimSpace(stdout.String()); got != want {
				t.Errorf("flush printed %q, want %q", got, want)
			}
			if !strings.Contains(stderr.String(), "code busy") {
				t.Errorf("no busy reply reported: %q", stderr.String())
			}
		})
	}
}
