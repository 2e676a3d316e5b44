package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A ceph-fuse that dies while the driver runs. Kubelet never stages a volume
// again for a new pod on the node, so NodePublishVolume mounts the lost stage
// again in place (and binds the other targets again); and with
// --repair-interval the node does it by itself, with no CSI call. Without
// either the new pod's publish fails (FailedPrecondition) until every pod of
// the volume on the node is gone and it is staged afresh.
func TestCephFSNodeRepairsLostStage(t *testing.T) {
	ctrl := startCephFSDriver(t, newDriverDir(t), nil) // a killed controller's MDS session would hold caps
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil, "--controller=false")
	v := createCephFSVolume(t, ctrl, uniquePrefix(t), 1<<30)
	t1, t2 := mountTarget(t), mountTarget(t)
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, t1, false)
	if err := writeSync(filepath.Join(t1, "before"), []byte("written before ceph-fuse died")); err != nil {
		t.Fatal(err)
	}
	pid := cephFusePid(v.staging)
	killFuse(t, v.staging, pid)
	if _, err := os.ReadFile(filepath.Join(t1, "before")); err == nil {
		t.Fatal("the target still reads with ceph-fuse dead: the test proves nothing")
	}

	// A new pod's publish, the loop off.
	start := time.Now()
	if _, err := d.node.NodePublishVolume(ctx(t), v.publishReq(t2, false, nil)); err != nil {
		t.Fatalf("publish for a new pod after ceph-fuse died: %v", err)
	}
	t.Logf("publish repaired the lost stage in %s", time.Since(start).Round(time.Millisecond))
	if now := cephFusePid(v.staging); now == 0 || now == pid {
		t.Fatalf("no new ceph-fuse (was %d, now %d)", pid, now)
	}
	for _, tg := range []string{t1, t2} { // the old pod's target is bound again too
		if b, err := os.ReadFile(filepath.Join(tg, "before")); err != nil || string(b) != "written before ceph-fuse died" {
			t.Fatalf("%s after the repair: %q %v\n%s", tg, b, err, tail(d.log, 20))
		}
	}

	// The loop, with no CSI call at all.
	d.kill()
	d = startCephFSNode(t, dir, nil, "--controller=false", "--repair-interval=500ms")
	waitReady(t, d)
	pid = cephFusePid(v.staging)
	killFuse(t, v.staging, pid)
	start = time.Now()
	for deadline := start.Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		b, err := os.ReadFile(filepath.Join(t1, "before"))
		if err == nil && string(b) == "written before ceph-fuse died" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the lost stage was not repaired within 30 s: %q %v\n%s", b, err, tail(d.log, 20))
		}
	}
	t.Logf("the repair loop brought the targets back %s after ceph-fuse died", time.Since(start).Round(time.Millisecond))
	if now := cephFusePid(v.staging); now == 0 || now == pid {
		t.Fatalf("no new ceph-fuse (was %d, now %d)", pid, now)
	}
	if err := writeSync(filepath.Join(t2, "after"), []byte("written after the repair")); err != nil {
		t.Fatal(err)
	}
	readUntil(t, filepath.Join(t1, "after"), []byte("written after the repair"))
	if r := healthReasons(t, d, v.id, t1); len(r) != 0 {
		t.Fatalf("health after the repair: %v", r)
	}
	if log := string(must(os.ReadFile(d.log))); !strings.Contains(log, `"volume remounted"`) || !strings.Contains(log, `"recovery of staged volumes done" volumes=1 repaired=1 failed=0`) {
		t.Errorf("the log does not say what the repair did:\n%s", tail(d.log, 20))
	}
	unpublishCephFS(t, d, v, t1)
	unpublishCephFS(t, d, v, t2)
	unstageCephFS(t, d, v)
	if left := cephfsLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
	deleteCephFS(t, ctrl, v)
}
