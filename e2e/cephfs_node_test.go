package e2e

import (
	"bytes"
	"context"
	"encoding/json"
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

// The CephFS Node service through the real binary: ceph-fuse mounts of
// subvolumes the controller made, as the restricted client.csi-cephfs user.

var rwx = csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER

// cephfsUserSecrets are the mount user's userID/userKey (ceph-csi's csi-cephfs caps).
func cephfsUserSecrets() map[string]string {
	return map[string]string{"userID": env["ROOKZMQ_CEPH_CEPHFS_USER"], "userKey": env["ROOKZMQ_CEPH_CEPHFS_KEY"]}
}

// startCephFSNode runs the binary as CephFS controller and node (ceph-fuse) in dir.
func startCephFSNode(t testing.TB, dir string, extraEnv []string, flags ...string) *driver {
	t.Helper()
	return startCephFSDriver(t, dir, extraEnv, append([]string{"--node=true"}, flags...)...)
}

// fsVolume is a CephFS volume a test created and stages.
type fsVolume struct {
	id, staging string
	context     map[string]string
	capability  *csi.VolumeCapability
}

// createCephFSVolume makes a volume (deleted at the end of the test, once
// unstaged) with its staging path under a fresh directory.
func createCephFSVolume(t *testing.T, d *driver, prefix string, size int64, params ...string) fsVolume {
	t.Helper()
	req := cephfsCreateReq(t, prefix+"vol", prefix, size)
	for i := 0; i+1 < len(params); i += 2 {
		req.Parameters[params[i]] = params[i+1]
	}
	r, err := d.ctrl.CreateVolume(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	v := fsVolume{id: r.GetVolume().GetVolumeId(), staging: filepath.Join(t.TempDir(), "staging"),
		context: r.GetVolume().GetVolumeContext(), capability: mountCap("", rwx)}
	return v
}

func (v fsVolume) stageReq() *csi.NodeStageVolumeRequest {
	return &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: v.capability,
		VolumeContext: v.context, Secrets: cephfsUserSecrets()}
}

func (v fsVolume) publishReq(target string, readOnly bool, podCtx map[string]string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: target,
		VolumeCapability: v.capability, Readonly: readOnly, VolumeContext: mergeMaps(v.context, podCtx)}
}

func stageCephFS(t *testing.T, d *driver, v fsVolume) {
	t.Helper()
	if _, err := d.node.NodeStageVolume(ctx(t), v.stageReq()); err != nil {
		t.Fatalf("stage: %v\n%s", err, tail(d.log, 10))
	}
}

func publishCephFS(t *testing.T, d *driver, v fsVolume, target string, readOnly bool) {
	t.Helper()
	if _, err := d.node.NodePublishVolume(ctx(t), v.publishReq(target, readOnly, nil)); err != nil {
		t.Fatalf("publish at %s: %v\n%s", target, err, tail(d.log, 10))
	}
}

func unpublishCephFS(t *testing.T, d *driver, v fsVolume, target string) {
	t.Helper()
	if _, err := d.node.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: target}); err != nil {
		t.Fatalf("unpublish %s: %v", target, err)
	}
}

func unstageCephFS(t *testing.T, d *driver, v fsVolume) {
	t.Helper()
	if _, err := d.node.NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		t.Fatalf("unstage: %v\n%s", err, tail(d.log, 10))
	}
}

func deleteCephFS(t *testing.T, d *driver, v fsVolume) {
	t.Helper()
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.id, Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatalf("delete: %v", err)
	}
}

