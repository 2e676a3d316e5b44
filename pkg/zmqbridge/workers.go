package zmqbridge

import (
	"slices"
	"sync"
	"time"
)

// busyMessage goes with CodeBusy: the request found its endpoint's queue
// full, or came faster than the endpoint's flush rate.
const busyMessage = "busy: this endpoint has too many requests waiting or flushes too fast; retry later"

// job is one control request waiting for, or run by, a worker.
type job struct {
	ep  *endpoint
	req Request
	v   viewer
	// envelopes of every requester the job answers (coalesced flushes).
	envelopes [][][]byte
	key       flushKey
}

// flushKey names the flushes that coalesce: the same volume asked by the
// same requester (endpoint and client key) gets one flush.
type flushKey struct {
	v                        viewer
	volumeID, pvc, namespace string
}

// pool is the fixed set of workers that answer replays and flushes. Each
// endpoint has a queue of its own (at most Options.Queue requests); workers
// take from the endpoints in turn, so a busy endpoint cannot starve others.
type pool struct {
	b     *Bridge
	mu    sync.Mutex
	cond  *sync.Cond
	ready []*endpoint // endpoints with queued jobs, in turn order
	done  bool
}

func newPool(b *Bridge) *pool {
	p := &pool{b: b}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// submit queues a request (control goroutine). It returns false when the
// endpoint's queue is full or its flush rate is exceeded: the caller replies busy.
// A flush of a volume whose flush by the same requester is still queued
// joins it.
func (p *pool) submit(ep *endpoint, envelope [][]byte, req Request, v viewer) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return false
	}
	j := &job{ep: ep, req: req, v: v, envelopes: [][][]byte{envelope}}
	if req.Op == "flush" {
		j.key = flushKey{v: v, volumeID: req.VolumeID, pvc: req.PVC, namespace: req.Namespace}
		if q := ep.flushes[j.key]; q != nil {
			if len(q.envelopes) >= p.b.opts.Queue*4 {
				return false
			}
			q.envelopes = append(q.envelopes, envelope)
			return true
		}
		if len(ep.queue) >= p.b.opts.Queue || !ep.bucket.take(time.Now()) {
			return false
		}
		ep.flushes[j.key] = j
	} else if len(ep.queue) >= p.b.opts.Queue {
		return false
	}
	ep.queue = append(ep.queue, j)
	if !ep.queued {
		ep.queued = true
		p.ready = append(p.ready, ep)
	}
	p.cond.Signal()
	return true
}

// maxRunning is how many workers one endpoint may hold at once: the others
// stay free for other endpoints however long its flushes take.
func (p *pool) maxRunning() int { return max(1, p.b.opts.Workers/2) }

// next waits for a job: the first runnable one of the first endpoint in
// turn that holds fewer than maxRunning workers. A flush whose volume the same
// requester is flushing already waits for that flush to end (meanwhile
// requests join it), so flushes of one volume coalesce.
func (p *pool) next() *job {
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.done {
		for i, ep := range p.ready {
			if ep.running >= p.maxRunning() {
				continue
			}
			k := slices.IndexFunc(ep.queue, func(j *job) bool { return j.req.Op != "flush" || !ep.flushing[j.key] })
			if k < 0 {
				continue
			}
			j := ep.queue[k]
			ep.queue = slices.Delete(ep.queue, k, k+1)
			ep.running++
			p.ready = slices.Delete(p.ready, i, i+1)
			if len(ep.queue) > 0 {
				p.ready = append(p.ready, ep) // its next job after the others' turn
			} else {
				ep.queued = false
			}
			if j.req.Op == "flush" {
				delete(ep.flushes, j.key) // started: later requests need a flush of their own
				ep.flushing[j.key] = true
			}
			return j
		}
		p.cond.Wait()
	}
	return nil
}

// finished returns the worker a job held.
func (p *pool) finished(j *job) {
	p.mu.Lock()
	defer p.mu.Unlock()
	j.ep.running--
	if j.req.Op == "flush" {
		delete(j.ep.flushing, j.key)
	}
	p.cond.Broadcast()
}

// drop forgets an endpoint's queued jobs (it is being removed).
func (p *pool) drop(ep *endpoint) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ep.queue, ep.flushes = nil, map[flushKey]*job{}
	if ep.queued {
		ep.queued = false
		for i, e := range p.ready {
			if e == ep {
				p.ready = append(p.ready[:i], p.ready[i+1:]...)
				break
			}
		}
	}
}

// stop wakes every worker to return.
func (p *pool) stop() {
	p.mu.Lock()
	p.done = true
	p.mu.Unlock()
	p.cond.Broadcast()
}

// worker answers jobs until the bridge stops; flushes in progress end when
// Close cancels b.ctx.
func (b *Bridge) worker() {
	defer b.workers.Done()
	for {
		j := b.pool.next()
		if j == nil {
			return
		}
		var reply any
		switch j.req.Op {
		case "replay":
			reply = b.replay(j.req, j.v)
			if m := b.opts.Metrics; m != nil {
				m.ReplayServed()
			}
		case "flush":
			reply = b.flush(j.req, j.v)
		}
		b.replyFlush(j.ep, j.envelopes, reply)
		b.pool.finished(j)
	}
}
