package zmqbridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"strconv"
	"strings"
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
	Since     uint64 `json:"since,omitempty"`
	Max       int    `json:"max,omitempty"`
	VolumeID  string `json:"volume_id,omitempty"`
	PVC       string `json:"pvc,omitempty"`
	Namespace string `json:"namespace,omitempty"`
}

// requestFields are the fields each op's request may have (exact names;
// docs/events.schema.json says the same).
var requestFields = map[string]map[string]bool{
	"replay": {"op": true, "since": true, "max": true},
	"flush":  {"op": true, "volume_id": true, "pvc": true, "namespace": true},
}

// ParseRequest decodes and checks one control request: a JSON object with
// the fields of its op only, each of its type (numbers: integers, in any
// JSON notation), exactly what docs/events.schema.json accepts.
func ParseRequest(b []byte) (Request, error) {
	var r Request
	if len(b) > maxRequestBytes {
		return r, fmt.Errorf("request of %d bytes exceeds %d", len(b), maxRequestBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return r, fmt.Errorf("bad JSON: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return r, errors.New("bad JSON: more than one value")
	}
	if m == nil {
		return r, errors.New("bad JSON: not an object")
	}
	opv, ok := m["op"]
	if !ok {
		return r, errors.New("missing op")
	}
	if r.Op, ok = opv.(string); !ok {
		return r, errors.New("op must be a string")
	}
	fields := requestFields[r.Op]
	if fields == nil {
		return r, fmt.Errorf("unknown op %q", r.Op)
	}
	for k, v := range m {
		if !fields[k] {
			return r, fmt.Errorf("unknown field %q in a %s request", k, r.Op)
		}
		var err error
		switch k {
		case "since":
			r.Since, err = requestInt(v, k, math.MaxUint64)
		case "max":
			var n uint64
			n, err = requestInt(v, k, math.MaxInt64)
			r.Max = int(min(n, MaxReplay))
		case "volume_id", "pvc", "namespace":
			str, ok := v.(string)
			if !ok {
				err = fmt.Errorf("%s must be a string", k)
			}
			switch k {
			case "volume_id":
				r.VolumeID = str
			case "pvc":
				r.PVC = str
			case "namespace":
				r.Namespace = str
			}
		}
		if err != nil {
			return r, err
		}
	}
	switch r.Op {
	case "replay":
		if r.Max == 0 {
			r.Max = MaxReplay
		}
	case "flush":
		if r.VolumeID == "" && (r.PVC == "" || r.Namespace == "") {
			return r, errors.New("flush needs volume_id, or pvc and namespace")
		}
	}
	return r, nil
}

// requestInt reads a JSON number that must be an integer in [0, limit].
func requestInt(v any, name string, limit uint64) (uint64, error) {
	num, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("%s must be a number", name)
	}
	s := string(num)
	if n, err := strconv.ParseUint(s, 10, 64); err == nil && n <= limit {
		return n, nil
	}
	// Other notations (1.0, 1e3, -0): exactly, but refuse exponents that
	// would take big numbers to compute (such a value is out of range or not
	// an integer anyway).
	if i := strings.IndexAny(s, "eE"); i >= 0 {
		if e, err := strconv.Atoi(s[i+1:]); err != nil || e > 1000 || e < -1000 {
			return 0, fmt.Errorf("%s is out of range", name)
		}
	}
	q, ok := new(big.Rat).SetString(s)
	if !ok || !q.IsInt() {
		return 0, fmt.Errorf("%s must be an integer", name)
	}
	if q.Sign() < 0 {
		return 0, fmt.Errorf("%s must not be negative", name)
	}
	if !q.Num().IsUint64() || q.Num().Uint64() > limit {
		return 0, fmt.Errorf("%s is out of range", name)
	}
	return q.Num().Uint64(), nil
}

// replayReply is the answer to a replay.
type replayReply struct {
	Events []json.RawMessage `json:"events"`
	Topics []string          `json:"topics"` // Topics[i] is Events[i]'s topic
	Last   uint64            `json:"last"`
	Next   uint64            `json:"next"` // ask again with since=next while next < last
	Epoch  string            `json:"epoch"`
}

// maxReplayScan bounds the records one replay request reads.
const maxReplayScan = 10 * MaxReplay

type errorReply struct {
	Error string `json:"error"`
	Code  string `json:"code"`
	First uint64 `json:"first,omitempty"`
	Last  uint64 `json:"last,omitempty"`
	Epoch string `json:"epoch"`
}

type flushReply struct {
	Seq     uint64  `json:"seq"`
	FlushMs float64 `json:"flush_ms"`
	Epoch   string  `json:"epoch"`
}

// Error codes of control replies (docs/events.md): stable, machine-readable.
const (
	CodeBadRequest   = "bad_request"  // the request is malformed; do not retry it as is
	CodeUnauthorized = "unauthorized" // the CURVE key is not (or no longer) listed
	CodeNotFound     = "not_found"    // no such volume staged on the node, or not in scope
	CodeUnsupported  = "unsupported"  // flush is not available on this endpoint's node
	CodeTruncated    = "truncated"    // the journal no longer holds the requested events
	CodeBusy         = "busy"         // the node's worker queue is full: retry later
	CodeAborted      = "aborted"      // another operation on the volume is in progress: retry later
	CodeUnavailable  = "unavailable"  // the journal failed or the node is stopping: retry later
	CodeInternal     = "internal"     // the flush or a journal read failed
)

// Error is an error with a control reply code; a Flusher returns one to
// choose the code (other errors are answered as CodeInternal).
type Error struct{ Code, Message string }

func (e *Error) Error() string { return e.Message }

// Errorf makes an *Error.
func Errorf(code, format string, args ...any) error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// errReply is the reply to a failed request.
func (b *Bridge) errReply(code, msg string) errorReply {
	return errorReply{Error: msg, Code: code, Epoch: b.epoch}
}

// errReplyOf answers err with its code.
func (b *Bridge) errReplyOf(err error) errorReply {
	var e *Error
	switch {
	case errors.As(err, &e):
		return b.errReply(e.Code, e.Message)
	case errors.Is(err, ErrUnavailable), errors.Is(err, errStopped), errors.Is(err, errClosed), errors.Is(err, context.Canceled),
		errors.Is(err, context.DeadlineExceeded):
		return b.errReply(CodeUnavailable, err.Error())
	}
	return b.errReply(CodeInternal, err.Error())
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
		reply(b.errReply(CodeBadRequest, fmt.Sprintf("expected one JSON frame, got %d", len(body))))
		return true
	}
	req, err := ParseRequest(body[0])
	if err != nil {
		reply(b.errReply(CodeBadRequest, err.Error()))
		return true
	}
	if v == nil {
		reply(b.errReply(CodeUnauthorized, "not authorized"))
		return true
	}
	if req.Op == "flush" && b.opts.Flusher == nil {
		reply(b.errReply(CodeUnsupported, "flush is not available on this node"))
		return true
	}
	// A worker answers: a scoped replay may scan much of the journal and a
	// flush may take seconds, and other endpoints must not wait for them.
	if !b.pool.submit(ep, envelope, req, v) {
		reply(b.errReply(CodeBusy, busyMessage))
	}
	return true
}

