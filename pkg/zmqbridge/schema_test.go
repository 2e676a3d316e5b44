package zmqbridge

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
	"github.com/santhosh-tekuri/jsonschema/v6"
)

const schemaURL = "https://rookzmq.io/schemas/events/v1.json"

// schemas compiles docs/events.schema.json and returns its root (an event)
// or one of its $defs.
func schemas(t testing.TB) func(def string) *jsonschema.Schema {
	f, err := os.Open("../../docs/events.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doc, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	c.AssertFormat()
	if err := c.AddResource(schemaURL, doc); err != nil {
		t.Fatal(err)
	}
	return func(def string) *jsonschema.Schema {
		loc := schemaURL
		if def != "" {
			loc += "#/$defs/" + def
		}
		s, err := c.Compile(loc)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
}

// validate checks raw JSON against a schema.
func validate(s *jsonschema.Schema, b []byte) error {
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
	if err != nil {
		return err
	}
	return s.Validate(v)
}

// The events the bridge emits use exactly the fields docs/events.schema.json
// names, with its required ones present, and validate against it: the
// documented contract and the code cannot drift apart.
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
	event := schemas(t)("")
	ro, ms := true, 2.5
	const epoch = "0123456789abcdef0123456789abcdef"
	time := "2026-11-22T00:00:00.123456789Z"
	full := Event{V: 1, Seq: 3, Epoch: epoch, Time: time, Node: "n", Kind: KindAck, VolumeID: "v", Driver: "d", PVC: "p", Namespace: "ns",
		PV: "pv", Pod: "pod", PodNamespace: "ns", PodUID: "u", AccessType: "mount", FsType: "xfs", ReadOnly: &ro,
		SizeBytes: 5, FlushMs: &ms, Flushed: &ro, Trigger: TriggerRequest}
	hb := Event{V: 1, Seq: 1<<64 - 1, Epoch: epoch, Time: time, Node: "n", Kind: KindHeartbeat}
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
		if err := validate(event, e.Marshal()); err != nil {
			t.Errorf("%s event does not validate: %v", e.Kind, err)
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

// requestCorpus is what TestRequestsMatchSchema holds ParseRequest and the
// schema to: each request is accepted by both or by neither.
var requestCorpus = []string{
	`{"op":"replay"}`, `{"op":"replay","since":5}`, `{"op":"replay","since":0,"max":0}`,
	`{"op":"replay","max":5000}`, `{"op":"replay","max":1}`, `{"op":"replay","max":-1}`,
	`{"op":"replay","since":18446744073709551615}`, `{"op":"replay","since":18446744073709551616}`,
	`{"op":"replay","since":-1}`, `{"op":"replay","since":1.5}`, `{"op":"replay","since":1.0}`,
	`{"op":"replay","since":1e3}`, `{"op":"replay","since":-0}`, `{"op":"replay","since":"5"}`,
	`{"op":"replay","since":null}`, `{"op":"replay","max":9223372036854775807}`, `{"op":"replay","max":9223372036854775808}`,
	`{"op":"replay","volume_id":"v"}`, `{"op":"replay","bogus":1}`, `{"OP":"replay"}`, `{"op":"Replay"}`,
	`{"op":"flush","volume_id":"v"}`, `{"op":"flush","pvc":"p","namespace":"n"}`, `{"op":"flush","volume_id":""}`,
	`{"op":"flush","pvc":"p"}`, `{"op":"flush","pvc":"p","namespace":""}`, `{"op":"flush"}`,
	`{"op":"flush","volume_id":"v","pvc":"p"}`, `{"op":"flush","volume_id":3}`, `{"op":"flush","since":1,"volume_id":"v"}`,
	`{"op":"flush","volume_id":"v","volume_id":""}`, `{"op":"rm"}`, `{"op":1}`, `{}`, `[]`, `null`, `"replay"`, `1`,
	`{"op":"replay"} {}`, `{"op":"replay"}]`, `not json`, ``, ` {"op" : "replay" } `,
}

// The schema's request definition accepts exactly what the bridge accepts.
func TestRequestsMatchSchema(t *testing.T) {
	request := schemas(t)("request")
	for _, in := range requestCorpus {
		_, perr := ParseRequest([]byte(in))
		verr := validate(request, []byte(in))
		if (perr == nil) != (verr == nil) {
			t.Errorf("%s: the bridge says %v, the schema says %v", in, perr, verr)
		}
	}
}

// Real replies of a bridge validate against the schema's reply definitions,
// and the events and heartbeats it publishes against the event schema.
func TestRepliesMatchSchema(t *testing.T) {
	def := schemas(t)
	dir := t.TempDir()
	b, err := New(Options{Dir: dir, Node: "n1", Driver: "d", Heartbeat: 50 * time.Millisecond, Flusher: &fakeFlusher{},
		Journal: JournalOptions{SegmentBytes: 1, MaxBytes: 800}})
	if err != nil {
		t.Fatal(err)
	}
	b.opts.Flusher.(*fakeFlusher).b = b
	defer b.Close()
	zctx, _ := zmq.NewContext()
	defer zctx.Term()
	sub, _ := zctx.NewSocket(zmq.SUB)
	defer sub.Close()
	sub.SetLinger(0)
	sub.SetSubscribe("")
	sub.SetRcvtimeo(3 * time.Second)
	sub.Connect("ipc://" + filepath.Join(dir, "events.sock"))
	time.Sleep(100 * time.Millisecond)
	ro := false
	for _, k := range []string{KindAttach, KindPublish, KindExpand} {
		if _, err := b.Emit(context.Background(), Event{Kind: k, VolumeID: "v", PVC: "p", Namespace: "ns", ReadOnly: &ro, SizeBytes: 10}); err != nil {
			t.Fatal(err)
		}
	}
	kinds := map[string]bool{}
	for len(kinds) < 4 {
		frames, err := sub.RecvMessageBytes(0)
		if err != nil {
			t.Fatalf("got %v: %v", kinds, err)
		}
		var ev Event
		json.Unmarshal(frames[1], &ev)
		kinds[ev.Kind] = true
		if err := validate(def(""), frames[1]); err != nil {
			t.Errorf("published %s: %v", frames[1], err)
		}
	}
	req, _ := zctx.NewSocket(zmq.REQ)
	defer req.Close()
	req.SetLinger(0)
	req.SetRcvtimeo(5 * time.Second)
	req.Connect("ipc://" + filepath.Join(dir, "control.sock"))
	for _, tc := range []struct{ req, def, code string }{
		{`{"op":"replay","since":2}`, "replayReply", ""},
		{`{"op":"flush","volume_id":"v"}`, "flushReply", ""},
		{`{"op":"flush","volume_id":"missing"}`, "errorReply", CodeInternal},
		{`{"op":"replay","since":0}`, "errorReply", CodeTruncated},
		{`{"op":"nope"}`, "errorReply", CodeBadRequest},
	} {
		req.SendBytes([]byte(tc.req), 0)
		reply, err := req.RecvBytes(0)
		if err != nil {
			t.Fatal(err)
		}
		if err := validate(def(tc.def), reply); err != nil {
			t.Errorf("reply to %s: %s: %v", tc.req, reply, err)
		}
		if tc.code != "" && !strings.Contains(string(reply), `"code":"`+tc.code+`"`) {
			t.Errorf("reply to %s: %s, want code %s", tc.req, reply, tc.code)
		}
	}
}