// cephfsLeftovers lists mounts, ceph-fuse processes and stage records or
// keyrings under dir.
func cephfsLeftovers(dir string) []string {
	var out []string
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, dir) {
			out = append(out, "mount: "+l)
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if argv0, _, _ := bytes.Cut(b, []byte{0}); filepath.Base(string(argv0)) == "ceph-fuse" && bytes.Contains(b, []byte(dir)) && !zombie(pidOf(p)) {
			out = append(out, "process: "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	files, _ := filepath.Glob(filepath.Join(dir, "state", "volumes", "*"))
	for _, f := range files {
		out = append(out, "state: "+f)
	}
	return out
}

// keyrings lists the keyring files under the driver's state directory.
func keyrings(t *testing.T, dir string) []string {
	t.Helper()
	k, err := filepath.Glob(filepath.Join(dir, "state", "volumes", "*", "keyring"))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// readUntil reads path until it holds want (ceph-fuse's caches are coherent
// across binds of one mount: this returns at once), failing after 10 s.
func readUntil(t *testing.T, path string, want []byte) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := os.ReadFile(path)
		if err == nil && bytes.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s holds %q (%v), want %q", path, got, err, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// One volume staged once (one ceph-fuse) and published at two read-write
// targets and a read-only one at the same time: a file written through one
// is read through the others, the read-only one refuses writes; stats come
// from the quota and rstats; stage, publish, unpublish and unstage are
// idempotent; the events come in order; nothing is left afterwards.
func TestCephFSNodeTwoTargets(t *testing.T) {
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil)
	rec := record(t, dir, 0)
	prefix := uniquePrefix(t)
	v := createCephFSVolume(t, d, prefix, 256<<20, "csi.storage.k8s.io/pvc/name", "shared", "csi.storage.k8s.io/pvc/namespace", "team-b")
	c := ctx(t)

	caps, err := d.node.NodeGetCapabilities(c, &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, cp := range caps.GetCapabilities() {
		got = append(got, cp.GetRpc().GetType().String())
	}
	if want := []string{"STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "GET_VOLUME_HEALTH", "SINGLE_NODE_MULTI_WRITER"}; !slices.Equal(got, want) {
		t.Errorf("node capabilities %v, want %v", got, want)
	}

	stageCephFS(t, d, v)
	stageCephFS(t, d, v) // idempotent: no second mount
	fuses := 0
	for _, l := range cephfsLeftovers(v.staging) {
		if strings.HasPrefix(l, "process: ") {
			fuses++
		}
	}
	if fuses != 1 {
		t.Fatalf("%d ceph-fuse processes for the staging path, want 1", fuses)
	}
	if k := keyrings(t, dir); len(k) != 1 {
		t.Fatalf("keyrings while staged: %v", k)
	} else if fi, err := os.Stat(k[0]); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("keyring %s: %v %v, want mode 0600", k[0], fi.Mode(), err)
	}
	pods := t.TempDir()
	t1, t2, tro := filepath.Join(pods, "pod1", "mount"), filepath.Join(pods, "pod2", "mount"), filepath.Join(pods, "pod3", "mount")
	pod := func(name string) map[string]string {
		return map[string]string{"csi.storage.k8s.io/pod.name": name, "csi.storage.k8s.io/pod.namespace": "team-b", "csi.storage.k8s.io/pod.uid": "uid-" + name}
	}
	for i, p := range []struct {
		target string
		ro     bool
	}{{t1, false}, {t2, false}, {tro, true}} {
		for range 2 { // the repeat changes nothing and emits nothing
			if _, err := d.node.NodePublishVolume(c, v.publishReq(p.target, p.ro, pod("pod"+string(rune('1'+i))))); err != nil {
				t.Fatalf("publish %s: %v", p.target, err)
			}
		}
	}
	data := bytes.Repeat([]byte("written through pod1, read through pod2/"), 50000) // 2 MB
	if err := writeSync(filepath.Join(t1, "shared.txt"), data); err != nil {
		t.Fatal(err)
	}
	readUntil(t, filepath.Join(t2, "shared.txt"), data)
	readUntil(t, filepath.Join(tro, "shared.txt"), data)
	if err := os.WriteFile(filepath.Join(t2, "from-pod2"), []byte("pod2"), 0o644); err != nil {
		t.Fatal(err)
	}
	readUntil(t, filepath.Join(t1, "from-pod2"), []byte("pod2"))
	if err := os.WriteFile(filepath.Join(tro, "nope"), []byte("x"), 0o644); !isErrno(err, syscall.EROFS) {
		t.Errorf("write through the read-only target: %v, want EROFS", err)
	}
	if _, err := os.Stat(filepath.Join(t1, "nope")); !os.IsNotExist(err) {
		t.Errorf("the read-only target's write reached the volume: %v", err)
	}

	// Stats: the quota is the total, rstats the used bytes (exact; they
	// reach the client within a few seconds).
	var st *csi.NodeGetVolumeStatsResponse
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		st, err = d.node.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: t2})
		if err != nil {
			t.Fatal(err)
		}
		if st.GetUsage()[0].GetUsed() == int64(len(data))+4 || time.Now().After(deadline) {
			break
		}
	}
	bytesUse, inodes := st.GetUsage()[0], st.GetUsage()[1]
	if bytesUse.GetTotal() != 256<<20 || bytesUse.GetUsed() != int64(len(data))+4 || bytesUse.GetAvailable() != 256<<20-int64(len(data))-4 ||
		inodes.GetUnit() != csi.VolumeUsage_INODES || inodes.GetUsed() != 3 {
		t.Errorf("stats %v, want total %d, used %d, 3 inodes (2 files and the directory)", st, 256<<20, len(data)+4)
	}
	h, err := d.node.NodeGetVolumeHealth(c, &csi.NodeGetVolumeHealthRequest{VolumeId: v.id, VolumePublishPath: t1})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) != 0 {
		t.Errorf("health: %v %v", h, err)
	}

	seq, _, err := eventsClient(t, dir).Flush("", "shared", "team-b")
	if err != nil {
		t.Fatal(err)
	}
	for _, tg := range []string{t1, t2, tro} {
		unpublishCephFS(t, d, v, tg)
		unpublishCephFS(t, d, v, tg) // idempotent
		if _, err := os.Stat(tg); !os.IsNotExist(err) {
			t.Errorf("target %s left: %v", tg, err)
		}
	}
	unstageCephFS(t, d, v)
	unstageCephFS(t, d, v) // idempotent
	if left := cephfsLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
	want := []string{"attach", "publish", "publish", "publish", "ack", "unpublish", "unpublish", "unpublish", "ack", "detach"}
	events := rec.wait(t, len(want))
	var kinds []string
	for _, ev := range events {
		kinds = append(kinds, ev.Kind)
	}
	if !slices.Equal(kinds, want) {
		t.Fatalf("events %v, want %v", kinds, want)
	}
	for i, ev := range events {
		if ev.Seq != events[0].Seq+uint64(i) || ev.VolumeID != v.id || ev.PVC != "shared" || ev.Namespace != "team-b" ||
			ev.Driver != "cephfs.rookzmq.io" || ev.FsType != "cephfs" {
			t.Errorf("event %d: %+v", i, ev)
		}
	}
	if events[1].Pod != "pod1" || events[3].Pod != "pod3" || events[3].ReadOnly == nil || !*events[3].ReadOnly ||
		events[2].ReadOnly == nil || *events[2].ReadOnly {
		t.Errorf("publish events: %+v %+v %+v", events[1], events[2], events[3])
	}
	if events[4].Seq != seq || events[4].Trigger != "request" || events[8].Trigger != "unstage" {
		t.Errorf("acks: %+v %+v (flush answered seq %d)", events[4], events[8], seq)
	}
	deleteCephFS(t, d, v)
	waitNoCephFSOrphans(t, prefix)
}

// stageRecords reads the driver's stage records as raw JSON objects.
func stageRecords(t *testing.T, dir string) []map[string]any {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, "state", "volumes", "*.json"))
	var out []map[string]any
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

var _ = context.Background
var _ = status.Code
var _ = codes.OK
