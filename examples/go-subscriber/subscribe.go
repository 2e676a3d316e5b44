package main

// The protocol loop of docs/events.md ("Subscribe, then replay"), on plain
// pebbe/zmq4 sockets.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	zmq "github.com/pebbe/zmq4"
)

// head is what the subscriber needs from an event or a heartbeat.
type head struct {
	Seq       uint64 `json:"seq"`
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	PVC       string `json:"pvc"`
	VolumeID  string `json:"volume_id"`
	Epoch     string `json:"epoch"`
}

func (h head) topic() string { // as the bridge builds it (docs/events.md)
	if h.PVC != "" && h.Namespace != "" {
		return h.Kind + "/" + h.Namespace + "/" + h.PVC
	}
	return h.Kind + "/" + h.VolumeID
}

// subscribe prints every event after the last one seen, once and in order,
// until ctx ends. One goroutine (this one) owns both sockets.
func subscribe(ctx context.Context, cfg config, out, log io.Writer) error {
	last, epoch := cfg.Since, ""
	if cfg.State != "" {
		if b, err := os.ReadFile(cfg.State); err == nil {
			// "<seq> <epoch>" (the epoch may be missing)
			f := strings.Fields(string(b))
			if len(f) == 0 {
				return fmt.Errorf("state file %s is empty", cfg.State)
			}
			if last, err = strconv.ParseUint(f[0], 10, 64); err != nil {
				return fmt.Errorf("state file %s: %w", cfg.State, err)
			}
			if len(f) > 1 {
				epoch = f[1]
			}
		} else if !os.IsNotExist(err) {
			return err
		}
	}
	zctx, err := zmq.NewContext()
	if err != nil {
		return err
	}
	defer zctx.Term()
	sub, err := zctx.NewSocket(zmq.SUB)
	if err != nil {
		return err
	}
	defer sub.Close()
	sub.SetLinger(0)
	sub.SetRcvhwm(100000)
	// Gap detection needs every seq, so subscribe to everything and apply
	// --topic here (a prefix subscription would make every skipped event
	// look like a loss).
	sub.SetSubscribe("")
	if err := sub.Connect(cfg.Events); err != nil {
		return err
	}
	r := &requester{zctx: zctx, addr: cfg.Control, timeout: cfg.Timeout, log: log}
	defer r.close()

	// advance records seq as seen, after the event was printed.
	advance := func(seq uint64) error {
		last = seq
		if cfg.State == "" {
			return nil
		}
		return writeState(cfg.State, seq, epoch)
	}
	// newEpoch checks a message's journal epoch: another one than before
	// means the node's journal was made anew, its seqs starting again at 1,
	// so the position is reset to 0 (reset is true).
	newEpoch := func(e string) (reset bool, err error) {
		switch {
		case e == "" || e == epoch:
			return false, nil
		case epoch == "":
			epoch = e
			return false, nil
		}
		fmt.Fprintf(log, "WARNING: the node's event journal was made anew (epoch %s, was %s): "+
			"events of the old one not yet seen are lost; starting again from its first event\n", e, epoch)
		epoch = e
		return true, advance(0)
	}
	deliver := func(raw []byte) error {
		var h head
		if err := json.Unmarshal(raw, &h); err != nil {
			return fmt.Errorf("bad event JSON: %w", err)
		}
		if h.Seq <= last {
			return nil // seen already
		}
		if strings.HasPrefix(h.topic(), cfg.Topic) {
			if _, err := fmt.Fprintf(out, "%s\n", raw); err != nil {
				return err
			}
		}
		return advance(h.Seq)
	}
	// replay pages from last until the node's last sequence.
	replay := func() error {
		for ctx.Err() == nil {
			raw, err := r.request(ctx, map[string]any{"op": "replay", "since": last, "max": 1000})
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				fmt.Fprintf(log, "replay: %v; retrying\n", err)
				time.Sleep(time.Second)
				continue
			}
			var rep struct {
				Events             []json.RawMessage
				Last, First, Next  uint64
				Error, Code, Epoch string
			}
			if err := json.Unmarshal(raw, &rep); err != nil {
				return fmt.Errorf("bad replay reply: %w", err)
			}
			if reset, err := newEpoch(rep.Epoch); err != nil {
				return err
			} else if reset {
				continue // ask the new journal from 0
			}
			switch {
			case rep.Error == "truncated" && rep.First > last+1:
				fmt.Fprintf(log, "WARNING: journal truncated: events %d..%d are gone; continuing from %d\n", last+1, rep.First-1, rep.First)
				if err := advance(rep.First - 1); err != nil {
					return err
				}
				continue
			case rep.Error != "" && retryable(rep.Code): // still busy (or failing) after the requester's retries
				fmt.Fprintf(log, "replay: %s (code %s); retrying\n", rep.Error, rep.Code)
				continue
			case rep.Error != "":
				return fmt.Errorf("replay: %s", rep.Error)
			}
			for _, ev := range rep.Events {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if err := deliver(ev); err != nil {
					return err
				}
			}
			// "next" is how far the node looked: on a scoped endpoint what it
			// skipped belongs to other namespaces; ask again from there.
			before := last
			if rep.Next > last {
				if err := advance(rep.Next); err != nil {
					return err
				}
			}
			if last >= rep.Last || (last == before && len(rep.Events) == 0) {
				return nil
			}
		}
		return ctx.Err()
	}

	time.Sleep(50 * time.Millisecond) // let the subscription reach the publisher
	if err := replay(); err != nil {
		return err
	}
	poller := zmq.NewPoller()
	poller.Add(sub, zmq.POLLIN)
	for ctx.Err() == nil {
		ready, err := poller.Poll(200 * time.Millisecond)
		if err != nil {
			return err
		}
		if len(ready) == 0 {
			continue
		}
		frames, err := sub.RecvMessageBytes(0)
		if err != nil || len(frames) != 2 {
			continue
		}
		var h head
		if json.Unmarshal(frames[1], &h) != nil {
			continue
		}
		reset, err := newEpoch(h.Epoch)
		switch {
		case err != nil:
		case reset:
			err = replay() // the new journal from its start
		case h.Kind == "hb" && strings.HasPrefix(string(frames[0]), "hb/"):
			if h.Seq > last {
				err = replay() // silence was loss
			}
		case h.Seq <= last: // seen already (in a replay)
		case h.Seq == last+1:
			err = deliver(frames[1])
		default: // a gap: loss, or other namespaces' events on a scoped endpoint
			if err = replay(); err == nil {
				err = deliver(frames[1])
			}
		}
		if err != nil {
			return err
		}
	}
	return ctx.Err()
}
