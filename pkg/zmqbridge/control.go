package zmqbridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	zmq "github.com/pebbe/zmq4"
	"k8s.io/klog/v2"
)

// maxRequestBytes bounds a control request; larger ones get an error reply.
// ZeroMQ drops peers that send more than maxMessageBytes in one frame.
const (
	maxRequestBytes = 64 << 10
	maxMessageBytes = 128 << 10
)

// MaxReplay is the most events one replay answer carries.
const MaxReplay = 1000

// Request is a control request.
type Request struct {
	Op        string `json:"op"`
	Since     uint64 `json:"since"`
	Max       int    `json:"max"`
	VolumeID  string `json:"volume_id"`
	PVC       string `json:"pvc"`
	Namespace string `json:"namespace"`
}

// ParseRequest decodes and checks one control request.
func ParseRequest(b []byte) (Request, error) {
	var r Request
	if len(b) > maxRequestBytes {
		return r, fmt.Errorf("request of %d bytes exceeds %d", len(b), maxRequestBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return r, fmt.Errorf("bad JSON: %v", err)
	}
	if dec.More() {
		return r, errors.New("bad JSON: more than one value")
	}
	switch r.Op {
	case "replay":
		if r.Max < 0 {
			return r, errors.New("max must not be negative")
		}
		if r.Max == 0 || r.Max > MaxReplay {
			r.Max = MaxReplay
		}
	case "flush":
		if r.VolumeID == "" && (r.PVC == "" || r.Namespace == "") {
			return r, errors.New("flush needs volume_id, or pvc and namespace")
		}
	case "":
		return r, errors.New("missing op")
	default:
		return r, fmt.Errorf("unknown op %q", r.Op)
	}
	return r, nil
}

// replayReply is the answer to a replay.
type replayReply struct {
	Events []json.RawMessage `json:"events"`
	Last   uint64            `json:"last"`
	Next   uint64            `json:"next"` // ask again with since=next while next < last
}

// maxReplayScan bounds the records one replay request reads.
const maxReplayScan = 10 * MaxReplay

type errorReply struct {
	Error string `json:"error"`
	First uint64 `json:"first,omitempty"`
	Last  uint64 `json:"last,omitempty"`
}

type flushReply struct {
	Seq     uint64  `json:"seq"`
	FlushMs float64 `json:"flush_ms"`
}

func marshal(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// controlLoop owns the control sockets and the inproc socket on which
// workers hand back their replies.
func (b *Bridge) controlLoop() {
	defer b.wg.Done()
	replies, err := b.zctx.NewSocket(zmq.PULL)
	if err == nil {
		replies.SetLinger(0)
		replies.SetRcvhwm(10000)
		err = replies.Bind("inproc://flush-replies")
	}
	if err != nil {
		klog.ErrorS(err, "event bridge control loop cannot start")
		return
	}
	defer replies.Close()
	for {
		select {
		case <-b.stop:
			return
		case cmd := <-b.endpoints.ctlCmds:
			cmd()
			continue
		default:
		}
		eps := b.endpoints.snapshot()
		poller := zmq.NewPoller()
		poller.Add(replies, zmq.POLLIN)
		now := time.Now()
		for _, ep := range eps {
			if now.After(ep.in.until) { // else mid-message and nothing came: wait a little
				poller.Add(ep.ctl, zmq.POLLIN)
			}
		}
		ready, err := poller.Poll(20 * time.Millisecond)
		if err != nil {
			if zmq.AsErrno(err) == zmq.ETERM {
				return
			}
			continue
		}
		for _, p := range ready {
			if p.Socket == replies {
				for i := 0; i < 1000 && b.forwardReply(replies, eps); i++ {
				}
				continue
			}
			for _, ep := range eps {
				if ep.ctl == p.Socket {
					for i := 0; i < 64 && b.serve(ep); i++ { // bounded: other endpoints wait for this round
					}
				}
			}
		}
	}
}

// serve answers or queues one message on an endpoint's ROUTER socket; false
// when there was no whole message to read.
func (b *Bridge) serve(ep *endpoint) bool {
	if !ep.in.readMessage(ep.ctl, ep.keys != nil) {
		return false
	}
	frames, user := ep.in.take()
	var v viewer = ep
	if ep.keys != nil {
		// The User-Id (the client's key, set by our ZAP handler) is on the
		// frames the peer sent, not on the routing-id frame ROUTER prepends.
		v = nil
		if c := ep.keys.lookup(user); c != nil {
			v = c
		}
	}
	// ROUTER frames: identity, then REQ's empty delimiter (DEALERs may omit it), then the request.
	envelope, body := frames[:1], frames[1:]
	if len(body) > 0 && len(body[0]) == 0 {
		envelope, body = frames[:2], frames[2:]
	}
	reply := func(v any) {
		msg := make([][]byte, 0, len(envelope)+1)
		msg = append(append(msg, envelope...), marshal(v))
		ep.ctl.SendMessageDontwait(msg)
	}
	if len(body) != 1 {
		reply(errorReply{Error: fmt.Sprintf("expected one JSON frame, got %d", len(body))})
		return true
	}
	req, err := ParseRequest(body[0])
	if err != nil {
		reply(errorReply{Error: err.Error()})
		return true
	}
	if v == nil {
		reply(errorReply{Error: "not authorized"})
		return true
	}
	if req.Op == "flush" && b.opts.Flusher == nil {
		reply(errorReply{Error: "flush is not available on this node"})
		return true
	}
	// A worker answers: a scoped replay may scan much of the journal and a
	// flush may take seconds, and other endpoints must not wait for them.
	if !b.pool.submit(ep, envelope, req, v) {
		reply(errorReply{Error: errBusy})
	}
	return true
}

func (b *Bridge) replay(req Request, v viewer) any {
	// Only durable events are replayed: what a subscriber sees never vanishes.
	synced := b.synced.Load()
	out := replayReply{Events: []json.RawMessage{}, Last: synced}
	// next is how far this answer looked: a scoped endpoint may skip many
	// records it may not see, and one request scans at most maxReplayScan.
	next, scanned := req.Since, 0
	for len(out.Events) < req.Max && next < synced && scanned < maxReplayScan {
		recs, err := b.journal.Read(next, MaxReplay)
		if errors.Is(err, ErrTruncated) {
			return errorReply{Error: "truncated", First: b.journal.First(), Last: synced}
		}
		if err != nil {
			return errorReply{Error: "reading the journal: " + err.Error()}
		}
		if len(recs) == 0 {
			break
		}
		for _, r := range recs {
			if r.Seq > synced || len(out.Events) == req.Max || scanned == maxReplayScan {
				break
			}
			next, scanned = r.Seq, scanned+1
			if v.sees(r) {
				out.Events = append(out.Events, r.Data)
			}
		}
	}
	out.Next = next
	return out
}

// flush asks the Flusher (on a worker) and returns the reply.
func (b *Bridge) flush(ctx context.Context, req Request, v viewer) any {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	seq, ms, err := b.opts.Flusher.Flush(ctx, FlushRequest{VolumeID: req.VolumeID, PVC: req.PVC, Namespace: req.Namespace,
		Allowed: v.mayFlush})
	if err != nil {
		return errorReply{Error: err.Error()}
	}
	return flushReply{Seq: seq, FlushMs: ms}
}

// forwardReply sends a worker's reply out of the endpoint it came in on;
// false when there was none.
func (b *Bridge) forwardReply(replies *zmq.Socket, eps []*endpoint) bool {
	frames, err := replies.RecvMessageBytes(zmq.DONTWAIT)
	if err != nil {
		return false
	}
	if len(frames) < 2 {
		return true
	}
	for _, ep := range eps {
		if ep.Control == string(frames[0]) {
			ep.ctl.SendMessageDontwait(frames[1:])
			break
		}
	}
	return true
}
