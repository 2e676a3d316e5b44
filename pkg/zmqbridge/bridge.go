package zmqbridge

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	zmq "github.com/pebbe/zmq4"
	"k8s.io/klog/v2"
)

// Options configure a Bridge.
type Options struct {
	// Dir holds events.sock, control.sock and (by default) the journal.
	Dir string
	// SocketMode is the mode of the socket files (default 0600).
	SocketMode os.FileMode
	// Node and Driver fill every event's node and driver fields.
	Node, Driver string
	// Heartbeat is the heartbeat interval (default 1s).
	Heartbeat time.Duration
	// Journal configures the journal; its Dir defaults to Dir/journal.
	Journal JournalOptions
	// Flusher answers flush requests; nil refuses them.
	Flusher Flusher
	// Metrics, if set, is told what the bridge does.
	Metrics Metrics
	// Curve, if set, adds the authenticated TCP endpoint.
	Curve *CurveOptions

	// Limits (0: the Default... constants). MaxEndpoints bounds the
	// endpoints added besides the node's own (and sizes the ZeroMQ
	// context's socket limit); MaxSubscriptions the subscriptions one
	// endpoint holds at once; Workers the replays and flushes served at
	// once, Queue the requests one endpoint may have waiting for them; an
	// endpoint may start FlushRate flushes a second, in bursts of FlushBurst.
	MaxEndpoints, MaxSubscriptions, Workers, Queue int
	FlushRate                                      float64
	FlushBurst                                     int
}

func (o *Options) defaults() {
	for _, d := range []struct {
		v   *int
		def int
	}{{&o.MaxEndpoints, DefaultMaxEndpoints}, {&o.MaxSubscriptions, DefaultMaxSubscriptions},
		{&o.Workers, DefaultWorkers}, {&o.Queue, DefaultQueue}, {&o.FlushBurst, DefaultFlushBurst}} {
		if *d.v <= 0 {
			*d.v = d.def
		}
	}
	if o.FlushRate <= 0 {
		o.FlushRate = DefaultFlushRate
	}
}

// FlushRequest names the volume a control client wants flushed.
type FlushRequest struct {
	VolumeID, PVC, Namespace string
	// Allowed reports whether the asker may flush a volume of a PVC namespace
	// ("" for a volume without PVC). The Flusher must refuse what it denies,
	// exactly as it refuses a volume that is not there.
	Allowed func(namespace, volumeID string) bool
}

// Flusher flushes a volume and publishes its ack event (through Emit),
// returning the ack's sequence number and how long the flush took. An *Error
// chooses the reply's code (docs/events.md); other errors are "internal".
type Flusher interface {
	Flush(ctx context.Context, req FlushRequest) (seq uint64, flushMs float64, err error)
}

// Metrics receives counts from the bridge; every method must return at once.
type Metrics interface {
	EventPublished(kind string)
	ReplayServed()
	JournalSynced(d time.Duration, bytes int64)
	Subscribers(delta int)
}

// Bridge journals and publishes events. Emit is safe for concurrent use; each
// ZeroMQ socket is owned by exactly one goroutine.
type Bridge struct {
	opts    Options
	journal *Journal
	zctx    *zmq.Context

	synced atomic.Uint64 // highest fsynced sequence
	recent tail          // recent records, published from memory
	epoch  string        // the journal's epoch
	// published is the highest sequence the publisher sent; pubWake is
	// closed (and replaced) when it advances while pubWaiters wait for it.
	pubMu      sync.Mutex
	published  uint64
	pubWake    chan struct{}
	pubWaiters int
	// Close: closing refuses new endpoints; adds counts AddEndpoint calls
	// under way; workers counts replay and flush workers, which use zctx
	// only under zmu's read lock and not once zdead is set.
	closeMu   sync.Mutex
	closing   bool
	adds      sync.WaitGroup
	workers   sync.WaitGroup
	zmu       sync.RWMutex
	zdead     bool
	ctx       context.Context // canceled by Close: flushes in progress end
	cancel    context.CancelFunc
	open      atomic.Pointer[Journal] // the journal, once OpenJournal returned
	pool      *pool                   // replay and flush workers
	wakePub   chan struct{}           // new synced records to publish
	endpoints *endpoints
	// refusedSubs and refusedKeys log refused subscriptions and CURVE
	// handshakes, rate-limited.
	refusedSubs, refusedKeys rateLog
	// CURVE endpoint state (nil without Options.Curve).
	curveKeys   *keyring
	curveSecret atomic.Value         // string: the server's Z85 secret key
	curveMons   chan *monitor        // the CURVE events socket's monitor, for zapLoop
	curveCuts   chan map[string]bool // keys whose connections zapLoop must cut
	stop        chan struct{}
	wg          sync.WaitGroup
	closeOnce   sync.Once
}

