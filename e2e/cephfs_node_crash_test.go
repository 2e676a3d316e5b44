package e2e

import (
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The CephFS node when things die: ceph-fuse, the driver, both; a hung mount.

// Flush -> ack means durable in RADOS: what a workload wrote through a pod's
// target without fsync is read back (size and content) by a separate
// libcephfs client after the ceph-fuse daemon is SIGKILLed the moment the
// ack arrives. The control round (the same writes, ceph-fuse killed without a
// flush) must lose data, or the test proves nothing. Meanwhile: a dead
// ceph-fuse is reported INACCESSIBLE, its flush is refused (no ack),
// NodeStageVolume mounts it again and NodePublishVolume binds the lost target
// again; unstage of a dead mount succeeds.
func TestCephFSNodeFlushAckDurable(t *testing.T) {
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil)
	rec := record(t, dir, 0)
	prefix := uniquePrefix(t)
	v := createCephFSVolume(t, d, prefix, 1<<30)
	path := v.context["subvolumePath"]
	target := mountTarget(t)
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, target, false)

	control := writeWorkload(t, target, "control")
	pid := cephFusePid(v.staging)
	killFuse(t, v.staging, pid)
	control.release()
	lost := control.lost(t, path)
	if len(lost) == 0 {
		t.Fatal("control: every write reached RADOS without a flush, so the flush proves nothing")
	}
	t.Logf("control (no flush, ceph-fuse killed): lost %s", strings.Join(lost, "; "))
	if r := healthReasons(t, d, v.id, target); !slices.Contains(r, "MappingLost") {
		t.Errorf("health of a volume whose ceph-fuse died: %v, want MappingLost", r)
	}
	if _, _, err := eventsClient(t, dir).Flush(v.id, "", ""); err == nil {
		t.Error("a flush of a dead mount was acknowledged")
	}

	// The kubelet way back: stage again (the stale stage is cleared and
	// mounted anew), publish again (the lost bind is made again).
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, target, false)
	if r := healthReasons(t, d, v.id, target); len(r) != 0 {
		t.Fatalf("health after staging again: %v", r)
	}
	pid = cephFusePid(v.staging)
	w := writeWorkload(t, target, "flushed")
	start := time.Now()
	seq, ms, err := eventsClient(t, dir).Flush(v.id, "", "")
	syscall.Kill(pid, syscall.SIGKILL) // at once: nothing ceph-fuse does after the ack may count
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("flush request answered in %s (flush %.1f ms, ack seq %d)", time.Since(start), ms, seq)
	killFuse(t, v.staging, pid)
	w.release()
	if lost := w.lost(t, path); len(lost) != 0 {
		t.Fatalf("lost after the ack and a SIGKILL of ceph-fuse: %s", strings.Join(lost, "; "))
	}
	unpublishCephFS(t, d, v, target)
	unstageCephFS(t, d, v) // of a dead mount
	if left := cephfsLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
	events := rec.wait(t, 8)
	var kinds []string
	for _, ev := range events {
		kinds = append(kinds, ev.Kind)
	}
	// attach, publish; (dead) stage again: attach; publish (the rebind); ack; unpublish; ack; detach
	want := []string{"attach", "publish", "attach", "publish", "ack", "unpublish", "ack", "detach"}
	if !slices.Equal(kinds, want) {
		t.Fatalf("events %v, want %v", kinds, want)
	}
	if events[4].Seq != seq || events[4].Flushed == nil || !*events[4].Flushed || events[6].Flushed == nil || *events[6].Flushed {
		t.Errorf("acks %+v, %+v: want the request's flushed, the dead mount's unstage not", events[4], events[6])
	}
	deleteCephFS(t, d, v)
}

