package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	zmq "github.com/pebbe/zmq4"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

const eventsUsage = `usage: rookzmq events [--dir DIR | --events ADDR --control ADDR] COMMAND [flags]

commands:
  subscribe [--kind K] [--namespace NS] [--pvc NAME] [--since N|now] [--strict] [-o json]
            every matching event after N (now: from the node's last event on),
            exactly once, in order (subscribe, then replay). Events the journal
            no longer holds, or a journal made anew (another epoch), are warned
            about on stderr and skipped; --strict fails instead.
  replay    [--since N] [--max M] [-o json]
  flush     --volume-id ID | --pvc NAME --namespace NS
  keygen    print a new CURVE keypair (Z85) for the TCP endpoint

For the TCP endpoint: --events tcp://HOST:PORT --control tcp://HOST:PORT+1
  --server-key KEY (the server's public key) --key-file FILE (this client's secret key)
`

// runEvents is the node event client: subscribe, replay, flush.
func runEvents(args []string) int {
	fs := flag.NewFlagSet("rookzmq events", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(os.Stderr, eventsUsage) }
	dir := fs.String("dir", "/var/lib/kubelet/plugins/rbd.rookzmq.io/events", "directory holding events.sock and control.sock")
	eventsAddr := fs.String("events", "", "PUB address (default ipc://DIR/events.sock)")
	controlAddr := fs.String("control", "", "control address (default ipc://DIR/control.sock)")
	serverKey := fs.String("server-key", "", "TCP endpoint: the server's Z85 public key")
	keyFile := fs.String("key-file", "", "TCP endpoint: file holding this client's Z85 secret key")
	if err := fs.Parse(args); errors.Is(err, flag.ErrHelp) {
		return 0
	} else if err != nil || fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	if fs.Arg(0) == "keygen" {
		pub, sec, err := zmq.NewCurveKeypair()
		if err != nil {
			fmt.Fprintln(os.Stderr, "events:", err)
			return 1
		}
		fmt.Printf("public: %s\nsecret: %s\n", pub, sec)
		return 0
	}
	if *eventsAddr == "" {
		*eventsAddr = "ipc://" + filepath.Join(*dir, "events.sock")
	}
	if *controlAddr == "" {
		*controlAddr = "ipc://" + filepath.Join(*dir, "control.sock")
	}
	c, err := zmqbridge.Dial(*eventsAddr, *controlAddr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "events:", err)
		return 1
	}
	defer c.Close()
	if *keyFile != "" {
		b, err := os.ReadFile(*keyFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "events:", err)
			return 1
		}
		sec := strings.TrimSpace(string(b))
		pub, err := zmq.AuthCurvePublic(sec)
		if err != nil || *serverKey == "" {
			fmt.Fprintln(os.Stderr, "events: --key-file needs a Z85 secret key and --server-key")
			return 2
		}
		c.Curve = &zmqbridge.ClientKeys{ServerPublic: *serverKey, Public: pub, Secret: sec}
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	sub := flag.NewFlagSet("rookzmq events "+cmd, flag.ContinueOnError)
	var since sinceFlag
	sub.Var(&since, "since", "deliver events after this sequence number (subscribe: or now)")
	output := sub.String("o", "text", "output: text or json")
	switch cmd {
	case "subscribe":
		kind := sub.String("kind", "", "event kind (attach, publish, unpublish, expand, ack, detach)")
		ns := sub.String("namespace", "", "PVC namespace")
		pvc := sub.String("pvc", "", "PVC name (with --namespace)")
		strict := sub.Bool("strict", false, "fail when events are gone (truncated journal, or a journal made anew) instead of warning")
		if code, ok := parsed(sub.Parse(rest)); !ok {
			return code
		}
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		defer stop()
		from := since.n
		if since.now {
			if from, c.Epoch, err = c.Last(); err != nil {
				fmt.Fprintln(os.Stderr, "events:", err)
				return 1
			}
		}
		if !*strict {
			c.OnTruncated = func(e zmqbridge.ErrTruncatedReplay) error {
				fmt.Fprintf(os.Stderr, "WARNING: the node's journal no longer holds the events before %d (retention): skipping to it\n", e.First)
				return nil
			}
			c.OnEpochChange = func(e zmqbridge.ErrEpochChanged) error {
				fmt.Fprintf(os.Stderr, "WARNING: %v; the old journal's events not yet seen are lost; starting again from its first event\n", e)
				return nil
			}
		}
		err = c.Subscribe(ctx, nil, from, func(ev zmqbridge.Event, raw []byte) error {
			if (*kind == "" || ev.Kind == *kind) && (*ns == "" || ev.Namespace == *ns) && (*pvc == "" || ev.PVC == *pvc) {
				printEvent(*output, ev, raw)
			}
			return nil
		})
		if ctx.Err() != nil {
			err = nil
		}
	case "replay":
		max := sub.Int("max", zmqbridge.MaxReplay, "at most this many events")
		if code, ok := parsed(sub.Parse(rest)); !ok {
			return code
		}
		var events []json.RawMessage
		var last uint64
		if since.now {
			fmt.Fprintln(os.Stderr, "events: replay --since takes a number")
			return 2
		}
		events, last, err = c.Replay(since.n, *max)
		for _, raw := range events {
			var ev zmqbridge.Event
			json.Unmarshal(raw, &ev)
			printEvent(*output, ev, raw)
		}
		if err == nil && *output != "json" {
			fmt.Printf("(%d events; last sequence on the node: %d)\n", len(events), last)
		}
	case "flush":
		id := sub.String("volume-id", "", "volume ID")
		pvc := sub.String("pvc", "", "PVC name")
		ns := sub.String("namespace", "", "PVC namespace")
		if code, ok := parsed(sub.Parse(rest)); !ok {
			return code
		}
		var seq uint64
		var ms float64
		if seq, ms, err = c.Flush(*id, *pvc, *ns); err == nil {
			if *output == "json" {
				fmt.Printf("{\"seq\":%d,\"flush_ms\":%g}\n", seq, ms)
			} else {
				fmt.Printf("flushed in %.3f ms; ack event seq %d\n", ms, seq)
			}
		}
	default:
		fs.Usage()
		return 2
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "events:", err)
		return 1
	}
	return 0
}

