package zmqbridge

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	zmq "github.com/pebbe/zmq4"
	"k8s.io/klog/v2"
)

// Endpoint is a pair of sockets: PUB for events and ROUTER for control.
type Endpoint struct {
	Events, Control string // ZeroMQ addresses (ipc://path or tcp://host:port)
	// Mode of ipc socket files (0: the bridge's SocketMode).
	Mode os.FileMode
	// Scope limits what the endpoint delivers, replays and flushes; the zero
	// Scope sees everything (node agents).
	Scope Scope
}

// Scope is what one endpoint may see.
type Scope struct {
	// Namespace: only events of PVCs in this namespace ("" = all).
	Namespace string
	// PodUID, with Namespace: only events of volumes published to this pod
	// (its publish/unpublish events and, from then on, its volumes' others).
	PodUID string
	// Volumes seeds the pod's volumes that were published before the endpoint.
	Volumes []string
}

// endpoint is a bound Endpoint. pub belongs to the publish goroutine, ctl to
// the control goroutine.
type endpoint struct {
	Endpoint
	pub, ctl *zmq.Socket
	// keys, on the CURVE endpoint, say what each client key may see.
	keys *keyring
	// Set (under endpoints.mu) once the owning goroutine closed the socket.
	pubClosed, ctlClosed bool

	mu      sync.Mutex
	volumes map[string]bool // pod scope: the pod's volumes
}

// sees reports whether the endpoint may see a record, learning the pod's
// volumes from its publish events.
func (ep *endpoint) sees(r Record) bool {
	sc := ep.Scope
	if sc.Namespace == "" {
		return true
	}
	if TopicNamespace(r.Topic) != sc.Namespace {
		return false
	}
	if sc.PodUID == "" {
		return true
	}
	var ev struct {
		Kind     string `json:"kind"`
		VolumeID string `json:"volume_id"`
		PodUID   string `json:"pod_uid"`
	}
	if json.Unmarshal(r.Data, &ev) != nil {
		return false
	}
	ep.mu.Lock()
	defer ep.mu.Unlock()
	if ev.PodUID == sc.PodUID {
		if ev.Kind == KindPublish {
			ep.volumes[ev.VolumeID] = true
		}
		return true
	}
	return ep.volumes[ev.VolumeID]
}

// mayFlush reports whether the endpoint may flush a volume.
func (ep *endpoint) mayFlush(namespace, volumeID string) bool {
	if ep.Scope.Namespace != "" && namespace != ep.Scope.Namespace {
		return false
	}
	if ep.Scope.PodUID == "" {
		return true
	}
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return ep.volumes[volumeID]
}

// viewer decides what one requester may replay and flush.
type viewer interface {
	sees(r Record) bool
	mayFlush(namespace, volumeID string) bool
}

var errStopped = errors.New("zmqbridge: the bridge is stopping")

// endpoints is the set of bound endpoints. Changes run as commands on the
// goroutines that own the sockets.
type endpoints struct {
	b       *Bridge
	mu      sync.Mutex
	byKey   map[string]*endpoint
	adding  map[string]bool // keys being bound
	dying   []*endpoint     // removed, sockets not closed yet
	pubCmds chan func()
	ctlCmds chan func()
}

func newEndpoints(b *Bridge) *endpoints {
	return &endpoints{b: b, byKey: map[string]*endpoint{}, adding: map[string]bool{}, pubCmds: make(chan func(), 16), ctlCmds: make(chan func(), 16)}
}

// add binds e under key (before the loops start, or from any goroutine after).
func (es *endpoints) add(key string, e Endpoint) error {
	// Reserve the key first: binding removes a stale socket file, which must
	// never be a live endpoint's.
	es.mu.Lock()
	if _, dup := es.byKey[key]; dup || es.adding[key] {
		es.mu.Unlock()
		return fmt.Errorf("zmqbridge: endpoint %q exists", key)
	}
	es.adding[key] = true
	es.mu.Unlock()
	defer func() {
		es.mu.Lock()
		delete(es.adding, key)
		es.mu.Unlock()
	}()
	ep := &endpoint{Endpoint: e, volumes: map[string]bool{}}
	for _, v := range e.Scope.Volumes {
		ep.volumes[v] = true
	}
	var err error
	mode := e.Mode
	if mode == 0 {
		mode = es.b.opts.SocketMode
	}
	pubType := zmq.PUB
	if key == curveKey {
		// XPUB in manual mode: the bridge decides which subscriptions a client
		// key gets (its namespaces), not the client.
		pubType, ep.keys = zmq.XPUB, es.b.curveKeys
	}
	var mon *monitor
	watch := func(s *zmq.Socket) (err error) {
		if key == curveKey {
			// The ZAP handler reads the monitor; it must have it before
			// the first connection can ask for authentication.
			if mon, err = es.watch(s, newCurveConns(curveHandshake+time.Second)); err == nil {
				select {
				case es.b.curveMons <- mon:
					mon = nil // zapLoop's now
				case <-es.b.stop:
					go mon.finish() // socket() closes s on this error
					mon = nil
					return errStopped
				}
			}
		} else if es.b.opts.Metrics != nil {
			mon, err = es.watch(s, nil)
		}
		return err
	}
	defer func() {
		if mon != nil { // not handed to zapLoop: read it until the PUB socket closes
			go mon.finish()
		}
	}()
	if ep.pub, err = es.socket(pubType, e.Events, mode, watch); err != nil {
		return err // socket() closed it
	}
	if ep.ctl, err = es.socket(zmq.ROUTER, e.Control, mode, nil); err != nil {
		ep.pub.Close()
		return err
	}
	es.mu.Lock()
	defer es.mu.Unlock()
	es.byKey[key] = ep
	return nil
}