// New opens the journal, binds the node-wide endpoints in opts.Dir and starts
// the publisher, committer and control goroutines.
func New(opts Options) (*Bridge, error) {
	if opts.Dir == "" || opts.Node == "" {
		return nil, errors.New("zmqbridge: Dir and Node are required")
	}
	if opts.SocketMode == 0 {
		opts.SocketMode = 0o600
	}
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = time.Second
	}
	if opts.Journal.Dir == "" {
		opts.Journal.Dir = filepath.Join(opts.Dir, "journal")
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, err
	}
	opts.defaults()
	b := &Bridge{opts: opts, wakePub: make(chan struct{}, 1), stop: make(chan struct{}), pubWake: make(chan struct{})}
	b.pool = newPool(b)
	b.ctx, b.cancel = context.WithCancel(context.Background())
	// The journal's group committer tells the publisher directly what became
	// durable: one hand-off from fsync to publication. Records enter the
	// in-memory tail under the journal's lock, in sequence order, so a
	// repair that gives sequence numbers again never leaves a stale one there.
	b.opts.Journal.OnSynced = b.onSynced
	b.opts.Journal.OnAppend = b.recent.put
	b.opts.Journal.OnRewind = b.recent.rewind
	// Retention keeps each namespace's newest events, so that no namespace
	// can push all of another's out of the journal.
	b.opts.Journal.Class = recordNamespace
	if b.opts.Journal.KeepPerClass == 0 {
		b.opts.Journal.KeepPerClass = DefaultKeepPerNamespace
	}
	j, err := OpenJournal(b.opts.Journal)
	if err != nil {
		b.cancel()
		return nil, fmt.Errorf("zmqbridge: opening journal: %w", err)
	}
	b.epoch = j.Epoch()
	zctx, err := zmq.NewContext()
	if err == nil {
		err = zctx.SetMaxSockets(b.opts.maxSockets())
	}
	if err != nil {
		b.cancel()
		j.Close()
		return nil, err
	}
	b.journal, b.zctx = j, zctx
	b.open.Store(j)
	b.synced.Store(j.Last())
	b.published = j.Last()
	b.endpoints = newEndpoints(b)
	if err := b.endpoints.add("", Endpoint{
		Events:  "ipc://" + filepath.Join(opts.Dir, "events.sock"),
		Control: "ipc://" + filepath.Join(opts.Dir, "control.sock"),
		Scope:   Scope{All: true},
	}); err != nil {
		b.cancel()
		b.endpoints.closeAll()
		zctx.Term()
		j.Close()
		return nil, err
	}
	if opts.Curve != nil {
		if err := b.startCurve(); err != nil {
			close(b.stop)
			b.cancel()
			b.wg.Wait()
			b.endpoints.closeAll()
			zctx.Term()
			j.Close()
			return nil, err
		}
	}
	b.wg.Add(3)
	go b.maintainLoop()
	go b.publishLoop()
	go b.controlLoop()
	b.workers.Add(b.opts.Workers)
	for i := 0; i < b.opts.Workers; i++ {
		go b.worker()
	}
	klog.InfoS("event bridge started", "dir", opts.Dir, "lastSeq", j.Last(), "firstSeq", j.First(), "epoch", b.epoch)
	return b, nil
}

// startCurve loads the keys, starts the ZAP handler and binds the TCP endpoint.
func (b *Bridge) startCurve() error {
	c := b.opts.Curve
	server, err := os.ReadFile(c.ServerKeyFile)
	if err != nil {
		return fmt.Errorf("zmqbridge: %w", err)
	}
	secret, _, err := parseServerKey(c.ServerKeyFile, server)
	if err != nil {
		return fmt.Errorf("zmqbridge: %w", err)
	}
	clients, err := os.ReadFile(c.ClientsFile)
	if err != nil {
		return fmt.Errorf("zmqbridge: %w", err)
	}
	keys, err := parseClients(clients)
	if err != nil {
		return fmt.Errorf("zmqbridge: %w", err)
	}
	b.curveKeys = &keyring{}
	b.curveMons, b.curveCuts = make(chan *monitor), make(chan map[string]bool)
	b.curveKeys.keys.Store(&keys)
	b.curveSecret.Store(secret)
	ready := make(chan error, 1)
	b.wg.Add(1)
	go b.zapLoop(ready)
	if err := <-ready; err != nil {
		return fmt.Errorf("zmqbridge: ZAP handler: %w", err)
	}
	if err := b.endpoints.add(curveKey, b.curveEndpoint()); err != nil {
		return err
	}
	b.wg.Add(1)
	go b.watchCurve(clients, server) // the bytes applied: a change since is a change
	klog.InfoS("CURVE event endpoint bound", "events", b.curveEndpoint().Events, "control", b.curveEndpoint().Control, "clients", len(keys))
	return nil
}

