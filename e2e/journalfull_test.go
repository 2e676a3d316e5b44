package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// fillFS writes a file in dir until its file system is full, and returns it.
func fillFS(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "filler")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, n := range []int{64 << 10, 1 << 10, 1} {
		buf := make([]byte, n)
		for {
			if _, err := f.Write(buf); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					t.Fatal(err)
				}
				break
			}
		}
	}
	return p
}

// With the events directory's file system full, the CSI calls that must
// emit an event fail with Unavailable (instead of succeeding while the event
// is lost), a flush request gets an error reply; once there is space again,
// the retried calls succeed and each event is published exactly once.
func TestEventsJournalDiskFull(t *testing.T) {
	dir := newDriverDir(t)
	events := filepath.Join(dir, "events")
	if err := os.MkdirAll(events, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", events, "tmpfs", 0, "size=4m,mode=0700"); err != nil {
		t.Fatalf("mounting a small tmpfs for the events: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(events, syscall.MNT_DETACH) })
	d := startDriver(t, dir, nil)
	rec := record(t, dir, 0)
	c := ctx(t)
	prefix := uniquePrefix(t)
	vc := mountCap("", rwo)
	req := createReq(prefix+"vol", prefix, 64<<20)
	req.Parameters["csi.storage.k8s.io/pvc/name"] = "full"
	req.Parameters["csi.storage.k8s.io/pvc/namespace"] = "team-f"
	r, err := d.ctrl.CreateVolume(c, req)
	if err != nil {
		t.Fatal(err)
	}
	id, vctx := r.GetVolume().GetVolumeId(), r.GetVolume().GetVolumeContext()
	staging := filepath.Join(t.TempDir(), "s")
	stage := func() error {
		_, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			VolumeCapability: vc, VolumeContext: vctx, Secrets: secrets()})
		return err
	}
	wantUnavailable := func(what string, err error) {
		t.Helper()
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("%s with the journal's disk full: %v, want Unavailable\n%s", what, err, tail(d.log, 10))
		}
	}

	filler := fillFS(t, events)
	for i := 0; i < 2; i++ { // kubelet's retries fail the same way while it is full
		wantUnavailable("NodeStageVolume", stage())
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := stage(); err != nil {
		t.Fatalf("NodeStageVolume once there is space: %v", err)
	}

	// Publish to new targets until the journal needs space it cannot get
	// (the segment's last page may hold a few more records).
	filler = fillFS(t, events)
	var targets []string
	var failed string
	for i := 0; i < 40 && failed == ""; i++ {
		target := filepath.Join(t.TempDir(), "t")
		_, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: vc, VolumeContext: vctx})
		switch {
		case err == nil:
			targets = append(targets, target)
		case status.Code(err) == codes.Unavailable:
			failed = target
		default:
			t.Fatalf("publish: %v", err)
		}
	}
	if failed == "" {
		t.Fatal("40 publishes succeeded with the events' file system full")
	}
	wantUnavailable("NodePublishVolume (retried)", func() error {
		_, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: failed, VolumeCapability: vc, VolumeContext: vctx})
		return err
	}())
	seq, _, err := eventsClient(t, dir).Flush(id, "", "")
	var re *zmqbridge.ReplyError
	if !errors.As(err, &re) || re.Code != zmqbridge.CodeUnavailable || seq != 0 {
		t.Fatalf("flush with the journal's disk full: seq %d, %v; want an error with code unavailable", seq, err)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: failed, VolumeCapability: vc, VolumeContext: vctx}); err != nil {
		t.Fatalf("publish once there is space: %v", err)
	}
	targets = append(targets, failed)
	if seq, _, err = eventsClient(t, dir).Flush(id, "", ""); err != nil || seq == 0 {
		t.Fatalf("flush once there is space: seq %d, %v", seq, err)
	}
	for _, target := range targets {
		if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	n := len(targets)
	got := rec.wait(t, 1+n+1+n+2)
	count := map[string]int{}
	for i, ev := range got {
		count[ev.Kind]++
		if i > 0 && ev.Seq <= got[i-1].Seq {
			t.Errorf("event %d: seq %d after %d", i, ev.Seq, got[i-1].Seq)
		}
		if ev.VolumeID != id {
			t.Errorf("event %d is of volume %s", i, ev.VolumeID)
		}
	}
	want := map[string]int{"attach": 1, "publish": n, "ack": 2, "unpublish": n, "detach": 1}
	for k, v := range want {
		if count[k] != v {
			t.Errorf("%d %s events, want %d (all: %v)", count[k], k, v, count)
		}
	}
	if len(got) != 2*n+4 {
		t.Errorf("%d events, want %d: %v", len(got), 2*n+4, count)
	}
}

