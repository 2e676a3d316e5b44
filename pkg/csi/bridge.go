package csi

import (
	"context"
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// Volume context keys that carry Kubernetes names.
const (
	ctxPVCName      = "csi.storage.k8s.io/pvc/name"
	ctxPVCNamespace = "csi.storage.k8s.io/pvc/namespace"
	ctxPVName       = "csi.storage.k8s.io/pv/name"
	ctxPodName      = "csi.storage.k8s.io/pod.name"
	ctxPodNamespace = "csi.storage.k8s.io/pod.namespace"
	ctxPodUID       = "csi.storage.k8s.io/pod.uid"
)

// FlushableVolumes is what the node services offer the event bridge.
type FlushableVolumes interface {
	// StagedContext returns a staged volume's volume context.
	StagedContext(volumeID string) (map[string]string, bool)
	// VolumeByPVC finds the staged volume of a PVC.
	VolumeByPVC(namespace, pvc string) (string, bool)
	// FlushVolume writes the volume's cached data through to Ceph and
	// returns the ack event (not yet emitted).
	FlushVolume(ctx context.Context, volumeID string) (VolumeEvent, error)
}

// BridgeSink connects the node services and the event bridge: it is the
// nodes' EventSink and the bridge's Flusher.
type BridgeSink struct {
	Bridge  *zmqbridge.Bridge
	Volumes FlushableVolumes
	Driver  string
	Metrics *Metrics // optional
}

// VolumeEvent journals and publishes ev; it returns once ev is durable.
func (s *BridgeSink) VolumeEvent(ev VolumeEvent) {
	s.observe(ev)
	if _, err := s.Bridge.Emit(s.convert(ev)); err != nil {
		klog.ErrorS(err, "event lost: the journal refused it", "kind", ev.Kind, "volumeID", ev.VolumeID)
	}
}

// Flush flushes the named volume, if the asking endpoint's scope covers it,
// and emits its ack.
func (s *BridgeSink) Flush(ctx context.Context, req zmqbridge.FlushRequest) (uint64, float64, error) {
	id := req.VolumeID
	if id == "" {
		var ok bool
		if id, ok = s.Volumes.VolumeByPVC(req.Namespace, req.PVC); !ok {
			return 0, 0, fmt.Errorf("no volume of PVC %s/%s is staged on this node", req.Namespace, req.PVC)
		}
	}
	vc, ok := s.Volumes.StagedContext(id)
	if !ok || (req.Allowed != nil && !req.Allowed(vc[ctxPVCNamespace], id)) {
		// Out-of-scope volumes are reported exactly like absent ones.
		return 0, 0, fmt.Errorf("volume %s is not staged on this node", id)
	}
	ev, err := s.Volumes.FlushVolume(ctx, id)
	if err != nil {
		return 0, 0, err
	}
	ev.Trigger = TriggerRequest
	s.observe(ev)
	seq, err := s.Bridge.Emit(s.convert(ev))
	if err != nil {
		return 0, 0, err
	}
	return seq, ev.FlushMs, nil
}

func (s *BridgeSink) observe(ev VolumeEvent) {
	if s.Metrics != nil && ev.Kind == EventAck {
		s.Metrics.FlushDone(time.Duration(ev.FlushMs * float64(time.Millisecond)))
	}
}

func (s *BridgeSink) convert(ev VolumeEvent) zmqbridge.Event {
	vc := ev.VolumeContext
	readOnly := ev.ReadOnly
	out := zmqbridge.Event{
		Kind: ev.Kind, VolumeID: ev.VolumeID, Driver: s.Driver,
		PVC: vc[ctxPVCName], Namespace: vc[ctxPVCNamespace], PV: vc[ctxPVName],
		AccessType: ev.AccessType, FsType: ev.FsType, ReadOnly: &readOnly, SizeBytes: ev.SizeBytes,
	}
	if ev.Kind == EventPublish || ev.Kind == EventUnpublish {
		out.Pod, out.PodNamespace, out.PodUID = vc[ctxPodName], vc[ctxPodNamespace], vc[ctxPodUID]
	}
	if ev.Kind == EventAck {
		ms := ev.FlushMs
		out.FlushMs, out.Trigger = &ms, ev.Trigger
	}
	return out
}
