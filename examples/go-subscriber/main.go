// Command go-subscriber receives every rookzmq node event exactly once, in
// order, using plain github.com/pebbe/zmq4 (no rookzmq client library), as
// described in docs/events.md: subscribe first, then replay from the last
// sequence seen, then de-duplicate live messages by seq (subscribe.go).
//
//	go-subscriber --dir /events --state /var/lib/agent/events.seq
//	go-subscriber --dir /events --flush-pvc data --flush-namespace team-a
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	zmq "github.com/pebbe/zmq4"
)

type config struct {
	Events, Control string // ZeroMQ addresses
	Topic           string // print only events whose topic starts with this
	Since           uint64 // first run: print events with seq > Since
	State           string // file holding the last seq seen ("" = none)
	Timeout         time.Duration
}

func main() {
	cfg, flushReq, err := parseArgs(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return
	} else if err != nil {
		os.Exit(2) // the flag package printed why
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if flushReq != nil {
		err = flush(ctx, cfg, flushReq, os.Stdout, os.Stderr)
	} else {
		err = subscribe(ctx, cfg, os.Stdout, os.Stderr)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "go-subscriber:", err)
		os.Exit(1)
	}
}

// parseArgs reads the flags; flushReq is nil unless a flush was asked for.
func parseArgs(args []string) (cfg config, flushReq map[string]any, err error) {
	fs := flag.NewFlagSet("go-subscriber", flag.ContinueOnError)
	dir := fs.String("dir", "/var/lib/kubelet/plugins/rbd.rookzmq.io/events", "directory holding events.sock and control.sock")
	fs.StringVar(&cfg.Events, "events", "", "events (PUB) address (default ipc://DIR/events.sock)")
	fs.StringVar(&cfg.Control, "control", "", "control (ROUTER) address (default ipc://DIR/control.sock)")
	fs.StringVar(&cfg.Topic, "topic", "", "topic prefix to print, e.g. attach/ or publish/team-a/ (default all)")
	fs.Uint64Var(&cfg.Since, "since", 0, "print events with seq greater than this (ignored when --state holds a value)")
	fs.StringVar(&cfg.State, "state", "", "file persisting the last seq seen, to resume exactly after a restart")
	timeout := fs.Float64("timeout", 120, "seconds to wait for a control reply")
	vol := fs.String("flush-volume", "", "flush this volume ID, print the reply and exit")
	pvc := fs.String("flush-pvc", "", "flush this PVC (with --flush-namespace), print the reply and exit")
	ns := fs.String("flush-namespace", "", "namespace of --flush-pvc")
	if err = fs.Parse(args); err != nil {
		return
	}
	if cfg.Events == "" {
		cfg.Events = "ipc://" + filepath.Join(*dir, "events.sock")
	}
	if cfg.Control == "" {
		cfg.Control = "ipc://" + filepath.Join(*dir, "control.sock")
	}
	cfg.Timeout = time.Duration(*timeout * float64(time.Second))
	if *vol != "" {
		flushReq = map[string]any{"op": "flush", "volume_id": *vol}
	} else if *pvc != "" {
		flushReq = map[string]any{"op": "flush", "pvc": *pvc, "namespace": *ns}
	}
	return
}

// requester sends control requests on a REQ socket. A REQ socket that got no
// reply cannot send again, so on a timeout it is replaced (the Guide's "lazy
// pirate").
type requester struct {
	zctx    *zmq.Context
	addr    string
	timeout time.Duration
	log     io.Writer // where retries are reported
	req     *zmq.Socket
}

// retryable reports whether an error reply's code says "try again later"
// (docs/events.md, "Error replies"): busy, aborted, unavailable, internal,
// and codes this client does not know, which count as internal.
func retryable(code string) bool {
	switch code {
	case "", "bad_request", "unauthorized", "not_found", "unsupported", "truncated":
		return false
	}
	return true
}

// request sends req and returns the reply's raw JSON, sending it again
// after an error reply that asks for a retry (busy, aborted, unavailable,
// internal), with exponential backoff, until timeout has passed since the
// first try; then the last reply stands.
func (r *requester) request(ctx context.Context, req any) ([]byte, error) {
	deadline := time.Now().Add(r.timeout)
	pause := 100 * time.Millisecond
	for {
		raw, err := r.call(ctx, req)
		if err != nil {
			return nil, err
		}
		var e struct{ Error, Code string }
		if json.Unmarshal(raw, &e) != nil || e.Error == "" || !retryable(e.Code) {
			return raw, nil
		}
		wait := pause/2 + time.Duration(rand.Int63n(int64(pause))) // jittered: clients told busy together do not come back together
		if time.Now().Add(wait).After(deadline) {
			return raw, nil
		}
		fmt.Fprintf(r.log, "%s (code %s); retrying in %s\n", e.Error, e.Code, wait.Round(time.Millisecond))
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		pause = min(2*pause, 5*time.Second)
	}
}

// call sends req and returns the reply's raw JSON.
func (r *requester) call(ctx context.Context, req any) ([]byte, error) {
	if r.req == nil {
		s, err := r.zctx.NewSocket(zmq.REQ)
		if err != nil {
			return nil, err
		}
		s.SetLinger(0)
		if err := s.Connect(r.addr); err != nil {
			s.Close()
			return nil, err
		}
		r.req = s
	}
	b, _ := json.Marshal(req)
	if _, err := r.req.SendBytes(b, 0); err != nil {
		return nil, err
	}
	poller := zmq.NewPoller()
	poller.Add(r.req, zmq.POLLIN)
	for deadline := time.Now().Add(r.timeout); time.Now().Before(deadline) && ctx.Err() == nil; {
		ready, err := poller.Poll(200 * time.Millisecond)
		if err != nil {
			break
		}
		if len(ready) > 0 {
			return r.req.RecvBytes(0)
		}
	}
	r.close()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return nil, fmt.Errorf("no reply from %s within %s", r.addr, r.timeout)
}

func (r *requester) close() {
	if r.req != nil {
		r.req.Close()
		r.req = nil
	}
}

// flush sends one flush request (again while the reply asks for a retry,
// within the timeout) and prints the reply ({"seq":S,"flush_ms":F}: S is the
// sequence of the "ack" event, published once Ceph has the data).
func flush(ctx context.Context, cfg config, req map[string]any, out, log io.Writer) error {
	zctx, err := zmq.NewContext()
	if err != nil {
		return err
	}
	defer zctx.Term()
	r := &requester{zctx: zctx, addr: cfg.Control, timeout: cfg.Timeout, log: log}
	defer r.close()
	reply, err := r.request(ctx, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "%s\n", reply)
	var e struct{ Error string }
	if json.Unmarshal(reply, &e) == nil && e.Error != "" {
		return errors.New(e.Error)
	}
	return nil
}

// writeState replaces the state file ("<seq> <epoch>") atomically:
// temporary file, fsync, rename.
func writeState(path string, seq uint64, epoch string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strings.TrimSpace(strconv.FormatUint(seq, 10)+" "+epoch)+"\n"), 0o644); err != nil {
		return err
	}
	f, err := os.Open(tmp)
	if err == nil {
		err = f.Sync()
		f.Close()
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	return err
}
