package zmqbridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	zmq "github.com/pebbe/zmq4"
)

// Client talks to a bridge endpoint: replay and flush over the control
// socket, and a lossless subscription (subscribe, then replay, de-duplicate
// by seq: the ZeroMQ Guide's Clone pattern). A Client is not safe for
// concurrent use; it owns its sockets.
type Client struct {
	events, control string
	zctx            *zmq.Context
	req             *zmq.Socket
	// Timeout bounds each control request (default 2 minutes: flushes can be slow).
	Timeout time.Duration
	// Curve, for the TCP endpoint: the server's public key and this client's keypair.
	Curve *ClientKeys
	// OnTruncated, if set, is called by Subscribe when the journal no longer
	// holds events it has not delivered: returning nil continues from e.First
	// (the events before it are lost), an error ends Subscribe with it.
	// Unset, Subscribe returns the ErrTruncatedReplay.
	OnTruncated func(e ErrTruncatedReplay) error
	// OnEpochChange, if set, is called by Subscribe when the node's journal
	// epoch differs from the one seen before (the journal was lost and made
	// anew: its sequence numbers start again at 1): returning nil delivers
	// the new journal's events from the start, an error ends Subscribe.
	// Unset, Subscribe returns an ErrEpochChanged.
	OnEpochChange func(e ErrEpochChanged) error
	// Epoch is the journal epoch Subscribe last saw ("" before any); set it
	// before Subscribe to resume from a sequence of a known epoch.
	Epoch string
}

// ErrEpochChanged says the node's journal was created anew: sequence numbers
// of the old one mean nothing in the new one.
type ErrEpochChanged struct{ Old, New string }

func (e ErrEpochChanged) Error() string {
	return fmt.Sprintf("the node's event journal was created anew (epoch %s, was %s): its sequence numbers start again", e.New, e.Old)
}

// ReplyError is an error reply of the node (docs/events.md lists the codes).
type ReplyError struct{ Code, Message string }

func (e *ReplyError) Error() string { return e.Message + " (" + e.Code + ")" }

// ClientKeys are the Z85 CURVE keys a client of the TCP endpoint uses.
type ClientKeys struct {
	ServerPublic, Public, Secret string
}

// socket makes a socket of the client's context with CURVE set when asked for.
func (c *Client) socket(t zmq.Type) (*zmq.Socket, error) {
	s, err := c.zctx.NewSocket(t)
	if err != nil {
		return nil, err
	}
	s.SetLinger(0)
	if k := c.Curve; k != nil {
		err := s.SetCurveServerkey(k.ServerPublic)
		if err == nil {
			err = s.SetCurvePublickey(k.Public)
		}
		if err == nil {
			err = s.SetCurveSecretkey(k.Secret)
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("CURVE keys: %w", err)
		}
	}
	return s, nil
}

// ErrTruncatedReplay says the journal no longer holds the requested events:
// those before First are gone.
type ErrTruncatedReplay struct {
	First, Last uint64
	Epoch       string
}

func (e ErrTruncatedReplay) Error() string {
	return fmt.Sprintf("journal truncated: events before %d are gone (last %d)", e.First, e.Last)
}

// Dial prepares a client of the endpoints (ipc://... or tcp://...).
func Dial(events, control string) (*Client, error) {
	zctx, err := zmq.NewContext()
	if err != nil {
		return nil, err
	}
	return &Client{events: events, control: control, zctx: zctx, Timeout: 2 * time.Minute}, nil
}

// Close closes the client's sockets.
func (c *Client) Close() {
	if c.req != nil {
		c.req.Close()
	}
	c.zctx.Term()
}

// call sends one control request and waits for its reply. A timed-out REQ
// socket is replaced (REQ cannot send twice without a reply).
func (c *Client) call(req any, reply any) error {
	if c.req == nil {
		s, err := c.socket(zmq.REQ)
		if err != nil {
			return err
		}
		if err := s.Connect(c.control); err != nil {
			s.Close()
			return err
		}
		c.req = s
	}
	b, _ := json.Marshal(req)
	if _, err := c.req.SendBytes(b, 0); err != nil {
		return err
	}
	poller := zmq.NewPoller()
	poller.Add(c.req, zmq.POLLIN)
	ready, err := poller.Poll(c.Timeout)
	if err != nil || len(ready) == 0 {
		c.req.Close()
		c.req = nil
		if err == nil {
			err = fmt.Errorf("no answer from %s within %s", c.control, c.Timeout)
		}
		return err
	}
	resp, err := c.req.RecvBytes(0)
	if err != nil {
		return err
	}
	var e errorReply
	if json.Unmarshal(resp, &e) == nil && e.Error != "" {
		if e.Code == CodeTruncated || e.Error == "truncated" {
			return ErrTruncatedReplay{First: e.First, Last: e.Last, Epoch: e.Epoch}
		}
		return &ReplyError{Code: e.Code, Message: e.Error}
	}
	return json.Unmarshal(resp, reply)
}

// Replay returns the raw events after since (at most max) and the last sequence.
// It pages internally until it has max events or reached the last sequence.
func (c *Client) Replay(since uint64, max int) ([]json.RawMessage, uint64, error) {
	if max <= 0 || max > MaxReplay {
		max = MaxReplay
	}
	var events []json.RawMessage
	for {
		p, err := c.ReplayPage(since, max-len(events))
		if err != nil {
			return events, p.Last, err
		}
		events = append(events, p.Events...)
		if len(events) >= max || p.Next >= p.Last || p.Next <= since {
			return events, p.Last, nil
		}
		since = p.Next
	}
}

