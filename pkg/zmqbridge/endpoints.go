package zmqbridge

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	zmq "github.com/pebbe/zmq4"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Endpoint is a pair of sockets: XPUB for events and ROUTER for control.
type Endpoint struct {
	Events, Control string // ZeroMQ addresses (ipc://path or tcp://host:port)
	// Mode of ipc socket files (0: the bridge's SocketMode). It is applied
	// by the umask of the binding thread, never by a chmod of the path.
	Mode os.FileMode
	// Scope limits what the endpoint delivers, replays and flushes; the zero
	// Scope sees nothing.
	Scope Scope
	// SendHWM is each subscriber's queue in messages (0: 100,000); a
	// subscriber further behind loses live events and recovers them by replay.
	SendHWM int
	// Guard (ipc only) serves the endpoint through a relay that checks what
	// clients send and bounds their connections (see guard.go).
	Guard bool
}

// Scope is what one endpoint may see. The zero Scope sees nothing.
type Scope struct {
	// All: every event of the node (node agents).
	All bool
	// Namespace: only events of PVCs in this namespace.
	Namespace string
	// PodUID, with Namespace: only events of volumes published to this pod
	// (its publish/unpublish events and, from then on until the pod
	// unpublishes the volume, the volume's other events).
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
	// guards relay a guarded endpoint's sockets.
	guards []*guard
	// Set (under endpoints.mu) once the owning goroutine closed the socket.
	pubClosed, ctlClosed bool
	// subs counts the subscriptions applied on pub (publish goroutine).
	subs map[string]int
	nsub int
	// in is the control message being received (control goroutine).
	in inbound
	// queue holds its control requests waiting for a worker (pool.mu).
	queue   []*job
	queued  bool // in pool.ready
	running int  // jobs on workers
	// flushes are its flush jobs not started yet, by viewer and volume (pool.mu).
	flushes  map[flushKey]*job
	flushing map[flushKey]bool // flushes running (pool.mu)
	bucket   tokenBucket       // flush rate (pool.mu)

	mu      sync.Mutex
	volumes map[string]bool // pod scope: the pod's volumes
}

// podEvent is what scopes read from an event's JSON.
type podEvent struct {
	Kind      string `json:"kind"`
	VolumeID  string `json:"volume_id"`
	PodUID    string `json:"pod_uid"`
	Namespace string `json:"namespace"`
}

// recordView is a record as endpoints judge it: what they read from it is
// decoded once, for all of them (the publisher checks every endpoint).
type recordView struct {
	Record
	ns      string
	nsDone  bool
	ev      podEvent
	decoded int8 // 0: not yet, 1: ev holds the JSON's fields, -1: bad JSON
}

// namespace is recordNamespace(r), computed once.
func (v *recordView) namespace() string {
	if !v.nsDone {
		v.nsDone = true
		if v.ns = TopicNamespace(v.Topic); v.ns == "" {
			if ev, ok := v.event(); ok {
				v.ns = ev.Namespace
			}
		}
	}
	return v.ns
}

// event decodes the record's JSON, once.
func (v *recordView) event() (*podEvent, bool) {
	if v.decoded == 0 {
		var ev podEvent // decoded apart: v itself then stays on its caller's stack
		v.decoded = -1
		if json.Unmarshal(v.Data, &ev) == nil {
			v.ev, v.decoded = ev, 1
		}
	}
	return &v.ev, v.decoded == 1
}

// sees reports whether the endpoint may see a record (replay: it learns
// nothing from old records).
func (ep *endpoint) sees(r Record) bool {
	ok, _ := ep.check(&recordView{Record: r})
	return ok
}

// check decides whether the endpoint sees a record and, in pod scope, what
// the record says about the pod's volumes.
func (ep *endpoint) check(v *recordView) (bool, *podEvent) {
	sc := ep.Scope
	if sc.All {
		return true, nil
	}
	if sc.Namespace == "" || v.namespace() != sc.Namespace {
		return false, nil
	}
	if sc.PodUID == "" {
		return true, nil
	}
	ev, ok := v.event()
	if !ok {
		return false, nil
	}
	if ev.PodUID == sc.PodUID {
		return true, ev
	}
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return ep.volumes[ev.VolumeID], nil
}

// recordNamespace is the namespace of a record's volume: its topic's, or for
// a volume without PVC the event's namespace field (learned from the pod
// that published it).
func recordNamespace(r Record) string {
	v := recordView{Record: r}
	return v.namespace()
}

// observe is sees for the live stream (publish goroutine, in sequence
// order): a pod-scoped endpoint learns the pod's volumes from its publish
// events and forgets them at its unpublish events.
func (ep *endpoint) observe(v *recordView) bool {
	ok, ev := ep.check(v)
	if ev != nil && ev.VolumeID != "" {
		ep.mu.Lock()
		switch ev.Kind {
		case KindPublish:
			ep.volumes[ev.VolumeID] = true
		case KindUnpublish:
			delete(ep.volumes, ev.VolumeID)
		}
		ep.mu.Unlock()
	}
	return ok
}

