package rbd

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Purger tuning: how many purges wait in memory at most (more wait in the
// journals only, for the next scan), how often a pool's journal is scanned
// for purges a previous process left, how long a failed purge waits, and
// how long the controller must have been idle (no call opened a pool) before
// purges are handed to the mgr, unless they waited purgeMaxDelay already: a
// removal competes with the calls for the OSDs, so a burst of deletes answers
// first and gets its space back right after.
const (
	purgeQueue    = 4096
	purgeRescan   = 10 * time.Minute
	purgeBackoff  = 30 * time.Second
	purgeQuiet    = 300 * time.Millisecond
	purgeMaxDelay = 30 * time.Second
	// A trashed image that clones still depend on (a volume or snapshot
	// deleted before the volumes made from it) is checked again after
	// cloneWaitMin, doubling up to cloneWaitMax, and handed to the mgr once
	// its last clone is gone.
	cloneWaitMin = 5 * time.Second
	cloneWaitMax = 5 * time.Minute
)

// purger hands trashed images to the mgr after DeleteVolume answered. Its
// work is recorded in each pool's journal (Journal.Release with a trash id),
// so a restarted driver finds it again: a pool's journal is scanned the first
// time a call opens the pool, and every purgeRescan after.
type purger struct {
	busy     atomic.Int64 // UnixNano of the last call that opened a pool
	draining atomic.Bool  // no more waiting for quiet: the process stops
	once     sync.Once
	jobs     chan purgeJob
	mu       sync.Mutex
	pending  map[string]bool      // jobs queued, running or waiting for clones
	waiting  map[string]bool      // jobs waiting for clones (Drain does not wait for them)
	scanned  map[string]time.Time // pools, by poolKey
}

// purgeJob is the removal of one trash entry, or (image "") a scan of a pool's journal.
type purgeJob struct {
	conns     *rcsi.Conns
	cluster   rcsi.ClusterConfig
	creds     rcsi.Credentials
	pool      string
	image, id string
	queued    time.Time
	cloneWait time.Duration // the last wait for clones, 0 if none yet
}

func (j purgeJob) poolKey() string {
	return j.cluster.ClusterID + "\x00" + j.cluster.MonHost() + "\x00" + j.pool + "\x00" + j.cluster.RBD.RadosNamespace
}

func (j purgeJob) key() string { return j.poolKey() + "\x00" + j.image }

func (p *purger) start() {
	p.once.Do(func() {
		p.jobs = make(chan purgeJob, purgeQueue)
		p.pending = map[string]bool{}
		p.waiting = map[string]bool{}
		p.scanned = map[string]time.Time{}
		for i := 0; i < 2; i++ {
			go p.work()
		}
	})
}

// add queues j unless it is already queued; a full queue drops it (the
// journal still has it: a later scan finds it).
func (p *purger) add(j purgeJob) {
	p.start()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pending[j.key()] {
		return
	}
	select {
	case p.jobs <- j:
		p.pending[j.key()] = true
	default:
		delete(p.scanned, j.poolKey())
		klog.InfoS("purge queue full: the purge waits in the journal for a later scan", "image", j.image, "pool", j.pool)
	}
}

// requeue queues j, which is pending already, again; a full queue leaves it
// to the journal and a later scan.
func (p *purger) requeue(j purgeJob) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.waiting, j.key())
	select {
	case p.jobs <- j:
	default:
		delete(p.pending, j.key())
		delete(p.scanned, j.poolKey())
	}
}

// purgeLater queues the purge of trash entry id, which Journal.Release recorded.
func (c *Controller) purgeLater(t *target, image, id string) {
	c.purger.add(purgeJob{conns: c.Conns, cluster: t.cluster, creds: t.creds, pool: t.pool, image: image, id: id, queued: time.Now()})
}

// waitQuiet waits until no call opened a pool for purgeQuiet, or until j
// waited purgeMaxDelay.
func (p *purger) waitQuiet(j purgeJob) {
	for {
		idle := time.Since(time.Unix(0, p.busy.Load()))
		if p.draining.Load() || idle >= purgeQuiet || time.Since(j.queued) >= purgeMaxDelay {
			return
		}
		time.Sleep(purgeQuiet - idle)
	}
}

// scanPurges queues a scan of t's pool for purges a previous process left,
// unless the pool was scanned within purgeRescan.
func (c *Controller) scanPurges(t *target) {
	c.purger.busy.Store(time.Now().UnixNano())
	j := purgeJob{conns: c.Conns, cluster: t.cluster, creds: t.creds, pool: t.pool}
	c.purger.start()
	c.purger.mu.Lock()
	last, ok := c.purger.scanned[j.poolKey()]
	due := !ok || time.Since(last) > purgeRescan
	if due {
		c.purger.scanned[j.poolKey()] = time.Now()
	}
	c.purger.mu.Unlock()
	if due {
		c.purger.add(j)
	}
}

