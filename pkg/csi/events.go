package csi

import (
	"context"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// Kinds of volume events on a node: the protocol's (docs/events.md).
const (
	EventAttach    = zmqbridge.KindAttach    // NodeStageVolume succeeded
	EventPublish   = zmqbridge.KindPublish   // NodePublishVolume succeeded
	EventUnpublish = zmqbridge.KindUnpublish // NodeUnpublishVolume succeeded
	EventExpand    = zmqbridge.KindExpand    // NodeExpandVolume succeeded
	EventDetach    = zmqbridge.KindDetach    // NodeUnstageVolume succeeded
	EventAck       = zmqbridge.KindAck       // a flush reached Ceph
)

// Ack triggers.
const (
	TriggerRequest  = zmqbridge.TriggerRequest
	TriggerUnstage  = zmqbridge.TriggerUnstage
	TriggerInterval = zmqbridge.TriggerInterval
)

// VolumeEvent says what happened to a volume on this node.
type VolumeEvent struct {
	Kind          string
	VolumeID      string
	VolumeContext map[string]string // carries the PVC/PV names and pod info
	AccessType    string            // "block" or "mount"
	FsType        string
	ReadOnly      bool
	SizeBytes     int64
	FlushMs       float64 // ack only
	Trigger       string  // ack only
	// NothingFlushed, on an ack: the mount or device was already gone, so
	// nothing was flushed (the event says "flushed": false).
	NothingFlushed bool
}

// EventSink receives volume events from the node services and returns the
// event's sequence number (0 if none). It may wait for the event to be durable
// (an fsync), never for its subscribers. An error (a gRPC status: Unavailable
// when the journal cannot record it) means the event was not recorded: the
// CSI call that caused it must fail with that error, so that it is retried
// and emits the event then.
type EventSink interface {
	VolumeEvent(ctx context.Context, ev VolumeEvent) (uint64, error)
}

// NoEvents discards events.
type NoEvents struct{}

// VolumeEvent does nothing.
func (NoEvents) VolumeEvent(context.Context, VolumeEvent) (uint64, error) { return 0, nil }