func (b *Bridge) replay(req Request, v viewer) any {
	// Only durable events are replayed: what a subscriber sees never vanishes.
	synced := b.synced.Load()
	out := replayReply{Events: []json.RawMessage{}, Topics: []string{}, Last: synced, Epoch: b.epoch}
	// next is how far this answer looked: a scoped endpoint may skip many
	// records it may not see, and one request scans at most maxReplayScan.
	next, scanned := req.Since, 0
	truncated := func(first uint64) any {
		return errorReply{Error: "truncated", Code: CodeTruncated, First: first, Last: synced, Epoch: b.epoch}
	}
	for len(out.Events) < req.Max && next < synced && scanned < maxReplayScan {
		if next+1 < b.journal.First() {
			// Before the segments: what retention kept of the viewer's
			// namespaces, complete after `lost`.
			recs, lost, first := b.journal.Kept(next, v.seesClass)
			if next < lost {
				if len(out.Events) > 0 || next > req.Since {
					break // this answer ends before the gap; the next one reports it
				}
				return truncated(lost + 1)
			}
			all := len(recs) < maxKeptRead
			for _, r := range recs {
				if len(out.Events) == req.Max || scanned == maxReplayScan {
					all = false
					break
				}
				next, scanned = r.Seq, scanned+1
				if v.sees(r) {
					out.Events = append(out.Events, r.Data)
					out.Topics = append(out.Topics, r.Topic)
				}
			}
			if all {
				next = max(next, first-1)
			}
			continue
		}
		recs, err := b.journal.Read(next, MaxReplay)
		var gap *GapError
		if errors.As(err, &gap) {
			if next+1 < b.journal.First() {
				continue // retention dropped it meanwhile: the kept records answer
			}
			if len(out.Events) > 0 || next > req.Since {
				break // this answer ends before the gap; the next one reports it
			}
			return truncated(gap.First)
		}
		if err != nil {
			return b.errReply(CodeInternal, "reading the journal: "+err.Error())
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
				out.Topics = append(out.Topics, r.Topic)
			}
		}
	}
	out.Next = next
	return out
}

// FlushTimeout bounds one flush request on the node.
const FlushTimeout = 2 * time.Minute

// flush asks the Flusher (on a worker) and returns the reply, once the ack
// event has been published.
func (b *Bridge) flush(req Request, v viewer) any {
	ctx, cancel := context.WithTimeout(b.ctx, FlushTimeout)
	defer cancel()
	seq, ms, err := b.opts.Flusher.Flush(ctx, FlushRequest{VolumeID: req.VolumeID, PVC: req.PVC, Namespace: req.Namespace,
		Allowed: v.mayFlush})
	if err == nil && seq == 0 {
		err = Errorf(CodeUnavailable, "the flush's ack event was not journaled")
	}
	if err == nil {
		err = b.waitPublished(ctx, seq)
	}
	if err != nil {
		return b.errReplyOf(err)
	}
	return flushReply{Seq: seq, FlushMs: ms, Epoch: b.epoch}
}

// replyFlush hands a worker's reply (flush or replay) to the control loop,
// once for each requester it answers, through an inproc socket of its own.
func (b *Bridge) replyFlush(ep *endpoint, envelopes [][][]byte, reply any) {
	b.zmu.RLock() // Close terminates the context only once no worker uses it
	defer b.zmu.RUnlock()
	if b.zdead {
		return
	}
	push, err := b.zctx.NewSocket(zmq.PUSH)
	if err != nil {
		return
	}
	defer push.Close()
	push.SetLinger(100 * time.Millisecond)
	push.SetSndhwm(10000)
	if err := push.Connect("inproc://flush-replies"); err != nil {
		return
	}
	data := marshal(reply)
	for _, env := range envelopes {
		msg := make([][]byte, 0, len(env)+2)
		msg = append(append(append(msg, []byte(ep.Control)), env...), data)
		push.SendMessageDontwait(msg) // never block: the control loop may be gone (Close)
	}
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