// socket makes a socket and binds it; watch, if set, runs just before the bind.
func (es *endpoints) socket(t zmq.Type, addr string, mode os.FileMode, watch func(*zmq.Socket) error) (*zmq.Socket, error) {
	s, err := es.b.zctx.NewSocket(t)
	if err != nil {
		return nil, err
	}
	s.SetLinger(0)
	if strings.HasPrefix(addr, "tcp://") {
		if err := es.b.secureSocket(s, t); err != nil {
			s.Close()
			return nil, fmt.Errorf("zmqbridge: CURVE on %s: %w", addr, err)
		}
	}
	switch t {
	case zmq.XPUB:
		s.SetXpubManual(1)
		s.SetSndhwm(100000)
	case zmq.PUB:
		s.SetSndhwm(100000) // a subscriber this far behind recovers by replay
	case zmq.ROUTER:
		s.SetMaxmsgsize(maxMessageBytes) // a peer sending more is disconnected
		s.SetRcvhwm(1000)
	}
	if watch != nil {
		if err := watch(s); err != nil {
			s.Close()
			return nil, fmt.Errorf("zmqbridge: monitoring %s: %w", addr, err)
		}
	}
	path, isIPC := strings.CutPrefix(addr, "ipc://")
	if isIPC {
		os.Remove(path) // a stale socket file from a crashed run
	}
	if err := s.Bind(addr); err != nil {
		s.Close()
		return nil, fmt.Errorf("zmqbridge: binding %s: %w", addr, err)
	}
	if isIPC {
		if err := os.Chmod(path, mode); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// snapshot lists the endpoints.
func (es *endpoints) snapshot() []*endpoint {
	es.mu.Lock()
	defer es.mu.Unlock()
	out := make([]*endpoint, 0, len(es.byKey))
	for _, ep := range es.byKey {
		out = append(out, ep)
	}
	return out
}

// publish sends a record on every endpoint that may see it (publish goroutine).
func (es *endpoints) publish(r Record) {
	for _, ep := range es.snapshot() {
		if !ep.sees(r) {
			continue
		}
		// Two plain sends: SendMessage's variadic interface{} costs per event.
		_, err := ep.pub.SendBytes([]byte(r.Topic), zmq.SNDMORE|zmq.DONTWAIT)
		if err == nil {
			_, err = ep.pub.SendBytes(r.Data, zmq.DONTWAIT)
		}
		if err != nil {
			klog.V(4).InfoS("publishing event", "seq", r.Seq, "err", err)
		}
	}
	if m := es.b.opts.Metrics; m != nil {
		m.EventPublished(kindOf(r.Topic))
	}
}

// heartbeat tells every endpoint the last sequence (publish goroutine).
func (es *endpoints) heartbeat(seq uint64) {
	hb := Event{V: Version, Seq: seq, Epoch: es.b.epoch, Time: time.Now().UTC().Format(time.RFC3339Nano), Node: es.b.opts.Node, Kind: KindHeartbeat}
	topic, data := KindHeartbeat+"/"+es.b.opts.Node, hb.Marshal()
	for _, ep := range es.snapshot() {
		ep.pub.SendMessageDontwait(topic, data)
	}
}

// remove unbinds and closes the endpoint under key, on the goroutines that own
// its sockets, and removes ipc socket files.
func (es *endpoints) remove(key string) {
	es.mu.Lock()
	ep := es.byKey[key]
	delete(es.byKey, key)
	if ep != nil {
		es.dying = append(es.dying, ep) // closeAll closes it if the loops stop first
	}
	es.mu.Unlock()
	if ep == nil {
		return
	}
	done := make(chan struct{}, 2)
	closer := func(s *zmq.Socket, closed *bool) func() {
		return func() {
			es.mu.Lock()
			if !*closed {
				s.Close()
				*closed = true
			}
			es.mu.Unlock()
			done <- struct{}{}
		}
	}
	for _, c := range []struct {
		ch chan func()
		f  func()
	}{{es.pubCmds, closer(ep.pub, &ep.pubClosed)}, {es.ctlCmds, closer(ep.ctl, &ep.ctlClosed)}} {
		select {
		case c.ch <- c.f:
		case <-es.b.stop:
			return
		}
	}
	for i := 0; i < 2; i++ {
		select {
		case <-done:
		case <-es.b.stop:
			return
		}
	}
	es.mu.Lock()
	for i, d := range es.dying {
		if d == ep {
			es.dying = append(es.dying[:i], es.dying[i+1:]...)
			break
		}
	}
	es.mu.Unlock()
	for _, a := range []string{ep.Events, ep.Control} {
		if p, ok := strings.CutPrefix(a, "ipc://"); ok {
			os.Remove(p)
		}
	}
}

// closeAll closes every socket, including those of endpoints whose removal
// the stopping loops did not carry out; only after the loops have stopped.
func (es *endpoints) closeAll() {
	es.mu.Lock()
	defer es.mu.Unlock()
	for k, ep := range es.byKey {
		ep.pub.Close()
		ep.ctl.Close()
		delete(es.byKey, k)
	}
	for _, ep := range es.dying {
		if !ep.pubClosed {
			ep.pub.Close()
		}
		if !ep.ctlClosed {
			ep.ctl.Close()
		}
	}
	es.dying = nil
}

func kindOf(topic string) string {
	k, _, _ := strings.Cut(topic, "/")
	return k
}
