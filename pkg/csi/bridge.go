package csi

import (
	"context"
	"sync"
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

// StagedVolume is a volume staged on the node, for the bridge's index.
type StagedVolume struct {
	VolumeID, PVC, Namespace string
	// PodNamespace is the namespace of a pod it is published to.
	PodNamespace string
	// Unstaging: NodeUnstageVolume began tearing it down (its unstage ack
	// was emitted) and has not finished.
	Unstaging bool
}

// FlushableVolumes is what the node services offer the event bridge.
type FlushableVolumes interface {
	// StagedVolumes lists the staged volumes (read once, at start).
	StagedVolumes() []StagedVolume
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

	mu sync.Mutex
	// vols indexes the staged volumes in memory: a flush request is
	// authorised from it before any volume's lock or record is touched.
	vols map[string]*indexedVolume
}

// indexedVolume is what the bridge knows of a staged volume.
type indexedVolume struct {
	pvc, namespace string // the PVC's, or (namespace) learned from the pod that published it
	// The volume's last request-triggered ack, and the device's written
	// sectors after its flush.
	ackSeq, ackWrites uint64
	// unstaging: its unstage has begun and not finished (its detach event
	// is not journaled yet, e.g. because the journal failed): flushes are
	// answered "unavailable" until the retried unstage ends.
	unstaging bool
}

// Seed fills the index from the staged volumes (call once, before the
// bridge serves flushes).
func (s *BridgeSink) Seed() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.vols = map[string]*indexedVolume{}
	for _, v := range s.Volumes.StagedVolumes() {
		iv := &indexedVolume{pvc: v.PVC, namespace: v.Namespace, unstaging: v.Unstaging}
		if iv.namespace == "" {
			iv.namespace = v.PodNamespace
		}
		s.vols[v.VolumeID] = iv
	}
}

// VolumeEvent journals and publishes ev; it returns once ev is durable. If
// the journal cannot record it, the error is Unavailable: the CSI call fails
// and kubelet retries it. A request-triggered ack when nothing reached the
// device since the volume's previous one adds no record: the previous ack's
// sequence is returned.
func (s *BridgeSink) VolumeEvent(ctx context.Context, ev VolumeEvent) (uint64, error) {
	out, iv := s.index(ev)
	if iv != nil && ev.Kind == EventAck && ev.Trigger == TriggerRequest && ev.DeviceWrites != 0 {
		s.mu.Lock()
		seq := iv.ackSeq
		same := seq != 0 && iv.ackWrites == ev.DeviceWrites
		s.mu.Unlock()
		if same {
			klog.V(4).InfoS("flush wrote nothing since the last ack: no new ack", "volumeID", ev.VolumeID, "ackSeq", seq)
			s.observe(ev)
			return seq, nil
		}
	}
	seq, err := s.Bridge.Emit(ctx, out)
	if ev.Kind == EventDetach && iv != nil {
		s.mu.Lock()
		if err != nil {
			iv.unstaging = true // until the retried unstage journals its detach
		} else if s.vols[ev.VolumeID] == iv {
			delete(s.vols, ev.VolumeID)
		}
		s.mu.Unlock()
	}
	if err != nil {
		klog.ErrorS(err, "the event journal cannot record an event: failing the call so that it is retried",
			"kind", ev.Kind, "volumeID", ev.VolumeID)
		return 0, status.Errorf(codes.Unavailable, "the node's event journal cannot record the %s event: %v", ev.Kind, err)
	}
	if iv != nil && ev.Kind == EventAck && seq != 0 {
		s.mu.Lock()
		iv.ackSeq, iv.ackWrites = seq, ev.DeviceWrites
		s.mu.Unlock()
	}
	s.observe(ev)
	return seq, nil
}

// index updates the index with ev and converts it, the namespace filled
// from the index when the provisioner gave none.
func (s *BridgeSink) index(ev VolumeEvent) (zmqbridge.Event, *indexedVolume) {
	out := s.convert(ev)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.vols == nil {
		s.vols = map[string]*indexedVolume{}
	}
	iv := s.vols[ev.VolumeID]
	switch {
	case iv == nil && ev.Kind != EventDetach:
		iv = &indexedVolume{pvc: out.PVC, namespace: out.Namespace}
		s.vols[ev.VolumeID] = iv
	case iv != nil && ev.Kind == EventAck && ev.Trigger == TriggerUnstage:
		iv.unstaging = true // its flush answers "unavailable" from now on
	case iv != nil && ev.Kind == EventAttach:
		iv.unstaging = false // staged again
	}
	// A detach leaves the index once journaled (VolumeEvent).
	if iv != nil && iv.namespace == "" && ev.Kind == EventPublish {
		iv.namespace = out.PodNamespace // no provisioner metadata: the pod's namespace is the PVC's
	}
	if out.Namespace == "" && iv != nil {
		out.Namespace = iv.namespace
	}
	return out, iv
}

// Flush flushes the named volume, if the asker may, and emits its ack. The
// asker is authorised from the in-memory index first: a volume it may not
// flush is answered exactly like a missing one, without its lock or record.
// Its errors carry the protocol's codes (zmqbridge.Error).
func (s *BridgeSink) Flush(ctx context.Context, req zmqbridge.FlushRequest) (uint64, float64, error) {
	id := req.VolumeID
	notHere := zmqbridge.Errorf(zmqbridge.CodeNotFound, "volume %s is not staged on this node", id)
	if id == "" {
		notHere = zmqbridge.Errorf(zmqbridge.CodeNotFound, "no volume of PVC %s/%s is staged on this node", req.Namespace, req.PVC)
	}
	s.mu.Lock()
	var iv *indexedVolume
	if id == "" {
		for vid, v := range s.vols {
			if v.pvc == req.PVC && v.namespace == req.Namespace {
				id, iv = vid, v
				break
			}
		}
	} else {
		iv = s.vols[id]
	}
	ns, unstaging := "", false
	if iv != nil {
		ns, unstaging = iv.namespace, iv.unstaging
	}
	s.mu.Unlock()
	if iv == nil || (req.Allowed != nil && !req.Allowed(ns, id)) {
		return 0, 0, notHere
	}
	if unstaging {
		// Half unstaged (its mount or device may be gone already): neither
		// flushable nor gone until kubelet's retry of the unstage ends.
		return 0, 0, zmqbridge.Errorf(zmqbridge.CodeUnavailable, "volume %s is being unstaged on this node; retry", id)
	}
	// Checked again under the volume's lock, with the namespace indexed.
	allowed := func(_, vid string) bool { return req.Allowed == nil || req.Allowed(ns, vid) }
	seq, ms, err := s.Volumes.FlushVolume(ctx, id, TriggerRequest, allowed)
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