// A node plugin SIGKILLed while a pod writes (the controller runs apart, as
// in a cluster): the ceph-fuse mount lives on in its own session, the writer never sees an error, and the restarted driver
// finds the mount healthy (same daemon), reports ready and serves the volume.
func TestCephFSNodeDriverKillWriterContinues(t *testing.T) {
	ctrl := startCephFSDriver(t, newDriverDir(t), nil) // a killed controller's MDS session would hold caps
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil, "--controller=false")
	prefix := uniquePrefix(t)
	v := createCephFSVolume(t, ctrl, prefix, 1<<30)
	target := mountTarget(t)
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, target, false)
	pid := cephFusePid(v.staging)

	f, err := os.OpenFile(filepath.Join(target, "log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	stop, done := make(chan struct{}), make(chan error, 1)
	lines := 0
	go func() {
		defer f.Close()
		for {
			select {
			case <-stop:
				done <- f.Sync()
				return
			default:
			}
			if _, err := f.WriteString(strings.Repeat("x", 99) + "\n"); err != nil {
				done <- err
				return
			}
			lines++
			if lines%10 == 0 {
				if err := f.Sync(); err != nil {
					done <- err
					return
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(500 * time.Millisecond)
	d.kill()
	time.Sleep(500 * time.Millisecond)
	d = startCephFSNode(t, dir, nil, "--controller=false")
	took := waitReady(t, d)
	time.Sleep(500 * time.Millisecond)
	close(stop)
	if err := <-done; err != nil {
		t.Fatalf("the writer failed across the driver's restart: %v", err)
	}
	t.Logf("%d lines written; the restarted driver was ready after %s", lines, took)
	if now := cephFusePid(v.staging); now != pid {
		t.Fatalf("ceph-fuse %d replaced by %d: the restart should have found it healthy", pid, now)
	}
	if r := healthReasons(t, d, v.id, target); len(r) != 0 {
		t.Fatalf("health after the restart: %v", r)
	}
	if fi, err := os.Stat(filepath.Join(target, "log")); err != nil || fi.Size() != int64(lines)*100 {
		t.Fatalf("log is %v bytes (%v), want %d", fi.Size(), err, lines*100)
	}
	if b, _ := os.ReadFile(d.log); !strings.Contains(string(b), `"recovery of staged volumes done" volumes=1 repaired=0 failed=0`) {
		t.Errorf("the restarted driver did not check the staged volume:\n%s", tail(d.log, 20))
	}
	unpublishCephFS(t, d, v, target)
	unstageCephFS(t, d, v)
	if size, _ := readBack(t, v.context["subvolumePath"]+"/log"); size != int64(lines)*100 {
		t.Fatalf("another client reads %d bytes, want %d", size, lines*100)
	}
	if left := cephfsLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
	deleteCephFS(t, ctrl, v)
}

// ceph-fuse dies while the driver is down: the restarted driver mounts the
// subvolume again and binds both pod targets (one read-only, one held busy
// by an open file) again before it reports ready; the pods read and write
// through them, the read-only one still refuses writes.
func TestCephFSNodeRecoversDeadFuse(t *testing.T) {
	ctrl := startCephFSDriver(t, newDriverDir(t), nil) // a killed controller's MDS session would hold caps
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil, "--controller=false")
	prefix := uniquePrefix(t)
	v := createCephFSVolume(t, ctrl, prefix, 1<<30)
	t1, t2 := mountTarget(t), mountTarget(t)
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, t1, false)
	publishCephFS(t, d, v, t2, true)
	if err := writeSync(filepath.Join(t1, "before"), []byte("written before ceph-fuse died")); err != nil {
		t.Fatal(err)
	}
	busy, err := os.Open(filepath.Join(t1, "before")) // keeps t1's bind busy
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	pid := cephFusePid(v.staging)
	d.kill()
	killFuse(t, v.staging, pid)
	if _, err := os.ReadFile(filepath.Join(t2, "before")); err == nil {
		t.Fatal("the target still reads with ceph-fuse dead: the test proves nothing")
	}

	// Restarted with a 3 s pause before the remount: not ready until it is done.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	d = startCephFSNode(t, dir, []string{"ROOKZMQ_PAUSE_AT=node-recover-remount"}, "--controller=false", "--metrics-address", addr)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(tail(d.log, 50), "pause point reached"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("recovery never paused:\n%s", tail(d.log, 20))
		}
	}
	if r, err := d.ident.Probe(ctx(t), &csi.ProbeRequest{}); err != nil || r.GetReady().GetValue() {
		t.Errorf("Probe while recovering: %v %v, want not ready", r, err)
	}
	if resp, err := http.Get("http://" + addr + "/healthz"); err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/healthz while recovering: %v %v, want 503", resp, err)
	} else {
		resp.Body.Close()
	}
	took := waitReady(t, d)
	t.Logf("ready %s after the pause", took)
	if resp, err := http.Get("http://" + addr + "/healthz"); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz after recovery: %v %v, want 200", resp, err)
	} else {
		resp.Body.Close()
	}
	now := cephFusePid(v.staging)
	if now == 0 || now == pid {
		t.Fatalf("no new ceph-fuse (was %d, now %d)\n%s", pid, now, tail(d.log, 20))
	}
	for _, tg := range []string{t1, t2} {
		if b, err := os.ReadFile(filepath.Join(tg, "before")); err != nil || string(b) != "written before ceph-fuse died" {
			t.Fatalf("%s after recovery: %q %v\n%s", tg, b, err, tail(d.log, 20))
		}
	}
	if err := writeSync(filepath.Join(t1, "after"), []byte("written after recovery")); err != nil {
		t.Fatal(err)
	}
	readUntil(t, filepath.Join(t2, "after"), []byte("written after recovery"))
	if err := os.WriteFile(filepath.Join(t2, "nope"), nil, 0o644); !isErrno(err, syscall.EROFS) {
		t.Errorf("the read-only target after recovery: write %v, want EROFS", err)
	}
	if r := healthReasons(t, d, v.id, t1); len(r) != 0 {
		t.Fatalf("health after recovery: %v", r)
	}
	if b, _ := os.ReadFile(d.log); !strings.Contains(string(b), "volume remounted") || !strings.Contains(string(b), `"targets bound again"`) {
		t.Errorf("the log does not say what recovery did:\n%s", tail(d.log, 20))
	}
	if _, err := busy.Read(make([]byte, 1)); err == nil {
		t.Error("a file opened through the dead mount still reads") // documented: it stays broken
	}
	busy.Close()
	unpublishCephFS(t, d, v, t1)
	unpublishCephFS(t, d, v, t2)
	unstageCephFS(t, d, v)
	if left := cephfsLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
	deleteCephFS(t, ctrl, v)
}

