package csi

import (
	"context"
	"errors"
	"fmt"
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

// VolumeEvent journals and publishes ev; it returns once ev is durable.
func (s *BridgeSink) VolumeEvent(ev VolumeEvent) uint64 {
	s.observe(ev)
	seq, err := s.Bridge.Emit(s.convert(ev))
	if err != nil {
		klog.ErrorS(err, "event lost: the journal refused it", "kind", ev.Kind, "volumeID", ev.VolumeID)
	}
	return seq
}

// Flush flushes the named volume, if the asker may, and emits its ack.
func (s *BridgeSink) Flush(ctx context.Context, req zmqbridge.FlushRequest) (uint64, float64, error) {
	id := req.VolumeID
	notHere := fmt.Errorf("volume %s is not staged on this node", id)
	if id == "" {
		notHere = fmt.Errorf("no volume of PVC %s/%s is staged on this node", req.Namespace, req.PVC)
		var ok bool
		if id, ok = s.Volumes.VolumeByPVC(req.Namespace, req.PVC); !ok {
			return 0, 0, notHere
		}
	}
	seq, ms, err := s.Volumes.FlushVolume(ctx, id, TriggerRequest, req.Allowed)
	if status.Code(err) == codes.NotFound {
		return 0, 0, notHere // the same words whether absent or out of scope
	} else if err != nil {
		return 0, 0, errors.New(status.Convert(err).Message())
	}
	return seq, ms, nil
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
		ms := ev.FlushMs
		out.FlushMs, out.Trigger = &ms, ev.Trigger
	}
	return out
}