// Emit journals ev and returns its sequence number once the record is
// durable (group-committed fsync). It never waits for subscribers. If the
// journal has failed (disk full, EIO), Emit first has it repaired (Repair)
// and fails, wrapping ErrUnavailable, if that does not work: the caller's
// operation must then fail too, so that it is retried, and its event emitted,
// once the journal works. ctx bounds the wait.
func (b *Bridge) Emit(ctx context.Context, ev Event) (uint64, error) {
	rec, err := b.append(ev)
	if errors.Is(err, ErrUnavailable) {
		if rerr := b.journal.Repair(ctx); rerr == nil {
			rec, err = b.append(ev)
		}
	}
	if err != nil {
		return 0, err
	}
	if err := b.journal.SyncRecord(ctx, rec); err != nil {
		return 0, fmt.Errorf("zmqbridge: journaling %s event: %w", ev.Kind, err)
	}
	return rec.Seq, nil
}

// EmitAsync journals ev and returns before it is written: the journal's
// committer writes it within one group commit (from then on it survives a
// process crash) and fsyncs it, then it is published once durable. If that
// write fails, the event is lost and the journal fails (see Healthy).
func (b *Bridge) EmitAsync(ev Event) (uint64, error) {
	rec, err := b.append(ev)
	if err != nil {
		return 0, err
	}
	b.journal.RequestSync(rec.Seq)
	return rec.Seq, nil
}

// append journals ev (the journal puts it in the in-memory tail).
func (b *Bridge) append(ev Event) (Record, error) {
	ev.V, ev.Node, ev.Epoch = Version, b.opts.Node, b.epoch
	if ev.Driver == "" {
		ev.Driver = b.opts.Driver
	}
	// One allocation for the topic and the JSON: neither changes once built.
	buf := ev.appendTopic(make([]byte, 0, 416))
	topic := unsafe.String(unsafe.SliceData(buf), len(buf))
	rec, err := b.journal.Append(topic, func(seq uint64) []byte {
		ev.Seq, ev.Time = seq, ""
		return ev.appendJSON(buf[len(buf):], time.Now())
	})
	if err != nil {
		return Record{}, fmt.Errorf("zmqbridge: journaling %s event: %w", ev.Kind, err)
	}
	return rec, nil
}

// Healthy reports the journal's failure, if it has failed and was not
// repaired since (nothing new is journaled or published meanwhile). It never
// waits for the journal's I/O.
func (b *Bridge) Healthy() error {
	if err := b.journal.Err(); err != nil {
		return fmt.Errorf("event journal failed: %w", err)
	}
	return nil
}

// Epoch is the journal's epoch, carried in every event, heartbeat and
// control reply: it changes only when the journal is created anew.
func (b *Bridge) Epoch() string { return b.epoch }

// Last is the sequence number of the last journaled event.
func (b *Bridge) Last() uint64 { return b.journal.Last() }

// onSynced runs on the journal's committer after each fsync: it publishes
// (through the publish goroutine) what became durable.
func (b *Bridge) onSynced(seq uint64, took time.Duration) {
	for {
		cur := b.synced.Load()
		if seq <= cur || b.synced.CompareAndSwap(cur, seq) {
			break
		}
	}
	if j := b.open.Load(); j != nil && b.opts.Metrics != nil { // nil while the journal recovers
		b.opts.Metrics.JournalSynced(took, j.Bytes())
	}
	b.poke(b.wakePub)
	// The publisher now waits in this processor's run queue; let it run
	// before the committer takes the processor into its next fsync.
	runtime.Gosched()
}

// maintainLoop lets the journal apply retention once a minute.
func (b *Bridge) maintainLoop() {
	defer b.wg.Done()
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
			if b.journal.Err() != nil {
				// A failed journal comes back by itself once the disk does.
				ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
				_ = b.journal.Repair(ctx)
				cancel()
			}
			if err := b.journal.Maintain(); err != nil {
				klog.ErrorS(err, "event journal retention")
			}
		}
	}
}

