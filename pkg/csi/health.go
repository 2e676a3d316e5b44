package csi

import (
	"context"
	"fmt"
	"time"
)

// Check reports whether every cached Ceph connection still reaches its
// monitors: each asks for the latest OSD map, with ctx bounding the wait. No
// connection yet is healthy (connections are made on first use). A connection
// the ping finds broken is dropped (see Lease.Check), so the next call
// reconnects.
func (c *Conns) Check(ctx context.Context) error {
	c.mu.Lock()
	var entries []*connEntry
	for _, e := range c.conns {
		entries = append(entries, e)
	}
	c.mu.Unlock()
	for _, e := range entries {
		select {
		case <-e.ready:
		default:
			continue // still connecting: the call that started it reports
		}
		if e.conn == nil {
			continue
		}
		if err := c.ping(ctx, e); err != nil {
			return err
		}
	}
	return nil
}

// ping runs one monitor round trip at a time per connection; a check that
// finds one in flight waits for its result instead of adding another. The
// round trip holds a lease, so the connection is not shut down under it.
func (c *Conns) ping(ctx context.Context, e *connEntry) error {
	e.pingMu.Lock()
	if e.pinging == nil {
		e.mu.Lock()
		if e.dropped {
			// Dropped (and maybe closed) since the snapshot: the next
			// call makes a new connection, nothing to check here.
			e.mu.Unlock()
			e.pingMu.Unlock()
			return nil
		}
		e.leases++
		e.mu.Unlock()
		lease := &Lease{c: c, e: e}
		done := make(chan struct{})
		e.pinging = done
		go func() {
			defer lease.Release()
			start := time.Now()
			err := lease.Check(e.conn.WaitForLatestOSDMap())
			e.pingMu.Lock()
			e.pingErr = err
			if err != nil {
				e.pingErr = fmt.Errorf("ceph monitors unreachable (%s): %w", time.Since(start).Round(time.Millisecond), err)
			}
			e.pinging = nil
			e.pingMu.Unlock()
			close(done)
		}()
	}
	done := e.pinging
	e.pingMu.Unlock()
	select {
	case <-done:
		e.pingMu.Lock()
		defer e.pingMu.Unlock()
		return e.pingErr
	case <-ctx.Done():
		return fmt.Errorf("ceph monitors did not answer within the health check's deadline: %w", ctx.Err())
	}
}