// mayFlush reports whether the endpoint may flush a volume.
func (ep *endpoint) mayFlush(namespace, volumeID string) bool {
	sc := ep.Scope
	if sc.All {
		return true
	}
	if sc.Namespace == "" || namespace != sc.Namespace {
		return false
	}
	if sc.PodUID == "" {
		return true
	}
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return ep.volumes[volumeID]
}

// seesClass reports whether the endpoint may see records of a namespace
// (the journal's retention class, recordNamespace).
func (ep *endpoint) seesClass(namespace string) bool {
	return ep.Scope.All || (ep.Scope.Namespace != "" && namespace == ep.Scope.Namespace)
}

// viewer decides what one requester may replay and flush.
type viewer interface {
	sees(r Record) bool
	// seesClass: whether it may see any record of a namespace.
	seesClass(namespace string) bool
	mayFlush(namespace, volumeID string) bool
}

var errStopped = errors.New("zmqbridge: the bridge is stopping")

// endpoints is the set of bound endpoints. Changes run as commands on the
// goroutines that own the sockets.
type endpoints struct {
	b     *Bridge
	mu    sync.Mutex
	byKey map[string]*endpoint
	// list is byKey's endpoints, replaced (never changed) under mu when
	// byKey changes: the publisher reads it for every event.
	list    atomic.Pointer[[]*endpoint]
	adding  map[string]bool // keys being bound
	dying   []*endpoint     // removed, sockets not closed yet
	pubCmds chan func()
	ctlCmds chan func()
}

func newEndpoints(b *Bridge) *endpoints {
	return &endpoints{b: b, byKey: map[string]*endpoint{}, adding: map[string]bool{}, pubCmds: make(chan func(), 16), ctlCmds: make(chan func(), 16)}
}

// ErrTooManyEndpoints: the bridge already serves Options.MaxEndpoints
// endpoints besides its own.
var ErrTooManyEndpoints = errors.New("zmqbridge: too many endpoints")