func (b *Bridge) poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// publishLoop owns the PUB sockets: it publishes durable records in sequence
// order and heartbeats.
func (b *Bridge) publishLoop() {
	defer b.wg.Done()
	published := b.journal.Last() // events before start were published by an earlier run, or are replayable
	hb := time.NewTicker(b.opts.Heartbeat)
	defer hb.Stop()
	// Subscription requests arrive on the XPUB sockets, which only this
	// goroutine may read: look every 10 ms.
	subTicker := time.NewTicker(10 * time.Millisecond)
	defer subTicker.Stop()
	subs := subTicker.C
	var batch []Record // reused: its records are overwritten each round
	b.endpoints.heartbeat(published)
	for {
		select {
		case <-b.stop:
			return
		case <-hb.C:
			b.endpoints.heartbeat(published)
			continue
		case <-subs:
			for _, ep := range b.endpoints.snapshot() {
				b.applySubscriptions(ep)
			}
			continue
		case <-b.wakePub:
		case cmd := <-b.endpoints.pubCmds:
			cmd()
			continue
		}
		for published < b.synced.Load() {
			synced := b.synced.Load()
			// A bounded batch: get holds the tail's lock, which Append
			// (under the journal's lock) needs for every new record.
			batch = b.recent.get(published, min(synced, published+publishBatch), batch[:0])
			if len(batch) == 0 { // fell out of the ring (or a concurrent append is not in it yet): read the journal
				recs, err := b.journal.Read(published, 1000)
				if err != nil {
					klog.ErrorS(err, "reading the event journal to publish")
					published = synced // subscribers recover the rest by replay
					b.setPublished(published)
					break
				}
				for _, r := range recs {
					if r.Seq <= synced {
						batch = append(batch, r)
					}
				}
				if len(batch) == 0 {
					break
				}
			}
			for _, r := range batch {
				if beforePublish != nil {
					beforePublish(r)
				}
				b.endpoints.publish(r)
				published = r.Seq
			}
			b.setPublished(published)
		}
	}
}

// publishBatch is the most records the publisher takes from the tail at once.
const publishBatch = 256

// beforePublish, if set (tests only), runs before each record is published.
var beforePublish func(Record)

// setPublished records how far the publisher got and wakes waitPublished.
func (b *Bridge) setPublished(seq uint64) {
	b.pubMu.Lock()
	if seq > b.published {
		b.published = seq
		if b.pubWaiters > 0 {
			close(b.pubWake)
			b.pubWake = make(chan struct{})
		}
	}
	b.pubMu.Unlock()
}

// waitPublished waits until the event seq was sent on the PUB sockets.
func (b *Bridge) waitPublished(ctx context.Context, seq uint64) error {
	b.pubMu.Lock()
	b.pubWaiters++
	b.pubMu.Unlock()
	defer func() {
		b.pubMu.Lock()
		b.pubWaiters--
		b.pubMu.Unlock()
	}()
	for {
		b.pubMu.Lock()
		done, wake := b.published >= seq, b.pubWake
		b.pubMu.Unlock()
		if done {
			return nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		case <-b.stop:
			return errStopped
		}
	}
}

// AddEndpoint binds another endpoint (e.g. a pod's), under a key for
// RemoveEndpoint. Once Close has begun it refuses (errStopped).
func (b *Bridge) AddEndpoint(key string, e Endpoint) error {
	if key == "" {
		return errors.New("zmqbridge: empty endpoint key")
	}
	b.closeMu.Lock()
	if b.closing {
		b.closeMu.Unlock()
		return errStopped
	}
	b.adds.Add(1)
	b.closeMu.Unlock()
	defer b.adds.Done()
	return b.endpoints.add(key, e)
}

// RemoveEndpoint closes an endpoint and removes its socket files.
func (b *Bridge) RemoveEndpoint(key string) { b.endpoints.remove(key) }

// Close refuses new endpoints, stops the goroutines, ends the flushes in
// progress (their context is canceled) and waits for the replay and flush
// workers (at most workerGrace: a worker still running after that, stuck in
// a Flusher, can no longer use the ZeroMQ context), closes the sockets
// (linger 0: nothing journaled is lost, subscribers replay) and syncs and
// closes the journal.
func (b *Bridge) Close() error {
	var err error
	b.closeOnce.Do(func() {
		b.closeMu.Lock()
		b.closing = true
		b.closeMu.Unlock()
		close(b.stop)
		b.pool.stop()
		b.cancel()
		b.adds.Wait()
		b.wg.Wait()
		done := make(chan struct{})
		go func() { b.workers.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(workerGrace):
			klog.InfoS("event bridge stopping with replay or flush workers still running", "waited", workerGrace)
		}
		b.zmu.Lock()
		b.zdead = true
		b.zmu.Unlock()
		b.endpoints.closeAll()
		b.zctx.Term()
		err = b.journal.Close()
		klog.InfoS("event bridge stopped", "lastSeq", b.journal.Last())
	})
	return err
}

// workerGrace is how long Close waits for replay and flush workers.
const workerGrace = 5 * time.Second
