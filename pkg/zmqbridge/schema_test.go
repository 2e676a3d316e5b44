package zmqbridge

import (
	"encoding/json"
	"os"
	"testing"
)

// The events the bridge emits use exactly the fields docs/events.schema.json
// names, with its required ones present: the documented contract and the code
// cannot drift apart.
func TestEventsMatchSchema(t *testing.T) {
	var schema struct {
		Required   []string                   `json:"required"`
		Properties map[string]json.RawMessage `json:"properties"`
	}
	b, err := os.ReadFile("../../docs/events.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &schema); err != nil {
		t.Fatal(err)
	}
	ro, ms := true, 2.5
	full := Event{V: 1, Seq: 3, Time: "t", Node: "n", Kind: KindAck, VolumeID: "v", Driver: "d", PVC: "p", Namespace: "ns",
		PV: "pv", Pod: "pod", PodNamespace: "ns", PodUID: "u", AccessType: "mount", FsType: "xfs", ReadOnly: &ro,
		SizeBytes: 5, FlushMs: &ms, Trigger: TriggerRequest}
	hb := Event{V: 1, Seq: 3, Time: "t", Node: "n", Kind: KindHeartbeat}
	for _, e := range []Event{full, hb} {
		var m map[string]any
		json.Unmarshal(e.Marshal(), &m)
		for k := range m {
			if _, ok := schema.Properties[k]; !ok {
				t.Errorf("field %q is not in the schema", k)
			}
		}
		for _, k := range schema.Required {
			if _, ok := m[k]; !ok {
				t.Errorf("%s event lacks required %q", e.Kind, k)
			}
		}
	}
	var m map[string]any
	json.Unmarshal(full.Marshal(), &m)
	for k := range schema.Properties {
		if _, ok := m[k]; !ok {
			t.Errorf("schema property %q is never emitted", k)
		}
	}
}