func (p *purger) work() {
	for j := range p.jobs {
		err := p.run(j)
		if errors.Is(err, errHasClones) {
			// Still pending while it waits, so that a rescan does not
			// start a second wait for it.
			j.cloneWait = min(max(2*j.cloneWait, cloneWaitMin), cloneWaitMax)
			klog.V(3).InfoS("purge waits for the image's clones", "pool", j.pool, "image", j.image, "trashID", j.id, "checkIn", j.cloneWait)
			p.mu.Lock()
			p.waiting[j.key()] = true
			p.mu.Unlock()
			time.AfterFunc(j.cloneWait, func() { p.requeue(j) })
			continue
		}
		p.mu.Lock()
		delete(p.pending, j.key())
		p.mu.Unlock()
		switch {
		case err != nil && j.image == "":
			// The next call that opens the pool after purgeRescan scans again.
			klog.ErrorS(err, "scanning a pool for purges failed", "cluster", j.cluster.ClusterID, "pool", j.pool)
		case err != nil:
			klog.ErrorS(err, "purge failed; trying again later", "cluster", j.cluster.ClusterID, "pool", j.pool, "image", j.image, "retryIn", purgeBackoff)
			time.AfterFunc(purgeBackoff, func() { p.add(j) })
		}
	}
}

func (p *purger) run(j purgeJob) error {
	if j.image != "" {
		p.waitQuiet(j)
	}
	ctx, cancel := context.WithTimeout(context.Background(), rcsi.ConnTimeout)
	defer cancel()
	lease, err := j.conns.Acquire(ctx, j.cluster, j.creds)
	if err != nil {
		return err
	}
	defer lease.Release()
	io, err := lease.IOContext(j.pool, j.cluster.RBD.RadosNamespace)
	if err != nil {
		return lease.Check(err)
	}
	journal := NewJournal(io)
	if j.image == "" {
		left, err := journal.Purges(purgeQueue)
		if err != nil {
			return lease.Check(err)
		}
		for image, id := range left {
			klog.V(2).InfoS("found a purge a previous process left", "pool", j.pool, "image", image, "trashID", id)
			j.image, j.id, j.queued = image, id, time.Now()
			p.add(j)
		}
		return nil
	}
	start := time.Now()
	if clones, err := trashedHasClones(io, j.id); err != nil {
		return lease.Check(err)
	} else if clones {
		return errHasClones
	}
	if err := queuePurge(io, lease.Conn(), j.pool, j.cluster.RBD.RadosNamespace, j.image, j.id); err != nil {
		return lease.Check(err)
	}
	rcsi.CrashPoint("purge-after-task")
	if err := journal.Purged(j.image); err != nil {
		return lease.Check(err)
	}
	klog.V(3).InfoS("purge queued with the mgr", "pool", j.pool, "image", j.image, "trashID", j.id, "duration", time.Since(start))
	return nil
}

// Drain hands the queued purges to the mgr at once, for at most timeout, as
// the process stops; what is left stays recorded in the journals for the
// next process.
func (c *Controller) Drain(timeout time.Duration) {
	c.purger.draining.Store(true)
	deadline := time.Now().Add(timeout)
	for {
		c.purger.mu.Lock()
		n := len(c.purger.pending) - len(c.purger.waiting)
		c.purger.mu.Unlock()
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			klog.InfoS("purges left in the journals for the next start", "count", n)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ScanAtStart looks for purges a previous process left in every pool of
// every cluster whose credentials are known (a credentials directory), in
// the background; other pools are scanned when a call first opens them.
func (c *Controller) ScanAtStart() {
	if c.Known == nil {
		return
	}
	go func() {
		for _, clusterID := range c.Clusters.IDs() {
			ctx, cancel := context.WithTimeout(context.Background(), rcsi.ConnTimeout)
			lease, cluster, err := c.knownConn(ctx, clusterID)
			cancel()
			if err != nil {
				continue
			}
			creds, _ := c.Known.For(clusterID)
			pools, err := lease.Conn().ListPools()
			if err != nil {
				lease.Check(err)
				klog.InfoS("scan for purges at start: cannot list pools", "cluster", clusterID, "err", err)
			}
			for _, pool := range pools {
				c.scanPurges(&target{cluster: cluster, creds: creds, pool: pool})
			}
			lease.Release()
		}
	}()
}
