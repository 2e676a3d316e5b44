package csi

import (
	"context"
	"encoding/json"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// fakeVolumes stands in for the node service: it records what FlushVolume
// was asked (as the node would lock and read that volume's record).
type fakeVolumes struct {
	staged  []StagedVolume
	mu      sync.Mutex
	touched []string
	sink    *BridgeSink
	writes  uint64
}

func (f *fakeVolumes) StagedVolumes() []StagedVolume { return f.staged }

func (f *fakeVolumes) FlushVolume(ctx context.Context, id, trigger string, allowed func(string, string) bool) (uint64, float64, error) {
	f.mu.Lock()
	f.touched = append(f.touched, id)
	f.mu.Unlock()
	for _, v := range f.staged {
		if v.VolumeID == id {
			ns := v.Namespace
			if ns == "" {
				ns = v.PodNamespace
			}
			if !allowed(ns, id) {
				break
			}
			seq, err := f.sink.VolumeEvent(ctx, VolumeEvent{Kind: EventAck, VolumeID: id, Trigger: trigger, DeviceWrites: f.writes,
				VolumeContext: map[string]string{KeyPVCName: v.PVC, KeyPVCNamespace: v.Namespace}})
			return seq, 1, err
		}
	}
	return 0, 0, status.Error(codes.NotFound, "volume "+id+" is not staged")
}

func newSink(t *testing.T, staged []StagedVolume) (*BridgeSink, *fakeVolumes) {
	t.Helper()
	vols := &fakeVolumes{staged: staged, writes: 100}
	sink := &BridgeSink{Volumes: vols, Driver: "d"}
	vols.sink = sink
	sink.Seed()
	b, err := zmqbridge.New(zmqbridge.Options{Dir: t.TempDir(), Node: "n1", Flusher: sink})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	sink.Bridge = b
	return sink, vols
}

// A flush of another namespace's volume (by ID or by PVC) is answered
// exactly like one of a missing volume, and the node is not asked about it
// (no lock taken, no record read).
func TestFlushAuthorisedBeforeLookup(t *testing.T) {
	sink, vols := newSink(t, []StagedVolume{{VolumeID: "theirs", PVC: "secret", Namespace: "team-b"}, {VolumeID: "mine", PVC: "data", Namespace: "team-a"}})
	teamA := func(ns, _ string) bool { return ns == "team-a" }
	ctx := context.Background()
	for _, tc := range []struct{ theirs, missing zmqbridge.FlushRequest }{
		{zmqbridge.FlushRequest{VolumeID: "theirs", Allowed: teamA}, zmqbridge.FlushRequest{VolumeID: "nothing", Allowed: teamA}},
		{zmqbridge.FlushRequest{PVC: "secret", Namespace: "team-b", Allowed: teamA}, zmqbridge.FlushRequest{PVC: "nothing", Namespace: "team-b", Allowed: teamA}},
	} {
		_, _, errTheirs := sink.Flush(ctx, tc.theirs)
		_, _, errMissing := sink.Flush(ctx, tc.missing)
		if errTheirs == nil || errMissing == nil {
			t.Fatalf("flush of another namespace's volume: %v; of a missing one: %v", errTheirs, errMissing)
		}
		var want string
		if tc.theirs.VolumeID != "" {
			want = "volume theirs is not staged on this node"
		} else {
			want = "no volume of PVC team-b/secret is staged on this node"
		}
		if errTheirs.Error() != want {
			t.Errorf("another namespace's volume: %q, want %q (as a missing one)", errTheirs, want)
		}
	}
	if len(vols.touched) != 0 {
		t.Errorf("the node was asked about %v before the asker was authorised", vols.touched)
	}
	if _, _, err := sink.Flush(ctx, zmqbridge.FlushRequest{PVC: "data", Namespace: "team-a", Allowed: teamA}); err != nil {
		t.Errorf("flush of its own namespace's PVC: %v", err)
	}
}

// Without provisioner metadata a volume's events carry the namespace of the
// pod that published it, so a namespace-scoped endpoint sees and flushes it.
func TestNamespaceLearnedFromPod(t *testing.T) {
	sink, _ := newSink(t, nil)
	ctx := context.Background()
	sink.VolumeEvent(ctx, VolumeEvent{Kind: EventAttach, VolumeID: "v"})
	sink.VolumeEvent(ctx, VolumeEvent{Kind: EventPublish, VolumeID: "v", VolumeContext: map[string]string{KeyPodNamespace: "team-a", KeyPodUID: "u", KeyPodName: "p"}})
	seq, err := sink.VolumeEvent(ctx, VolumeEvent{Kind: EventAck, VolumeID: "v", Trigger: TriggerInterval})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir())
	if err := sink.Bridge.AddEndpoint("a", zmqbridge.Endpoint{Events: "ipc://" + dir + "/e", Control: "ipc://" + dir + "/c",
		Scope: zmqbridge.Scope{Namespace: "team-a"}}); err != nil {
		t.Fatal(err)
	}
	c, _ := zmqbridge.Dial("ipc://"+dir+"/e", "ipc://"+dir+"/c")
	defer c.Close()
	c.Timeout = 10 * time.Second
	evs, _, err := c.Replay(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, raw := range evs {
		var ev zmqbridge.Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, ev.Kind+"/"+ev.Namespace)
	}
	if len(kinds) != 2 || kinds[0] != "publish/team-a" || kinds[1] != "ack/team-a" || seq != 3 {
		t.Errorf("team-a endpoint replayed %v (ack seq %d), want the publish and ack with namespace team-a", kinds, seq)
	}
}

// A request-triggered ack when the device wrote nothing since the volume's
// last ack adds no record: a flush loop cannot grow the journal.
func TestIdleFlushAddsNoAck(t *testing.T) {
	sink, vols := newSink(t, []StagedVolume{{VolumeID: "v", PVC: "data", Namespace: "a"}})
	ctx := context.Background()
	first, _, err := sink.Flush(ctx, zmqbridge.FlushRequest{VolumeID: "v"})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		seq, _, err := sink.Flush(ctx, zmqbridge.FlushRequest{VolumeID: "v"})
		if err != nil || seq != first {
			t.Fatalf("idle flush %d: seq %d, %v; want the previous ack %d", i, seq, err, first)
		}
	}
	if last := sink.Bridge.Last(); last != first {
		t.Fatalf("100 idle flushes journaled %d records", last-first)
	}
	vols.writes = 200 // something was written
	if seq, _, err := sink.Flush(ctx, zmqbridge.FlushRequest{VolumeID: "v"}); err != nil || seq != first+1 {
		t.Fatalf("flush after a write: seq %d, %v; want a new ack %d", seq, err, first+1)
	}
}
