package zmqbridge

import (
	"strings"
	"time"
)

// Version is the protocol version carried in every message's "v" field.
const Version = 1

// Event kinds.
const (
	KindAttach    = "attach"
	KindPublish   = "publish"
	KindUnpublish = "unpublish"
	KindExpand    = "expand"
	KindAck       = "ack"
	KindDetach    = "detach"
	KindHeartbeat = "hb"
)

// Ack triggers.
const (
	TriggerRequest  = "request"
	TriggerUnstage  = "unstage"
	TriggerInterval = "interval"
)

// Event is one message of the protocol (docs/events.md). Seq, Epoch, Time,
// V, Node and Driver are filled in by the bridge. Flushed, on an ack, says
// whether anything was flushed (false: the mount or device was already gone).
type Event struct {
	V            int      `json:"v"`
	Seq          uint64   `json:"seq"`
	Epoch        string   `json:"epoch,omitempty"`
	Time         string   `json:"time"`
	Node         string   `json:"node"`
	Kind         string   `json:"kind"`
	VolumeID     string   `json:"volume_id,omitempty"`
	Driver       string   `json:"driver,omitempty"`
	PVC          string   `json:"pvc,omitempty"`
	Namespace    string   `json:"namespace,omitempty"`
	PV           string   `json:"pv,omitempty"`
	Pod          string   `json:"pod,omitempty"`
	PodNamespace string   `json:"pod_namespace,omitempty"`
	PodUID       string   `json:"pod_uid,omitempty"`
	AccessType   string   `json:"access_type,omitempty"`
	FsType       string   `json:"fs_type,omitempty"`
	ReadOnly     *bool    `json:"read_only,omitempty"`
	SizeBytes    int64    `json:"size_bytes,omitempty"`
	FlushMs      *float64 `json:"flush_ms,omitempty"`
	Flushed      *bool    `json:"flushed,omitempty"`
	Trigger      string   `json:"trigger,omitempty"`
}

// Topic is <kind>/<namespace>/<pvc>, or <kind>/<volume_id> without a PVC.
func (e *Event) Topic() string { return string(e.appendTopic(make([]byte, 0, 64))) }

// appendTopic appends the event's topic to b.
func (e *Event) appendTopic(b []byte) []byte {
	b = append(append(b, e.Kind...), '/')
	if e.PVC != "" && e.Namespace != "" {
		return append(append(append(b, e.Namespace...), '/'), e.PVC...)
	}
	return append(b, e.VolumeID...)
}

// TopicNamespace returns the namespace a topic names, or "" if it names none.
func TopicNamespace(topic string) string {
	_, rest, ok := strings.Cut(topic, "/")
	if !ok {
		return ""
	}
	ns, _, ok := strings.Cut(rest, "/")
	if !ok {
		return ""
	}
	return ns
}

// Marshal encodes the event as the protocol's JSON (what encoding/json
// gives, three times faster).
func (e *Event) Marshal() []byte { return e.appendJSON(make([]byte, 0, 384), time.Time{}) }