// A NodeUnstageVolume retried after the node plugin died between the ack and
// the unmount publishes no second ack: attach, ack, detach, each once.
func TestUnstageRetryAcksOnce(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=unstage-after-ack"})
	prefix := uniquePrefix(t)
	vc := mountCap("", rwo)
	r, err := d.ctrl.CreateVolume(ctx(t), createReq(prefix+"vol", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	staging := filepath.Join(t.TempDir(), "s")
	if _, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: vc, VolumeContext: r.GetVolume().GetVolumeContext(), Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	unstage := func(d *driver) error {
		_, err := d.node.NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		return err
	}
	if err := unstage(d); err == nil {
		t.Fatal("unstage succeeded although the driver was to crash after the ack")
	}
	waitDead(t, d)
	d.kill()
	d = startDriver(t, dir, nil)
	if err := unstage(d); err != nil {
		t.Fatalf("retried unstage: %v", err)
	}
	deleteEventually(t, d, id)
	recs, _, err := eventsClient(t, dir).Replay(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, raw := range recs {
		var ev zmqbridge.Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.VolumeID == id {
			kinds = append(kinds, ev.Kind)
		}
	}
	if strings.Join(kinds, ",") != "attach,ack,detach" {
		t.Fatalf("events %v, want attach, ack, detach", kinds)
	}
}

// An ack published when nothing could be flushed (the staging mount was
// already gone) says so: "flushed": false; a real flush says true.
func TestAckSaysWhetherFlushed(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("", rwo))
	c := ctx(t)
	if _, _, err := eventsClient(t, dir).Flush(s.id, "", ""); err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Unmount(s.staging, 0); err != nil { // gone behind the driver's back
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatal(err)
	}
	deleteEventually(t, d, s.id)
	recs, _, err := eventsClient(t, dir).Replay(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var acks []string
	for _, raw := range recs {
		var ev zmqbridge.Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.Kind == zmqbridge.KindAck && ev.VolumeID == s.id {
			if ev.Flushed == nil {
				t.Fatalf("ack without flushed: %s", raw)
			}
			acks = append(acks, ev.Trigger+"="+strconv.FormatBool(*ev.Flushed))
		}
	}
	if strings.Join(acks, ",") != "request=true,unstage=false" {
		t.Fatalf("acks %v, want request=true, unstage=false", acks)
	}
}

// A NodeUnstageVolume whose detach event the journal cannot record (its file
// system full) fails with Unavailable after unmounting and unmapping. Until
// kubelet's retry ends it, a flush of that volume is answered "unavailable"
// (it is neither flushable nor gone), also by a node plugin restarted
// meanwhile; once the retry succeeded, "not_found". The volume's events:
// attach, ack, detach, each once.
func TestDetachJournalFailedFlush(t *testing.T) {
	dir := newDriverDir(t)
	events := filepath.Join(dir, "events")
	if err := os.MkdirAll(events, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", events, "tmpfs", 0, "size=4m,mode=0700"); err != nil {
		t.Fatalf("mounting a small tmpfs for the events: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(events, syscall.MNT_DETACH) })
	d := startDriver(t, dir, []string{"ROOKZMQ_PAUSE_AT=unstage-before-detach"})
	c := ctx(t)
	prefix := uniquePrefix(t)
	vc := mountCap("", rwo)
	stageNew := func(name, pvc string) (id string, vctx map[string]string, staging string) {
		t.Helper()
		req := createReq(prefix+name, prefix, 64<<20)
		req.Parameters["csi.storage.k8s.io/pvc/name"] = pvc
		req.Parameters["csi.storage.k8s.io/pvc/namespace"] = "team-d"
		r, err := d.ctrl.CreateVolume(c, req)
		if err != nil {
			t.Fatal(err)
		}
		id, vctx, staging = r.GetVolume().GetVolumeId(), r.GetVolume().GetVolumeContext(), filepath.Join(t.TempDir(), "s")
		if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			VolumeCapability: vc, VolumeContext: vctx, Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
		return id, vctx, staging
	}
	// The padding volume's events are 40 bytes shorter than the detach.
	id, _, staging := stageNew("vol", "detach-under-a-full-journal-"+strings.Repeat("x", 40))
	pad, padCtx, padStaging := stageNew("pad", "p")
	unstage := func(d *driver) error {
		_, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		return err
	}
	flushCode := func(what string) string {
		t.Helper()
		seq, _, err := eventsClient(t, dir).Flush(id, "", "")
		var re *zmqbridge.ReplyError
		if !errors.As(err, &re) {
			t.Fatalf("flush %s: seq %d, %v; want an error reply", what, seq, err)
		}
		return re.Code
	}

	var filler string
	var padTargets []string
	defer func() { // on failure, leave nothing behind: free the space, undo it all
		if !t.Failed() || !d.alive() {
			return
		}
		os.Remove(filler)
		for _, target := range padTargets {
			d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: pad, TargetPath: target})
		}
		d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: pad, StagingTargetPath: padStaging})
		unstage(d)
		for _, v := range []string{id, pad} {
			d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: v, Secrets: secrets()})
		}
	}()

	errc := make(chan error, 1)
	go func() { errc <- unstage(d) }()
	for !strings.Contains(readFileString(d.log), `"pause point reached"`) {
		select {
		case err := <-errc:
			t.Fatalf("unstage ended before its pause point: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	// Meanwhile fill the file system, then the segment's last page with the
	// padding volume's publishes until one no longer fits: the detach does not.
	filler = fillFS(t, events)
	for i := 0; ; i++ {
		target := filepath.Join(t.TempDir(), "t")
		padTargets = append(padTargets, target)
		_, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: pad, StagingTargetPath: padStaging,
			TargetPath: target, VolumeCapability: vc, VolumeContext: padCtx})
		if status.Code(err) == codes.Unavailable {
			break
		}
		if err != nil || i == 40 {
			t.Fatalf("padding publish %d: %v", i, err)
		}
	}
	if err := <-errc; status.Code(err) != codes.Unavailable {
		t.Fatalf("unstage whose detach the full journal refuses: %v, want Unavailable\n%s", err, tail(d.log, 10))
	}
	if code := flushCode("after the failed detach"); code != zmqbridge.CodeUnavailable {
		t.Fatalf("flush of the half-unstaged volume: code %s, want unavailable", code)
	}
	d.stop()
	d = startDriver(t, dir, nil)
	if code := flushCode("after a restart"); code != zmqbridge.CodeUnavailable {
		t.Fatalf("flush of the half-unstaged volume after a restart: code %s, want unavailable", code)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := unstage(d); err != nil {
		t.Fatalf("retried unstage once there is space: %v", err)
	}
	if code := flushCode("after the retried unstage"); code != zmqbridge.CodeNotFound {
		t.Fatalf("flush of the unstaged volume: code %s, want not_found", code)
	}

	for _, target := range padTargets {
		if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: pad, StagingTargetPath: padStaging,
			TargetPath: target, VolumeCapability: vc, VolumeContext: padCtx}); err != nil {
			t.Fatal(err)
		}
		if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: pad, TargetPath: target}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: pad, StagingTargetPath: padStaging}); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{id, pad} {
		deleteEventually(t, d, v)
	}
	recs, _, err := eventsClient(t, dir).Replay(0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, raw := range recs {
		var ev zmqbridge.Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			t.Fatal(err)
		}
		if ev.VolumeID == id {
			kinds = append(kinds, ev.Kind)
		}
	}
	if strings.Join(kinds, ",") != "attach,ack,detach" {
		t.Fatalf("events of the volume %v, want attach, ack, detach", kinds)
	}
}