// parsed says whether flags parsed, and if not the exit status: 0 for
// --help (the usage was printed), 2 for an error.
func parsed(err error) (int, bool) {
	switch {
	case err == nil:
		return 0, true
	case errors.Is(err, flag.ErrHelp):
		return 0, false
	}
	return 2, false
}

// sinceFlag is --since: a sequence number, or "now".
type sinceFlag struct {
	n   uint64
	now bool
}

func (f *sinceFlag) String() string {
	if f.now {
		return "now"
	}
	return strconv.FormatUint(f.n, 10)
}

func (f *sinceFlag) Set(s string) error {
	if s == "now" {
		f.now = true
		return nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return errors.New(`want a sequence number or "now"`)
	}
	f.n, f.now = n, false
	return nil
}

func printEvent(output string, ev zmqbridge.Event, raw []byte) {
	if output == "json" {
		fmt.Println(string(raw))
		return
	}
	who := ev.VolumeID
	if ev.PVC != "" {
		who = ev.Namespace + "/" + ev.PVC
	}
	var extra []string
	if ev.Pod != "" {
		extra = append(extra, "pod="+ev.PodNamespace+"/"+ev.Pod)
	}
	if ev.FlushMs != nil {
		extra = append(extra, fmt.Sprintf("flush=%.3fms trigger=%s", *ev.FlushMs, ev.Trigger))
	}
	if ev.SizeBytes != 0 {
		extra = append(extra, fmt.Sprintf("size=%d", ev.SizeBytes))
	}
	fmt.Printf("%6d %s %-9s %s %s\n", ev.Seq, ev.Time, ev.Kind, who, strings.Join(extra, " "))
}
