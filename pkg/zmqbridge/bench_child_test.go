package zmqbridge

// The subscriber side of BenchmarkBridgeVsRaw runs in a process of its own,
// as it does in production (subscribers are other pods): the benchmark
// re-executes this test binary with only TestBenchSubscriberChild selected
// and the run's parameters in $ZMQBRIDGE_BENCH_SUBSCRIBER.
//
// Protocol over the child's file descriptor 3 (a pipe to the parent):
//  1. one byte, benchReady, once the child is subscribed (raw: SUB connected,
//     the parent then waits for the subscription on its XPUB; bridge: the
//     first message, a heartbeat, arrived);
//  2. the run's subResult as JSON, after the last message; then EOF.
//
// Arrival times are wall-clock UnixNano: CLOCK_REALTIME is shared by the
// processes of one machine, and the parent records its send times likewise.
//
// GOMAXPROCS is not set in the child: it gets the default (one per CPU), as
// any subscriber process would, or whatever $GOMAXPROCS the benchmark was run
// with (the child inherits the environment). Its goroutine blocked in cgo
// zmq_recv holds a P, but nothing else in the child needs one, and the point of
// the separate process is that this no longer stalls the bridge's goroutines.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
)

const (
	benchChildEnv = "ZMQBRIDGE_BENCH_SUBSCRIBER" // carries subParams as JSON
	benchReady    = 'R'
)

// subParams tell the child what to subscribe to and how many messages to wait for.
type subParams struct {
	Mode    string // "raw" (plain PUB/SUB) or "bridge" (lossless, with replay)
	Events  string // SUB endpoint
	Control string // bridge: the control endpoint for Client.Replay
	N       int    // messages (raw: seq 1..N) or events (bridge: seq Base+1..Base+N)
	Base    uint64 // bridge: the journal's last sequence before the run
}

// subResult is what the child measured: RecvAt[i] is the UnixNano arrival
// time of message i+1 of the run (live or replayed).
type subResult struct {
	RecvAt               []int64
	Live, Replayed, Dups int // bridge: how events arrived
	Replays              int // bridge: replay requests made
}