// ReplayPage is one replay answer: events and their topics, the node's last
// sequence, how far the node looked (ask again from Next while Next < Last)
// and the journal's epoch.
type ReplayPage struct {
	Events     []json.RawMessage
	Topics     []string
	Last, Next uint64
	Epoch      string
}

// ReplayPage asks for one page of replay.
func (c *Client) ReplayPage(since uint64, max int) (ReplayPage, error) {
	var r replayReply
	err := c.call(Request{Op: "replay", Since: since, Max: max}, &r)
	return ReplayPage(r), err
}

// Last asks the node for its last durable sequence and its journal epoch.
func (c *Client) Last() (uint64, string, error) {
	p, err := c.ReplayPage(math.MaxUint64, 1)
	return p.Last, p.Epoch, err
}

// Flush asks the node to flush a volume (by ID, or by PVC and namespace) and
// returns the ack event's sequence and the flush time.
func (c *Client) Flush(volumeID, pvc, namespace string) (uint64, float64, error) {
	var r flushReply
	err := c.call(Request{Op: "flush", VolumeID: volumeID, PVC: pvc, Namespace: namespace}, &r)
	return r.Seq, r.FlushMs, err
}

// Handler receives each event once, in sequence order, with its raw JSON.
type Handler func(ev Event, raw []byte) error

// Subscribe delivers every event with seq > since whose topic starts with one
// of prefixes (all when empty), exactly once and in order, until ctx ends or
// h fails. Live messages that skip a sequence, and heartbeats ahead of what
// was seen, trigger a replay. A journal truncated past since, and a journal
// created anew (another epoch), are errors (ErrTruncatedReplay,
// ErrEpochChanged) rather than a silent hole, unless OnTruncated or
// OnEpochChange say to go on.
func (c *Client) Subscribe(ctx context.Context, prefixes []string, since uint64, h Handler) error {
	sub, err := c.socket(zmq.SUB)
	if err != nil {
		return err
	}
	defer sub.Close()
	sub.SetRcvhwm(100000)
	sub.SetSubscribe("") // filtering happens here, after gap detection, which needs every seq
	if err := sub.Connect(c.events); err != nil {
		return err
	}
	match := func(topic string) bool {
		if len(prefixes) == 0 {
			return true
		}
		for _, p := range prefixes {
			if strings.HasPrefix(topic, p) {
				return true
			}
		}
		return false
	}
	last := since
	// epochOK checks the epoch of a message; after a change it restarts
	// from 0 (reset) if OnEpochChange allows.
	epochOK := func(epoch string) (reset bool, err error) {
		if epoch == "" || epoch == c.Epoch {
			return false, nil
		}
		if c.Epoch == "" {
			c.Epoch = epoch
			return false, nil
		}
		e := ErrEpochChanged{Old: c.Epoch, New: epoch}
		if c.OnEpochChange == nil {
			return false, e
		}
		if err := c.OnEpochChange(e); err != nil {
			return false, err
		}
		c.Epoch, last = epoch, 0
		return true, nil
	}
	deliver := func(raw []byte) error {
		var ev Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			return fmt.Errorf("bad event JSON: %w", err)
		}
		if ev.Seq <= last {
			return nil // already delivered
		}
		last = ev.Seq
		if match(ev.Topic()) {
			return h(ev, raw)
		}
		return nil
	}
	catchUp := func() error {
		for {
			p, err := c.ReplayPage(last, MaxReplay)
			var trunc ErrTruncatedReplay
			if errors.As(err, &trunc) && trunc.First > last+1 {
				if _, err := epochOK(trunc.Epoch); err != nil {
					return err
				}
				if c.OnTruncated == nil {
					return trunc
				}
				if err := c.OnTruncated(trunc); err != nil {
					return err
				}
				last = trunc.First - 1
				continue
			}
			if err != nil {
				return err
			}
			if reset, err := epochOK(p.Epoch); err != nil {
				return err
			} else if reset {
				continue
			}
			for _, raw := range p.Events {
				if err := deliver(raw); err != nil {
					return err
				}
			}
			before := last
			if p.Next > last {
				last = p.Next // what the node skipped belongs to others' namespaces
			}
			if last >= p.Last || (last == before && len(p.Events) == 0) {
				return nil // caught up (or the node made no progress: heartbeats retry)
			}
		}
	}
	// Subscribed first, so nothing published from here on is missed.
	time.Sleep(50 * time.Millisecond)
	if err := catchUp(); err != nil {
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
		var head struct {
			Seq   uint64 `json:"seq"`
			Kind  string `json:"kind"`
			Epoch string `json:"epoch"`
		}
		if json.Unmarshal(frames[1], &head) != nil {
			continue
		}
		reset, err := epochOK(head.Epoch)
		switch {
		case err != nil:
		case reset:
			err = catchUp()
		case head.Kind == KindHeartbeat:
			if head.Seq > last {
				err = catchUp()
			}
		case head.Seq <= last:
		case head.Seq == last+1:
			err = deliver(frames[1])
		default: // a gap: fetch what is missing in order, then this one
			if err = catchUp(); err == nil {
				err = deliver(frames[1])
			}
		}
		if err != nil {
			return err
		}
	}
	return ctx.Err()
}