// add binds e under key (before the loops start, or from any goroutine after).
func (es *endpoints) add(key string, e Endpoint) error {
	// Reserve the key first: binding removes a stale socket file, which must
	// never be a live endpoint's.
	es.mu.Lock()
	if _, dup := es.byKey[key]; dup || es.adding[key] {
		es.mu.Unlock()
		return fmt.Errorf("zmqbridge: endpoint %q exists", key)
	}
	if key != "" && key != curveKey {
		n := 0
		for k := range es.byKey {
			if k != "" && k != curveKey {
				n++
			}
		}
		for k := range es.adding {
			if k != "" && k != curveKey {
				n++
			}
		}
		if n >= es.b.opts.MaxEndpoints {
			es.mu.Unlock()
			return fmt.Errorf("%w: %d of %d in use", ErrTooManyEndpoints, n, es.b.opts.MaxEndpoints)
		}
	}
	es.adding[key] = true
	es.mu.Unlock()
	defer func() {
		es.mu.Lock()
		delete(es.adding, key)
		es.mu.Unlock()
	}()
	ep := &endpoint{Endpoint: e, volumes: map[string]bool{}, subs: map[string]int{}, flushes: map[flushKey]*job{}, flushing: map[flushKey]bool{}}
	ep.bucket = tokenBucket{rate: es.b.opts.FlushRate, burst: float64(es.b.opts.FlushBurst), tokens: float64(es.b.opts.FlushBurst)}
	for _, v := range e.Scope.Volumes {
		ep.volumes[v] = true
	}
	var err error
	mode := e.Mode
	if mode == 0 {
		mode = es.b.opts.SocketMode
	}
	hwm := e.SendHWM
	if hwm <= 0 {
		hwm = 100000
	}
	if key == curveKey {
		// The bridge decides which subscriptions a client key gets (its
		// namespaces), not the client.
		ep.keys = es.b.curveKeys
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
	evAddr, ctlAddr, zmode := e.Events, e.Control, mode
	if e.Guard {
		if err := os.MkdirAll(filepath.Join(es.b.opts.Dir, "i"), 0o700); err != nil {
			return err
		}
		evAddr, ctlAddr, zmode = "ipc://"+es.b.internalPath(e.Events), "ipc://"+es.b.internalPath(e.Control), 0o600
	}
	if ep.pub, err = es.socket(zmq.XPUB, evAddr, zmode, hwm, watch); err != nil {
		return err // socket() closed it
	}
	if ep.ctl, err = es.socket(zmq.ROUTER, ctlAddr, zmode, 0, nil); err != nil {
		ep.pub.Close()
		return err
	}
	if e.Guard {
		for _, g := range []struct {
			addr, inner string
			frame       uint64
			frames      int
			subs        bool
		}{{e.Events, evAddr, maxSubscriptionBytes, wireFramesEvents, true}, {e.Control, ctlAddr, maxMessageBytes, wireFramesControl, false}} {
			path, ok := strings.CutPrefix(g.addr, "ipc://")
			var gd *guard
			if ok {
				gd, err = startGuard(path, strings.TrimPrefix(g.inner, "ipc://"), mode, g.frame, g.frames, g.subs)
			} else {
				err = errors.New("a guarded endpoint must be ipc")
			}
			if err != nil {
				for _, gd := range ep.guards {
					gd.close()
				}
				ep.pub.Close()
				ep.ctl.Close()
				return fmt.Errorf("zmqbridge: binding %s: %w", g.addr, err)
			}
			ep.guards = append(ep.guards, gd)
		}
	}
	es.mu.Lock()
	defer es.mu.Unlock()
	es.byKey[key] = ep
	es.relistLocked()
	return nil
}

// relistLocked replaces list after a change of byKey.
func (es *endpoints) relistLocked() {
	l := make([]*endpoint, 0, len(es.byKey))
	for _, ep := range es.byKey {
		l = append(l, ep)
	}
	es.list.Store(&l)
}

// Socket limits. A subscription message is a topic prefix (<kind>/<namespace>/<pvc>
// is at most ~330 bytes); a control request at most maxRequestBytes.
const (
	maxSubscriptionBytes = 1 << 10
	controlRcvHWM        = 100
)

// socket makes a socket and binds it; watch, if set, runs just before the bind.
func (es *endpoints) socket(t zmq.Type, addr string, mode os.FileMode, hwm int, watch func(*zmq.Socket) error) (*zmq.Socket, error) {
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
	// A peer sending a larger message (a frame) is disconnected by libzmq.
	switch t {
	case zmq.XPUB:
		// Manual mode: the publish goroutine applies (and counts) each
		// subscription; verboser: every subscription of a peer that leaves
		// comes back as an unsubscription, so the count stays exact.
		s.SetXpubManual(1)
		s.SetXpubVerboser(1)
		s.SetSndhwm(hwm)
		s.SetMaxmsgsize(maxSubscriptionBytes)
		s.SetRcvhwm(1000)
	case zmq.ROUTER:
		s.SetMaxmsgsize(maxMessageBytes)
		s.SetRcvhwm(controlRcvHWM)
		s.SetSndhwm(1000) // replies to a client that does not read are dropped
	}
	if watch != nil {
		if err := watch(s); err != nil {
			s.Close()
			return nil, fmt.Errorf("zmqbridge: monitoring %s: %w", addr, err)
		}
	}
	if err := bindWithMode(s, addr, mode); err != nil {
		s.Close()
		return nil, fmt.Errorf("zmqbridge: binding %s: %w", addr, err)
	}
	return s, nil
}

// bindWithMode binds s. An ipc socket file gets mode through the umask of
// the binding thread (a thread of its own, with its own umask: CLONE_FS
// unshared), never through a chmod of its path, which a symlink swapped in
// could redirect. A stale socket file of a crashed run is removed first.
func bindWithMode(s *zmq.Socket, addr string, mode os.FileMode) error {
	path, isIPC := strings.CutPrefix(addr, "ipc://")
	if !isIPC {
		return s.Bind(addr)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
	}
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread, with its private umask, ends with
		// this goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			errc <- fmt.Errorf("a private umask for the binding thread: %w", err)
			return
		}
		unix.Umask(int(^mode.Perm() & 0o777))
		errc <- s.Bind(addr)
	}()
	return <-errc
}

// snapshot lists the endpoints; the caller must not change the slice.
func (es *endpoints) snapshot() []*endpoint {
	if l := es.list.Load(); l != nil {
		return *l
	}
	return nil
}

// publish sends a record on every endpoint that may see it (publish goroutine).
func (es *endpoints) publish(r Record) {
	v := recordView{Record: r}
	for _, ep := range es.snapshot() {
		if !ep.observe(&v) {
			continue
		}
		// Two plain sends: SendMessage's variadic interface{} costs per
		// event. zmq_send copies the topic's bytes: no copy of them here.
		_, err := ep.pub.SendBytes(unsafe.Slice(unsafe.StringData(r.Topic), len(r.Topic)), zmq.SNDMORE|zmq.DONTWAIT)
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
	es.relistLocked()
	if ep != nil {
		es.dying = append(es.dying, ep) // closeAll closes it if the loops stop first
	}
	es.mu.Unlock()
	if ep == nil {
		return
	}
	es.b.pool.drop(ep)
	for _, g := range ep.guards {
		g.close()
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
			if ep.Guard {
				os.Remove(es.b.internalPath(a))
			}
		}
	}
}

// closeAll closes every socket, including those of endpoints whose removal
// the stopping loops did not carry out; only after the loops have stopped.
func (es *endpoints) closeAll() {
	es.mu.Lock()
	defer es.mu.Unlock()
	for k, ep := range es.byKey {
		for _, g := range ep.guards {
			g.close()
		}
		ep.pub.Close()
		ep.ctl.Close()
		delete(es.byKey, k)
	}
	es.relistLocked()
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
