package csi

import (
	"context"
	"fmt"
	"time"
)

// Check reports whether every cached Ceph connection still reaches its
// monitors: each asks for the latest OSD map, with ctx bounding the wait. No
// connection yet is healthy (connections are made on first use).
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
		if err := e.ping(ctx); err != nil {
			return err
		}
	}
	return nil
}

// ping runs one monitor round trip at a time per connection; a check that
// finds one in flight waits for its result instead of adding another.
func (e *connEntry) ping(ctx context.Context) error {
	e.pingMu.Lock()
	if e.pinging == nil {
		done := make(chan struct{})
		e.pinging = done
		go func() {
			start := time.Now()
			err := e.conn.WaitForLatestOSDMap()
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
