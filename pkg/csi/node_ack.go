package csi

import (
	"context"
	"strconv"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// KeyAckInterval (a StorageClass parameter, so a volume context key) makes
// the node flush staged volumes of the class and publish an ack event every
// so many seconds.
const KeyAckInterval = "ackIntervalSeconds"

// ackTimers flush staged volumes whose StorageClass set ackIntervalSeconds and
// emit an ack (trigger "interval") each time.
type ackTimers struct {
	mu     sync.Mutex
	cancel map[string]context.CancelFunc
}

// start runs the timer of a staged volume, if its context asks for one.
func (a *ackTimers) start(volumeID string, volCtx map[string]string, flush func(ctx context.Context, volumeID string) error) {
	secs, err := strconv.Atoi(volCtx[KeyAckInterval])
	if err != nil || secs <= 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cancel == nil {
		a.cancel = map[string]context.CancelFunc{}
	}
	if _, running := a.cancel[volumeID]; running {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel[volumeID] = cancel
	go func(id string, every time.Duration) {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := flush(ctx, id); err != nil && ctx.Err() == nil {
				klog.ErrorS(err, "periodic flush failed", "volumeID", id)
			}
		}
	}(volumeID, time.Duration(secs)*time.Second)
}

// stop ends a volume's timer.
func (a *ackTimers) stop(volumeID string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := a.cancel[volumeID]; c != nil {
		c()
		delete(a.cancel, volumeID)
	}
}

// ResumeAckTimers restarts the timers of volumes staged before a restart;
// call it once the event sink is ready.
func (n *Node[A]) ResumeAckTimers() {
	recs, _ := n.state.all()
	for _, r := range recs {
		if r.Staged {
			n.acks.start(r.VolumeID, r.Context, n.intervalFlush)
		}
	}
}

// intervalFlush is an ack timer's flush.
func (n *Node[A]) intervalFlush(ctx context.Context, volumeID string) error {
	_, _, err := n.FlushVolume(ctx, volumeID, TriggerInterval, nil)
	return err
}
