package rbd

import (
	"context"
	"strconv"
	"sync"
	"time"

	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// ackTimers flush staged volumes whose StorageClass set ackIntervalSeconds and
// emit an ack (trigger "interval") each time.
type ackTimers struct {
	mu     sync.Mutex
	cancel map[string]context.CancelFunc
}

// start runs the timer of a staged volume, if its context asks for one.
func (a *ackTimers) start(n *Node, rec *stageRecord) {
	secs, err := strconv.Atoi(rec.Context[ParamAckInterval])
	if err != nil || secs <= 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cancel == nil {
		a.cancel = map[string]context.CancelFunc{}
	}
	if _, running := a.cancel[rec.VolumeID]; running {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.cancel[rec.VolumeID] = cancel
	go func(id string, every time.Duration) {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if _, _, err := n.FlushVolume(ctx, id, rcsi.TriggerInterval, nil); err != nil && ctx.Err() == nil {
				klog.ErrorS(err, "periodic flush failed", "volumeID", id)
			}
		}
	}(rec.VolumeID, time.Duration(secs)*time.Second)
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
func (n *Node) ResumeAckTimers() {
	recs, _ := n.state.all()
	for _, r := range recs {
		if r.Staged {
			n.acks.start(n, r)
		}
	}
}
