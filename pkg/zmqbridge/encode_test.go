package zmqbridge

import (
	"bytes"
	"encoding/json"
	"testing"
	"time"
)

func TestAppendJSONMatchesEncodingJSON(t *testing.T) {
	ro, ms, tiny, huge := true, 1.5, 1e-7, 3e21
	for _, e := range []Event{
		{},
		{V: 1, Seq: 7, Time: "2026-11-22T00:00:00.123456789Z", Node: "n", Kind: "attach", VolumeID: "1-02-c1-03-rbd-00--x"},
		{V: 1, Seq: 1 << 62, Epoch: "0123456789abcdef0123456789abcdef", Kind: "ack", ReadOnly: &ro, FlushMs: &ms, Flushed: &ro, Trigger: "request", SizeBytes: -5},
		{Kind: "ack", FlushMs: &tiny}, {Kind: "ack", FlushMs: &huge},
		{PVC: "q\"uo\\te\n\t\r\b\f\x01\x1f<>&\u2028\u2029 é 日本", Namespace: "bad\xffutf8\xc3", Pod: "\x7f"},
	} {
		want, _ := json.Marshal(&e)
		if got := e.appendJSON(nil, time.Time{}); !bytes.Equal(got, want) {
			t.Errorf("appendJSON\n got %s\nwant %s", got, want)
		}
	}
}

// The emit path formats the time straight into the buffer: the same bytes
// as setting Time first.
func TestAppendJSONTime(t *testing.T) {
	for _, now := range []time.Time{
		time.Date(2026, 11, 22, 3, 4, 5, 0, time.UTC),
		time.Date(2026, 11, 22, 3, 4, 5, 120000000, time.FixedZone("x", 3600)),
		time.Now(),
	} {
		e := Event{V: 1, Seq: 3, Node: "n", Kind: "detach", VolumeID: "v"}
		got := e.appendJSON(nil, now)
		e.Time = now.UTC().Format(time.RFC3339Nano)
		if want, _ := json.Marshal(&e); !bytes.Equal(got, want) {
			t.Errorf("appendJSON with now\n got %s\nwant %s", got, want)
		}
		if again := e.appendJSON(nil, now.Add(time.Hour)); !bytes.Contains(again, []byte(e.Time)) {
			t.Errorf("a Time already set was replaced: %s", again)
		}
	}
}

func FuzzAppendJSON(f *testing.F) {
	f.Add("pvc", "ns", "vol", 1.25, int64(3))
	f.Add("\x00\"<", "\xff", "\u2028", 1e-9, int64(-1))
	f.Fuzz(func(t *testing.T, pvc, ns, vol string, ms float64, size int64) {
		e := Event{V: 1, Seq: 9, PVC: pvc, Namespace: ns, VolumeID: vol, FlushMs: &ms, SizeBytes: size}
		want, err := json.Marshal(&e)
		if err != nil {
			return // NaN and Inf are not JSON
		}
		if got := e.appendJSON(nil, time.Time{}); !bytes.Equal(got, want) {
			t.Fatalf("appendJSON\n got %s\nwant %s", got, want)
		}
	})
}

func BenchmarkEncode(b *testing.B) {
	ro := false
	e := Event{V: 1, Seq: 123456, Time: "2026-11-22T00:00:00.123456789Z", Node: "node-1", Kind: "publish",
		VolumeID: "1-02-c1-03-rbd-00--csi-vol-0b7a1c1e-1d2e-4f3a-9b8c-7d6e5f4a3b2c", Driver: "rbd.rookzmq.io",
		PVC: "data", Namespace: "team-a", AccessType: "mount", FsType: "ext4", ReadOnly: &ro}
	b.Run("encoding/json", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			json.Marshal(&e)
		}
	})
	b.Run("appendJSON", func(b *testing.B) {
		buf := make([]byte, 0, 512)
		for i := 0; i < b.N; i++ {
			buf = e.appendJSON(buf[:0], time.Time{})
		}
	})
}
