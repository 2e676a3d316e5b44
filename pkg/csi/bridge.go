package csi

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"k8s.io/klog/v2"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// Keys Kubernetes puts in parameters and volume contexts: the PVC and PV
// names (external-provisioner --extra-create-metadata) and the pod's
// (podInfoOnMount). The RBD driver also stores the first three as image metadata.
const (
	KeyPVCName      = "csi.storage.k8s.io/pvc/name"
	KeyPVCNamespace = "csi.storage.k8s.io/pvc/namespace"
	KeyPVName       = "csi.storage.k8s.io/pv/name"
	KeyPodName      = "csi.storage.k8s.io/pod.name"
	KeyPodNamespace = "csi.storage.k8s.io/pod.namespace"
	KeyPodUID       = "csi.storage.k8s.io/pod.uid"
)

// FlushableVolumes is what the node services offer the event bridge.
type FlushableVolumes interface {
	// VolumeByPVC finds the staged volume of a PVC.
	VolumeByPVC(namespace, pvc string) (string, bool)
	// FlushVolume writes the volume's cached data through to Ceph and emits
	// its ack (with trigger) before it lets go of the volume, returning the
	// ack's sequence number. A volume allowed refuses is reported exactly as
	// a volume that is not staged.
	FlushVolume(ctx context.Context, volumeID, trigger string, allowed func(namespace, volumeID string) bool) (seq uint64, flushMs float64, err error)
}

// BridgeSink connects the node services and the event bridge: it is the
// nodes' EventSink and the bridge's Flusher.
type BridgeSink struct {
	Bridge  *zmqbridge.Bridge
	Volumes FlushableVolumes
	Driver  string
	Metrics *Metrics // optional
}

// VolumeEvent journals and publishes ev; it returns once ev is durable. If
// the journal cannot record it, the error is Unavailable: the CSI call fails
// and kubelet retries it.
func (s *BridgeSink) VolumeEvent(ctx context.Context, ev VolumeEvent) (uint64, error) {
	seq, err := s.Bridge.Emit(ctx, s.convert(ev))
	if err != nil {
		klog.ErrorS(err, "the event journal cannot record an event: failing the call so that it is retried",
			"kind", ev.Kind, "volumeID", ev.VolumeID)
		return 0, status.Errorf(codes.Unavailable, "the node's event journal cannot record the %s event: %v", ev.Kind, err)
	}
	s.observe(ev)
	return seq, nil
}

// Flush flushes the named volume, if the asker may, and emits its ack. Its
// errors carry the protocol's codes (zmqbridge.Error).
func (s *BridgeSink) Flush(ctx context.Context, req zmqbridge.FlushRequest) (uint64, float64, error) {
	id := req.VolumeID
	notHere := zmqbridge.Errorf(zmqbridge.CodeNotFound, "volume %s is not staged on this node", id)
	if id == "" {
		notHere = zmqbridge.Errorf(zmqbridge.CodeNotFound, "no volume of PVC %s/%s is staged on this node", req.Namespace, req.PVC)
		var ok bool
		if id, ok = s.Volumes.VolumeByPVC(req.Namespace, req.PVC); !ok {
			return 0, 0, notHere
		}
	}
	seq, ms, err := s.Volumes.FlushVolume(ctx, id, TriggerRequest, req.Allowed)
	if err == nil {
		return seq, ms, nil
	}
	code := zmqbridge.CodeInternal
	switch status.Code(err) {
	case codes.NotFound:
		return 0, 0, notHere // the same words whether absent or out of scope
	case codes.Aborted:
		code = zmqbridge.CodeAborted
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		code = zmqbridge.CodeUnavailable
	}
	return 0, 0, zmqbridge.Errorf(code, "%s", status.Convert(err).Message())
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
		PVC: vc[KeyPVCName], Namespace: vc[KeyPVCNamespace], PV: vc[KeyPVName],
		AccessType: ev.AccessType, FsType: ev.FsType, ReadOnly: &readOnly, SizeBytes: ev.SizeBytes,
	}
	if ev.Kind == EventPublish || ev.Kind == EventUnpublish {
		out.Pod, out.PodNamespace, out.PodUID = vc[KeyPodName], vc[KeyPodNamespace], vc[KeyPodUID]
	}
	if ev.Kind == EventAck {
		ms, flushed := ev.FlushMs, !ev.NothingFlushed
		out.FlushMs, out.Trigger, out.Flushed = &ms, ev.Trigger, &flushed
	}
	return out
}