// TestBenchSubscriberChild is the subscriber process of BenchmarkBridgeVsRaw;
// it does nothing in a normal test run.
func TestBenchSubscriberChild(t *testing.T) {
	env := os.Getenv(benchChildEnv)
	if env == "" {
		t.Skip("runs only as the subscriber process of BenchmarkBridgeVsRaw")
	}
	var p subParams
	if err := json.Unmarshal([]byte(env), &p); err != nil {
		t.Fatalf("%s: %v", benchChildEnv, err)
	}
	out := os.NewFile(3, "results") // writes fail (EBADF) unless the parent passed it
	defer out.Close()
	ready := func() error { _, err := out.Write([]byte{benchReady}); return err }
	res := &subResult{RecvAt: make([]int64, p.N)}
	var err error
	switch p.Mode {
	case "raw":
		err = followRaw(p, res, ready)
	case "bridge":
		err = followBridge(p, res, ready)
	default:
		err = fmt.Errorf("unknown mode %q", p.Mode)
	}
	if err == nil {
		err = json.NewEncoder(out).Encode(res)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// followRaw receives seq 1..n, in order and without loss (the parent's XPUB
// blocks rather than drop), recording each arrival.
func followRaw(p subParams, res *subResult, ready func() error) error {
	sub, closeSUB, err := dialSUB(p.Events, benchWait)
	if err != nil {
		return err
	}
	defer closeSUB()
	if err := ready(); err != nil {
		return err
	}
	for got := 0; got < p.N; got++ {
		_, msg, err := recv2(sub)
		now := time.Now().UnixNano()
		if err == nil && jsonUint(msg, "seq") != uint64(got+1) {
			err = fmt.Errorf("seq %d arrived, want %d", jsonUint(msg, "seq"), got+1)
		}
		if err != nil {
			return fmt.Errorf("raw SUB: %d of %d received (loss): %w", got, p.N, err)
		}
		res.RecvAt[got] = now
	}
	return nil
}

// followBridge is the lossless subscriber (docs/events.md): live events in
// order; on a gap, or a heartbeat ahead of what it has, replay what is
// missing. It owns its SUB socket and Client, and records arrival times.
func followBridge(p subParams, res *subResult, ready func() error) error {
	sub, closeSUB, err := dialSUB(p.Events, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer closeSUB()
	cl, err := Dial(p.Events, p.Control)
	if err != nil {
		return err
	}
	defer cl.Close()
	cl.Timeout = 5 * time.Second

	base := p.Base
	last, target := base, base+uint64(p.N)
	record := func(seq uint64, count *int) {
		res.RecvAt[seq-base-1], last = time.Now().UnixNano(), seq
		*count++
	}
	catchUp := func(upTo uint64) error { // replay (last, upTo], in order
		for last < upTo {
			evs, _, err := cl.Replay(last, MaxReplay)
			res.Replays++
			if err != nil {
				return fmt.Errorf("replay after %d: %w", last, err)
			}
			before := last
			for _, raw := range evs {
				if s := jsonUint(raw, "seq"); s == last+1 && s <= target {
					record(s, &res.Replayed)
				}
			}
			if last == before {
				return fmt.Errorf("replay after %d made no progress (want %d)", last, upTo)
			}
		}
		return nil
	}

	deadline := time.Now().Add(benchWait)
	for last < target {
		topic, msg, err := recv2(sub)
		if err != nil {
			if zmq.AsErrno(err) == zmq.Errno(syscall.EAGAIN) && time.Now().Before(deadline) {
				continue
			}
			return fmt.Errorf("bridge SUB: %d of %d events: %w", last-base, p.N, err)
		}
		if ready != nil { // the first message (a heartbeat) proves the subscription is live
			if err := ready(); err != nil {
				return err
			}
			ready = nil
		}
		seq := jsonUint(msg, "seq")
		switch {
		case bytes.HasPrefix(topic, []byte(KindHeartbeat+"/")):
			if seq > last { // published but never arrived: dropped
				err = catchUp(min(seq, target))
			}
		case seq <= last:
			res.Dups++
		case seq == last+1:
			record(seq, &res.Live)
		default: // a gap: fetch the missing ones, then this one
			if err = catchUp(seq - 1); err == nil {
				record(seq, &res.Live)
			}
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// jsonUint reads the unsigned number after "key": (no full JSON decode).
func jsonUint(b []byte, key string) uint64 {
	i := bytes.Index(b, []byte(`"`+key+`":`))
	if i < 0 {
		return 0
	}
	var n uint64
	for _, c := range b[i+len(key)+3:] {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + uint64(c-'0')
	}
	return n
}

// dialSUB connects a SUB socket (subscribed to everything) in a ZeroMQ context
// of its own, for the calling goroutine; done closes both.
func dialSUB(addr string, timeout time.Duration) (sub *zmq.Socket, done func(), err error) {
	zctx, err := zmq.NewContext()
	if err != nil {
		return nil, nil, err
	}
	if sub, err = zctx.NewSocket(zmq.SUB); err == nil {
		sub.SetLinger(0)
		sub.SetRcvhwm(100000)
		sub.SetRcvtimeo(timeout)
		sub.SetSubscribe("")
		if err = sub.Connect(addr); err != nil {
			sub.Close()
		}
	}
	if err != nil {
		zctx.Term()
		return nil, nil, err
	}
	return sub, func() { sub.Close(); zctx.Term() }, nil
}

// recv2 receives one two-frame message [topic, json].
func recv2(s *zmq.Socket) (topic, msg []byte, err error) {
	if topic, err = s.RecvBytes(0); err == nil {
		msg, err = s.RecvBytes(0)
	}
	return topic, msg, err
}

// subProc is a running subscriber process, seen from the benchmark.
type subProc struct {
	cmd    *exec.Cmd
	r      *os.File     // the read end of the child's fd 3
	out    bytes.Buffer // the child's stdout and stderr, for error messages
	reaped bool
}

// startSubscriber starts the subscriber process for p. The caller must call
// stop (it is idempotent), so the child is never left running or unreaped.
func startSubscriber(p subParams) (*subProc, error) {
	env, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	// -test.timeout is a last resort should the child outlive its own deadlines.
	s := &subProc{r: r, cmd: exec.Command(os.Args[0], "-test.run=^TestBenchSubscriberChild$", "-test.count=1",
		"-test.timeout="+(benchLatTime+3*benchWait).String())}
	s.cmd.Env = append(os.Environ(), benchChildEnv+"="+string(env))
	s.cmd.ExtraFiles = []*os.File{w} // fd 3 in the child
	s.cmd.Stdout, s.cmd.Stderr = &s.out, &s.out
	s.cmd.WaitDelay = time.Second // Wait returns soon after a kill
	// Killed with the benchmark, however that ends (a -test.timeout panic
	// runs no deferred stop). The benchmark locks no OS threads, so the
	// thread that started the child lives as long as the process.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = s.cmd.Start()
	w.Close() // the child holds the write end now: EOF once it exits
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("starting the subscriber process: %w", err)
	}
	return s, nil
}

// stop kills the child unless it was reaped already, and reaps it.
func (s *subProc) stop() {
	if !s.reaped {
		s.cmd.Process.Kill()
		s.reap()
	}
}

// reap waits for the child to exit and closes the results pipe.
func (s *subProc) reap() error {
	s.reaped = true
	defer s.r.Close()
	return s.cmd.Wait()
}

// fail stops the child and adds what it printed to err.
func (s *subProc) fail(err error) error {
	s.stop()
	if out := bytes.TrimSpace(s.out.Bytes()); len(out) > 0 {
		err = fmt.Errorf("%w\nsubscriber process output:\n%s", err, out)
	}
	return err
}

// ready waits (at most timeout) for the child's readiness byte.
func (s *subProc) ready(timeout time.Duration) error {
	s.r.SetReadDeadline(time.Now().Add(timeout))
	var b [1]byte
	_, err := s.r.Read(b[:])
	if err == nil && b[0] != benchReady {
		err = fmt.Errorf("unexpected byte %q", b[0])
	}
	if err != nil {
		return s.fail(fmt.Errorf("subscriber process never got ready: %w", err))
	}
	return nil
}

// result waits (at most timeout) for the child's results and reaps it.
func (s *subProc) result(timeout time.Duration) (*subResult, error) {
	s.r.SetReadDeadline(time.Now().Add(timeout))
	b, err := io.ReadAll(s.r) // EOF: the child closed fd 3, on its way out
	if err != nil {
		return nil, s.fail(fmt.Errorf("no results from the subscriber process: %w", err))
	}
	kill := time.AfterFunc(5*time.Second, func() { s.cmd.Process.Kill() }) // should it hang
	err = s.reap()
	kill.Stop()
	var res subResult
	if err == nil {
		err = json.Unmarshal(b, &res)
	}
	if err != nil {
		return nil, s.fail(fmt.Errorf("subscriber process: %w", err))
	}
	return &res, nil
}
