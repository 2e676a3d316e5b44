package csi

// Kinds of volume events on a node.
const (
	EventAttach    = "attach"    // NodeStageVolume succeeded
	EventPublish   = "publish"   // NodePublishVolume succeeded
	EventUnpublish = "unpublish" // NodeUnpublishVolume succeeded
	EventExpand    = "expand"    // NodeExpandVolume succeeded
	EventDetach    = "detach"    // NodeUnstageVolume succeeded
	EventAck       = "ack"       // a flush reached Ceph
)

// Ack triggers.
const (
	TriggerRequest  = "request"
	TriggerUnstage  = "unstage"
	TriggerInterval = "interval"
)

// VolumeEvent says what happened to a volume on this node.
type VolumeEvent struct {
	Kind          string
	VolumeID      string
	VolumeContext map[string]string // carries the PVC/PV names and pod info
	TargetPath    string
	AccessType    string // "block" or "mount"
	FsType        string
	ReadOnly      bool
	SizeBytes     int64
	FlushMs       float64 // ack only
	Trigger       string  // ack only
}

// EventSink receives volume events from the node services. Implementations must
// return at once (queue, never block a CSI call).
type EventSink interface {
	VolumeEvent(VolumeEvent)
}

// NoEvents discards events.
type NoEvents struct{}

// VolumeEvent does nothing.
func (NoEvents) VolumeEvent(VolumeEvent) {}
