package rbd

import (
	"encoding/json"
	"reflect"
	"slices"
	"testing"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// oldRecordJSON is a stage record as the driver wrote it before the node
// skeleton moved to pkg/csi (its stageRecord embedded the Mapping), byte for byte.
const oldRecordJSON = `{
  "volumeID": "1-c-p-x-img",
  "stagingPath": "/staging",
  "mounter": "rbd-fuse",
  "device": "/dev/loop3",
  "pool": "p",
  "namespace": "ns",
  "image": "img",
  "fuseDir": "/state/volumes/k/fuse",
  "pid": 42,
  "block": false,
  "fsType": "ext4",
  "readOnly": true,
  "accessMode": "SINGLE_NODE_WRITER",
  "volumeContext": {
    "ackIntervalSeconds": "5",
    "mounter": "rbd-fuse"
  },
  "size": 1073741824,
  "bootID": "boot-1",
  "announced": true,
  "unstageAcked": true,
  "staged": true,
  "targets": {
    "/t1": {
      "readOnly": true,
      "context": {
        "csi.storage.k8s.io/pod.uid": "u1"
      }
    }
  }
}`

// oldStageRecord is the old driver's record type, to read what the new one writes.
type oldStageRecord struct {
	VolumeID    string `json:"volumeID"`
	StagingPath string `json:"stagingPath"`
	Mapping
	Block        bool              `json:"block"`
	FsType       string            `json:"fsType,omitempty"`
	ReadOnly     bool              `json:"readOnly"`
	Mode         string            `json:"accessMode"`
	Context      map[string]string `json:"volumeContext,omitempty"`
	Size         int64             `json:"size,omitempty"`
	BootID       string            `json:"bootID,omitempty"`
	Announced    bool              `json:"announced,omitempty"`
	UnstageAcked bool              `json:"unstageAcked,omitempty"`
	Staged       bool              `json:"staged"`
	Targets      map[string]struct {
		ReadOnly bool              `json:"readOnly"`
		Context  map[string]string `json:"context,omitempty"`
	} `json:"targets,omitempty"`
}

// A driver upgraded in place reads the records the old one wrote, and writes
// records with the same fields, which the old one (after a rollback) reads.
func TestStageRecordFormatUnchanged(t *testing.T) {
	var rec rcsi.StageRecord[Mapping]
	if err := json.Unmarshal([]byte(oldRecordJSON), &rec); err != nil {
		t.Fatal(err)
	}
	want := rcsi.StageRecord[Mapping]{
		VolumeID: "1-c-p-x-img", StagingPath: "/staging", FsType: "ext4", ReadOnly: true, Mode: "SINGLE_NODE_WRITER",
		Context: map[string]string{"ackIntervalSeconds": "5", "mounter": "rbd-fuse"},
		Size:    1 << 30, BootID: "boot-1", Announced: true, UnstageAcked: true, Staged: true,
		Targets:    map[string]rcsi.Publication{"/t1": {ReadOnly: true, Context: map[string]string{"csi.storage.k8s.io/pod.uid": "u1"}}},
		Attachment: Mapping{Mounter: "rbd-fuse", Device: "/dev/loop3", Pool: "p", Namespace: "ns", Image: "img", FuseDir: "/state/volumes/k/fuse", Pid: 42},
	}
	if !reflect.DeepEqual(rec, want) {
		t.Fatalf("old record read as\n%+v\nwant\n%+v", rec, want)
	}
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if got, old := keys(t, b), keys(t, []byte(oldRecordJSON)); !slices.Equal(got, old) {
		t.Fatalf("record fields %v, the old driver's %v", got, old)
	}
	var fromNew, fromOld oldStageRecord
	if err := json.Unmarshal(b, &fromNew); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(oldRecordJSON), &fromOld); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(fromNew, fromOld) {
		t.Fatalf("the old driver reads the new record as\n%+v\nand its own as\n%+v", fromNew, fromOld)
	}
}

func keys(t *testing.T, b []byte) []string {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
