package zmqbridge

import (
	"sync"
	"time"

	zmq "github.com/pebbe/zmq4"
	"k8s.io/klog/v2"
)

// Defaults of the per-endpoint and per-node limits (Options).
const (
	DefaultMaxEndpoints     = 256
	DefaultMaxSubscriptions = 1000
	DefaultWorkers          = 4
	DefaultQueue            = 16
	DefaultFlushRate        = 5 // per second, per endpoint
	DefaultFlushBurst       = 10
	// DefaultKeepPerNamespace is how many of each namespace's newest events
	// retention keeps when it drops their segment (JournalOptions.KeepPerClass).
	DefaultKeepPerNamespace = 100
)

// socketsPerEndpoint: XPUB, ROUTER, and with metrics a monitor's two PAIR
// sockets (libzmq's and the bridge's).
const socketsPerEndpoint = 4

// maxSockets is the context's socket limit: every endpoint the bridge may
// bind (its own two and MaxEndpoints others), the workers' and loops'
// sockets, and room to spare.
func (o *Options) maxSockets() int {
	return (o.MaxEndpoints+2)*socketsPerEndpoint + o.Workers + 64
}

// applySubscriptions reads the subscription messages peers sent to an
// endpoint's XPUB socket (manual mode) and applies them.
//
// On a guarded (pod) endpoint the relay in front of it already bounds each
// connection's subscriptions and forwards an unsubscription only for a topic
// that connection holds: each is applied as it comes, and a leaving peer's
// subscriptions, which libzmq drops with its pipe, need nothing.
//
// On the others each is applied on the node endpoint, a client key's grants
// for it on the CURVE endpoint; at most Options.MaxSubscriptions at once per
// endpoint (one each, however many grants), since libzmq does not say which
// connection sent one. A subscription is counted until its peer leaves
// (libzmq then hands back, without metadata, each topic the peer asked for
// and did not unsubscribe); a peer's own unsubscribe removes it but does not
// give the count back, so no peer can free room by unsubscribing what
// another holds. Publish goroutine.
func (b *Bridge) applySubscriptions(ep *endpoint) {
	for i := 0; i < 10000; i++ { // bounded work per round; the rest next round
		msg, meta, err := ep.pub.RecvBytesWithMetadata(zmq.DONTWAIT, "User-Id", "Socket-Type")
		if err != nil {
			return
		}
		if more, _ := ep.pub.GetRcvmore(); more { // not a subscription: drop the whole message
			for more {
				ep.pub.RecvBytes(zmq.DONTWAIT)
				more, _ = ep.pub.GetRcvmore()
			}
			continue
		}
		if len(msg) == 0 || msg[0] > 1 {
			continue
		}
		subscribe, topic := msg[0] == 1, string(msg[1:])
		fromPeer := meta["Socket-Type"] != ""
		if ep.Guard {
			switch {
			case !fromPeer: // its peer left: libzmq dropped its subscriptions
			case subscribe:
				ep.pub.SetSubscribe(topic)
			default:
				ep.pub.SetUnsubscribe(topic)
			}
			continue
		}
		if !fromPeer {
			// Its peer left: libzmq dropped what was applied for it and hands
			// back each topic the peer had asked for and not unsubscribed
			// (not the grants applied for it on the CURVE endpoint).
			if ep.subs[topic] > 0 {
				if ep.subs[topic]--; ep.subs[topic] == 0 {
					delete(ep.subs, topic)
				}
				ep.nsub--
			}
			continue
		}
		topics := []string{topic}
		if ep.keys != nil {
			c := ep.keys.lookup(meta["User-Id"])
			if c == nil {
				continue
			}
			topics = grants(c, topic, b.opts.Node)
		}
		switch {
		case subscribe && ep.nsub >= b.opts.MaxSubscriptions:
			b.refusedSubs.log("subscription refused: the endpoint holds the most subscriptions allowed",
				"endpoint", ep.Events, "max", b.opts.MaxSubscriptions)
		case subscribe:
			for _, p := range topics {
				ep.pub.SetSubscribe(p)
			}
			ep.subs[topic]++ // counted as asked: that is what comes back when its peer leaves
			ep.nsub++
		default:
			for _, p := range topics {
				ep.pub.SetUnsubscribe(p)
			}
		}
	}
}

// rateLog logs one message at most once per period, with the number of
// occurrences it stood for.
type rateLog struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (r *rateLog) log(msg string, kv ...any) {
	r.mu.Lock()
	now := time.Now()
	if now.Sub(r.last) < 10*time.Second {
		r.suppressed++
		r.mu.Unlock()
		return
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	r.mu.Unlock()
	klog.InfoS(msg, append(kv, "alsoInTheLast10s", n)...)
}

// tokenBucket is a rate limit: rate per second, bursts of burst.
type tokenBucket struct {
	rate, burst, tokens float64
	last                time.Time
}

// take takes a token if there is one.
func (t *tokenBucket) take(now time.Time) bool {
	if !t.last.IsZero() {
		t.tokens += now.Sub(t.last).Seconds() * t.rate
		if t.tokens > t.burst {
			t.tokens = t.burst
		}
	}
	t.last = now
	if t.tokens < 1 {
		return false
	}
	t.tokens--
	return true
}

// inbound is the control message being received on an endpoint: frames
// arrive one by one, a message of more frames than a request has is dropped
// as it arrives (never held), and a message cut short by EAGAIN resumes at
// the next poll.
type inbound struct {
	frames   [][]byte
	user     string
	dropping bool      // the message has too many frames: discard the rest
	until    time.Time // mid-message with nothing to read: not polled before
}

// maxFrames is the most frames a control request has: the routing ID ROUTER
// prepends, REQ's empty delimiter, the JSON.
const maxFrames = 3

// readMessage reads the next control message (control goroutine). It
// returns false when no whole message is ready; at most a bounded number of
// frames per call, so one endless message cannot hold the loop.
func (in *inbound) readMessage(s *zmq.Socket, curve bool) bool {
	for i := 0; i < 256; i++ {
		var (
			f    []byte
			meta map[string]string
			err  error
		)
		if curve {
			f, meta, err = s.RecvBytesWithMetadata(zmq.DONTWAIT, "User-Id")
		} else {
			f, err = s.RecvBytes(zmq.DONTWAIT)
		}
		if err != nil {
			if len(in.frames) > 0 || in.dropping {
				in.until = time.Now().Add(5 * time.Millisecond)
			}
			return false
		}
		more, _ := s.GetRcvmore()
		if !in.dropping {
			if len(in.frames) == maxFrames {
				in.dropping = true
				in.frames = in.frames[:0]
			} else {
				in.frames = append(in.frames, f)
				if u := meta["User-Id"]; u != "" {
					in.user = u
				}
			}
		}
		if !more {
			if in.dropping {
				in.dropping = false
				continue // dropped: next message
			}
			return true
		}
	}
	return false
}

// take hands over a whole message and resets in.
func (in *inbound) take() ([][]byte, string) {
	f, u := in.frames, in.user
	in.frames, in.user = nil, ""
	return f, u
}