// Stats and health answer within their bound when the mount hangs (its
// ceph-fuse stopped): Unavailable, and MountHung; they work again after.
func TestCephFSNodeStatsBounded(t *testing.T) {
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil)
	v := createCephFSVolume(t, d, uniquePrefix(t), 1<<30)
	target := mountTarget(t)
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, target, false)
	pid := cephFusePid(v.staging)
	syscall.Kill(pid, syscall.SIGSTOP)
	defer syscall.Kill(pid, syscall.SIGCONT)
	start := time.Now()
	_, err := d.node.NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: target})
	if status.Code(err) != codes.Unavailable || time.Since(start) > 8*time.Second {
		t.Fatalf("stats of a hung mount: %v after %s, want Unavailable within about 5 s", err, time.Since(start))
	}
	start = time.Now()
	r := healthReasons(t, d, v.id, target)
	// Three probes (the daemon, the target, the staging path), 5 s each at most.
	if !slices.Contains(r, "MountHung") || time.Since(start) > 18*time.Second {
		t.Fatalf("health of a hung mount: %v after %s, want MountHung within about 15 s", r, time.Since(start))
	}
	syscall.Kill(pid, syscall.SIGCONT)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, err := d.node.NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: target})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats after the mount answers again: %v", err)
		}
	}
	unpublishCephFS(t, d, v, target)
	unstageCephFS(t, d, v)
	deleteCephFS(t, d, v)
}

// A driver SIGKILLed at each point of a stage or unstage leaves nothing a
// retry does not finish or clean up: the retried stage mounts once, the
// unstage after it leaves no mount, daemon, record or keyring. The node runs
// in a process of its own, as in a cluster: a SIGKILLed controller's MDS
// session would hold the new subvolume's capabilities until it times out.
func TestCephFSNodeCrashDuringStage(t *testing.T) {
	ctrl := startCephFSDriver(t, newDriverDir(t), nil)
	for _, point := range []string{"cephfs-stage-after-keyring", "stage-after-attach", "unstage-after-ack"} {
		t.Run(point, func(t *testing.T) {
			dir := newDriverDir(t)
			d := startCephFSNode(t, dir, []string{"ROOKZMQ_CRASH_AT=" + point}, "--controller=false")
			v := createCephFSVolume(t, ctrl, uniquePrefix(t), 64<<20)
			_, err := d.node.NodeStageVolume(ctx(t), v.stageReq())
			if point == "unstage-after-ack" {
				if err != nil {
					t.Fatal(err)
				}
				_, err = d.node.NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
			}
			if err == nil {
				t.Fatalf("the driver did not crash at %s", point)
			}
			for d.alive() {
				time.Sleep(10 * time.Millisecond)
			}
			d = startCephFSNode(t, dir, nil, "--controller=false")
			waitReady(t, d)
			if point != "unstage-after-ack" {
				stageCephFS(t, d, v)
				if n := strings.Count(strings.Join(cephfsLeftovers(v.staging), "\n"), "process: "); n != 1 {
					t.Fatalf("%d ceph-fuse daemons after the retried stage, want 1", n)
				}
				target := mountTarget(t)
				publishCephFS(t, d, v, target, false)
				if err := writeSync(filepath.Join(target, "f"), []byte("after the crash")); err != nil {
					t.Fatal(err)
				}
				unpublishCephFS(t, d, v, target)
			}
			unstageCephFS(t, d, v)
			if left := cephfsLeftovers(dir); len(left) != 0 {
				t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
			}
			deleteCephFS(t, ctrl, v)
		})
	}
}
