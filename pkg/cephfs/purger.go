package cephfs

import (
	"context"
	"time"

	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// purgeRetry is how long the purger waits after a failure, and how often it
// looks at the journal when nobody wakes it.
const purgeRetry = 30 * time.Second

// purger finishes the removals a group's journal has promised: it moves the
// subvolume to the trash (/volumes/_deleting, as `ceph fs subvolume rm`
// does), purges the trash entry and then forgets the promise. On the mgr
// path it runs `ceph fs subvolume rm` instead and leaves the purge to the
// mgr. The journal is its queue, so a crash loses nothing:
// the next purger for the group (or the mgr's purge threads, for what is
// already in the trash) finishes the work.
type purger struct {
	group string
	// open reaches the group afresh for each round, so that a mount the
	// cluster cut off is replaced instead of failing forever.
	open func(ctx context.Context) (*target, error)
	lock func(ctx context.Context, sv string) (func(), error)
	wake chan struct{}
}

func newPurger(group string, open func(ctx context.Context) (*target, error), lock func(ctx context.Context, sv string) (func(), error)) *purger {
	p := &purger{group: group, open: open, lock: lock, wake: make(chan struct{}, 1)}
	p.kick()
	go p.run()
	return p
}

// kick makes the purger look at the journal soon.
func (p *purger) kick() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *purger) run() {
	t := time.NewTicker(purgeRetry)
	defer t.Stop()
	for {
		select {
		case <-p.wake:
		case <-t.C:
		}
		for p.round() {
		}
	}
}

// round purges one batch of promised removals; it reports whether to go on.
func (p *purger) round() bool {
	ctx, cancel := context.WithTimeout(context.Background(), rcsi.ConnTimeout)
	t, err := p.open(ctx)
	cancel()
	if err != nil {
		klog.ErrorS(err, "purger: reaching the group; will retry", "group", p.group)
		return false
	}
	defer t.release()
	batch, err := t.j.Promised(64)
	if err != nil {
		t.check(err)
		klog.ErrorS(err, "purger: reading the journal", "group", p.group)
		return false
	}
	// One at a time: with four workers the 60-volume batches of make bench
	// drained 2-10 times slower (renames into the trash wait on the caps
	// of the mgr's purge threads there, and more workers only queue more).
	for _, e := range batch {
		if err := p.purge(t, e[0], e[1]); err != nil {
			t.check(err)
			klog.ErrorS(err, "purger: removing a subvolume failed; will retry", "group", p.group, "subvolume", e[0])
			return false
		}
	}
	return len(batch) > 0
}

func (p *purger) purge(t *target, sv, entry string) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	unlock, err := p.lock(ctx, sv)
	cancel()
	if err != nil {
		return err
	}
	err = t.svs.Trash(sv, entry) // a no-op if an earlier purger got this far
	unlock()
	if err != nil {
		return err
	}
	rcsi.CrashPoint("cephfs-purge-after-trash")
	if err := t.svs.Purge(entry); err != nil {
		return err
	}
	if err := t.j.Done(sv); err != nil {
		return err
	}
	klog.V(3).InfoS("subvolume purged", "group", p.group, "subvolume", sv, "duration", time.Since(start))
	return nil
}

// ResumePurges starts the purger of every subvolume group this controller can
// reach with known credentials (the credentials directory), so that removals
// promised before a restart finish without waiting for a call to the group.
// Clusters without known credentials wait for their first call.
func (c *Controller) ResumePurges() {
	for _, clusterID := range c.Clusters.IDs() {
		ctx, cancel := context.WithTimeout(context.Background(), rcsi.ConnTimeout)
		lease, _, creds, err := c.knownConn(ctx, clusterID)
		if err != nil {
			cancel()
			klog.V(2).InfoS("purges of this cluster resume with its first call", "cluster", clusterID, "reason", err)
			continue
		}
		all, err := fileSystems(lease.Conn())
		lease.Release()
		if err != nil {
			cancel()
			klog.ErrorS(err, "purges of this cluster resume with its first call", "cluster", clusterID)
			continue
		}
		for _, fs := range all {
			t, err := c.openWith(ctx, clusterID, fs.Name, "", creds)
			if err != nil {
				klog.ErrorS(err, "purges of this file system resume with its first call", "cluster", clusterID, "fs", fs.Name)
				continue
			}
			t.release()
		}
		cancel()
	}
}
