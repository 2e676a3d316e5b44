package e2e

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

func eventsClient(t *testing.T, dir string) *zmqbridge.Client {
	t.Helper()
	c, err := zmqbridge.Dial("ipc://"+filepath.Join(dir, "events", "events.sock"), "ipc://"+filepath.Join(dir, "events", "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// recorder subscribes in the background and keeps what it gets.
type recorder struct {
	mu     sync.Mutex
	events []zmqbridge.Event
	cancel func()
	done   chan error
}

// record subscribes to the node-wide endpoint from since.
func record(t *testing.T, dir string, since uint64) *recorder {
	return recordFrom(t, eventsClient(t, dir), since)
}

// recordFrom subscribes with c in the background and keeps what it gets.
func recordFrom(t *testing.T, c *zmqbridge.Client, since uint64) *recorder {
	r := &recorder{done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		r.done <- c.Subscribe(ctx, nil, since, func(ev zmqbridge.Event, _ []byte) error {
			r.mu.Lock()
			r.events = append(r.events, ev)
			r.mu.Unlock()
			return nil
		})
	}()
	t.Cleanup(func() { cancel(); <-r.done })
	time.Sleep(100 * time.Millisecond)
	return r
}

func (r *recorder) wait(t *testing.T, n int) []zmqbridge.Event {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		r.mu.Lock()
		got := append([]zmqbridge.Event(nil), r.events...)
		r.mu.Unlock()
		if len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("got %d events, want %d: %+v", len(got), n, got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stage -> publish -> flush -> unpublish -> unstage gives attach, publish, ack,
// unpublish, ack, detach with consecutive sequence numbers, seen live.
func TestEventCycle(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	rec := record(t, dir, 0)
	prefix := uniquePrefix(t)
	vc := mountCap("", rwo)
	req := createReq(prefix+"vol", prefix, 64<<20)
	req.Parameters["csi.storage.k8s.io/pvc/name"] = "data"
	req.Parameters["csi.storage.k8s.io/pvc/namespace"] = "team-a"
	req.Parameters["csi.storage.k8s.io/pv/name"] = "pvc-1"
	r, err := d.ctrl.CreateVolume(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	s := staged{id: r.GetVolume().GetVolumeId(), staging: filepath.Join(t.TempDir(), "s"), target: filepath.Join(t.TempDir(), "t"),
		capability: vc, context: r.GetVolume().GetVolumeContext()}
	c := ctx(t)
	if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		VolumeCapability: vc, VolumeContext: s.context, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	podCtx := mergeMaps(s.context, map[string]string{"csi.storage.k8s.io/pod.name": "app-0",
		"csi.storage.k8s.io/pod.namespace": "team-a", "csi.storage.k8s.io/pod.uid": "uid-1"})
	for i := 0; i < 2; i++ { // the repeat is idempotent and emits nothing
		if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
			TargetPath: s.target, VolumeCapability: vc, VolumeContext: podCtx}); err != nil {
			t.Fatal(err)
		}
	}
	if err := writeSync(filepath.Join(s.target, "f"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	seq, _, err := eventsClient(t, dir).Flush("", "data", "team-a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatal(err)
	}
	got := rec.wait(t, 6)
	want := []string{"attach", "publish", "ack", "unpublish", "ack", "detach"}
	if len(got) != len(want) {
		t.Fatalf("got %d events, want %d: %+v", len(got), len(want), got)
	}
	for i, ev := range got {
		if ev.Kind != want[i] || ev.Seq != got[0].Seq+uint64(i) || ev.VolumeID != s.id || ev.PVC != "data" ||
			ev.Namespace != "team-a" || ev.PV != "pvc-1" || ev.Node != "e2e-node" || ev.Driver != "rbd.rookzmq.io" {
			t.Errorf("event %d: %+v, want kind %s and seq %d", i, ev, want[i], got[0].Seq+uint64(i))
		}
	}
	if got[1].Pod != "app-0" || got[1].PodUID != "uid-1" || got[3].Pod != "app-0" {
		t.Errorf("publish/unpublish lack the pod: %+v / %+v", got[1], got[3])
	}
	if got[2].Seq != seq || got[2].Trigger != "request" || got[4].Trigger != "unstage" || got[2].FlushMs == nil {
		t.Errorf("acks: %+v, %+v (flush reply seq %d)", got[2], got[4], seq)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: s.id, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
}

func mergeMaps(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// The ack means what it says: a pattern written through a block device, then
// flushed, is read back through a separate librbd client before unstage.
func TestAckMeansCephHasIt(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, blockCap(rwo))
	pattern := bytes.Repeat([]byte("ack-means-ceph-has-it/"), 3000) // 66 KB, unaligned
	f, err := os.OpenFile(s.target, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	// No fsync, and the file stays open (the last close of a block device
	// writes it back): the data sits in the node's caches.
	if _, err := f.WriteAt(pattern, 3<<20); err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img := images(t, prefix)[0]
	// Control: before the flush the data is still in the node's caches (if it
	// were already in Ceph, this test could not fail).
	if bytes.Equal(readImage(t, img, 3<<20, len(pattern)), pattern) {
		t.Fatal("control failed: the pattern reached Ceph before the flush, so the flush proves nothing")
	}
	start := time.Now()
	seq, ms, err := eventsClient(t, dir).Flush(s.id, "", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("flush request answered in %s (flush %.2f ms, ack seq %d)", time.Since(start), ms, seq)
	if got := readImage(t, img, 3<<20, len(pattern)); !bytes.Equal(got, pattern) {
		t.Fatalf("after the ack, librbd reads %q... instead of the pattern", got[:32])
	}
	f.Close()
	unpublishUnstageDelete(t, d, s)
}

// A node plugin SIGKILLed and restarted continues the sequence and replays
// everything journaled before the kill; SIGTERM stops it promptly.
func TestEventsSurviveKill(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("", rwo))
	before, last, err := eventsClient(t, dir).Replay(0, 0)
	if err != nil || len(before) != 2 || last != 2 {
		t.Fatalf("before the kill: %d events, last %d, %v", len(before), last, err)
	}
	d.kill()
	d = startDriver(t, dir, nil)
	unpublishUnstageDelete(t, d, s)
	events, last, err := eventsClient(t, dir).Replay(0, 0)
	if err != nil || len(events) != 5 || last != 5 {
		t.Fatalf("after restart: %d events, last %d, %v", len(events), last, err)
	}
	for i := range before {
		if !bytes.Equal(events[i], before[i]) {
			t.Errorf("event %d changed across the restart: %s vs %s", i, events[i], before[i])
		}
	}
	start := time.Now()
	d.stop() // SIGTERM; fails the test if it takes over 15 s
	if time.Since(start) > 5*time.Second {
		t.Errorf("SIGTERM took %s", time.Since(start))
	}
}

// Prometheus metrics count events, subscribers and CSI calls; /healthz answers.
func TestMetrics(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil, "--metrics-address", addr)
	rec := record(t, dir, 0)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("", rwo))
	if _, _, err := eventsClient(t, dir).Flush(s.id, "", ""); err != nil {
		t.Fatal(err)
	}
	rec.wait(t, 3)
	get := func(path string) string {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
		}
		return string(b)
	}
	if h := get("/healthz"); h != "ok\n" {
		t.Errorf("healthz: %q", h)
	}
	m := get("/metrics")
	for _, want := range []string{
		`rookzmq_events_published_total{kind="attach"} 1`,
		`rookzmq_events_published_total{kind="publish"} 1`,
		`rookzmq_events_published_total{kind="ack"} 1`,
		`rookzmq_csi_call_seconds_count{code="OK",method="/csi.v1.Node/NodeStageVolume"} 1`,
		`rookzmq_volume_flush_seconds_count 1`,
		`rookzmq_event_replay_requests_total`,
		`rookzmq_event_journal_fsync_seconds_count`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if !regexp.MustCompile(`(?m)^rookzmq_event_subscribers [1-9]`).MatchString(m) {
		t.Errorf("no subscriber counted:\n%s", grepLines(m, "subscribers"))
	}
	if _, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: "1-zz"}); err == nil {
		t.Fatal("bad stage succeeded")
	}
	if m := get("/metrics"); !strings.Contains(m, `rookzmq_csi_call_seconds_count{code="InvalidArgument",method="/csi.v1.Node/NodeStageVolume"} 1`) {
		t.Errorf("failed call not counted:\n%s", grepLines(m, "NodeStageVolume"))
	}
	unpublishUnstageDelete(t, d, s)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// ackIntervalSeconds: the node flushes and acks staged volumes periodically,
// and stops at unstage.
func TestAckInterval(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	rec := record(t, dir, 0)
	s := createStagePublish(t, d, uniquePrefix(t), 64<<20, mountCap("", rwo), "ackIntervalSeconds", "1")
	got := rec.wait(t, 4) // attach, publish, 2 periodic acks
	for _, ev := range got[2:4] {
		if ev.Kind != "ack" || ev.Trigger != "interval" {
			t.Errorf("want periodic acks, got %+v", ev)
		}
	}
	unpublishUnstageDelete(t, d, s)
	n := len(rec.snapshot())
	time.Sleep(2500 * time.Millisecond)
	after := rec.snapshot()
	if len(after) != n {
		t.Errorf("events after unstage: %+v", after[n:])
	}
	if last := after[len(after)-1]; last.Kind != "detach" {
		t.Errorf("last event %s, want detach", last.Kind)
	}
	for _, bad := range []string{"0", "x", "100000"} {
		req := createReq("bad-ack", "bad-ack-", 64<<20)
		req.Parameters["ackIntervalSeconds"] = bad
		if _, err := d.ctrl.CreateVolume(ctx(t), req); err == nil || !strings.Contains(err.Error(), "ackIntervalSeconds") {
			t.Errorf("ackIntervalSeconds=%s: %v", bad, err)
		}
	}
}
