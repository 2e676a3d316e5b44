package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
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

// startCephFSNode runs the binary as CephFS controller and node (ceph-fuse)
// in dir; "--controller=false" among flags leaves the node alone.
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
	v := fsVolume{id: r.GetVolume().GetVolumeId(), staging: mountTarget(t),
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
	if want := []string{"STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "GET_VOLUME_HEALTH", "SINGLE_NODE_MULTI_WRITER", "EXPAND_VOLUME"}; !slices.Equal(got, want) {
		t.Errorf("node capabilities %v, want %v", got, want)
	}

	stageCephFS(t, d, v)
	stageCephFS(t, d, v) // idempotent: no second mount
	ro := v.stageReq()
	ro.VolumeCapability = mountCap("", csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)
	if _, err := d.node.NodeStageVolume(c, ro); status.Code(err) != codes.AlreadyExists {
		t.Errorf("stage with another capability: %v, want AlreadyExists", err)
	}
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
	t1, t2, tro := mountTarget(t), mountTarget(t), mountTarget(t)
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

	// Growth is the controller's (the quota); the node reads it back.
	if _, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: v.id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 512 << 20}, Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		e, err := d.node.NodeExpandVolume(c, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: t1,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 512 << 20}})
		if err == nil && e.GetCapacityBytes() == 512<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("NodeExpandVolume after the quota grew: %v %v", e, err)
		}
	}
	if _, err := d.node.NodeExpandVolume(c, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: t1,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("NodeExpandVolume past the quota: %v, want FailedPrecondition", err)
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
	want := []string{"attach", "publish", "publish", "publish", "expand", "ack", "unpublish", "unpublish", "unpublish", "ack", "detach"}
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
	if events[4].SizeBytes != 512<<20 {
		t.Errorf("expand event %+v, want size %d", events[4], 512<<20)
	}
	if events[5].Seq != seq || events[5].Trigger != "request" || events[9].Trigger != "unstage" {
		t.Errorf("acks: %+v %+v (flush answered seq %d)", events[5], events[9], seq)
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

// waitReady polls the Identity probe until the driver reports ready
// (a restarted node first recovers its volumes).
func waitReady(t *testing.T, d *driver) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		r, err := d.ident.Probe(ctx(t), &csi.ProbeRequest{})
		if err == nil && r.GetReady().GetValue() {
			return time.Since(start)
		}
		if time.Since(start) > 2*time.Minute {
			t.Fatalf("not ready after 2 minutes: %v %v\n%s", r, err, tail(d.log, 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// healthReasons are NodeGetVolumeHealth's reasons for a volume (none: healthy).
func healthReasons(t *testing.T, d *driver, id, target string) []string {
	t.Helper()
	h, err := d.node.NodeGetVolumeHealth(ctx(t), &csi.NodeGetVolumeHealthRequest{VolumeId: id, VolumePublishPath: target})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range h.GetVolumeHealth().GetHealthStatuses() {
		out = append(out, e.GetReason())
	}
	return out
}

// Bad node calls answer precise codes naming the problem, at once, and
// leave nothing behind: no record, no mount, no key.
func TestCephFSNodeBadInput(t *testing.T) {
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil)
	c := ctx(t)
	prefix := uniquePrefix(t)
	v := createCephFSVolume(t, d, prefix, 64<<20)
	missingID := "1-02-c1-06-cephfs-03-csi-" + prefix + "missing"
	stage := func(f func(r *csi.NodeStageVolumeRequest)) func() error {
		return func() error { r := v.stageReq(); f(r); _, err := d.node.NodeStageVolume(c, r); return err }
	}
	withCtx := func(k, val string) func() error {
		return stage(func(r *csi.NodeStageVolumeRequest) { r.VolumeContext = mergeMaps(v.context, map[string]string{k: val}) })
	}
	badKey := "AQAA8VNlAAAAABAA6Oqqywpz1H7d5jMJlw+a0Q=="
	cases := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"stage: no volume ID", stage(func(r *csi.NodeStageVolumeRequest) { r.VolumeId = "" }), codes.InvalidArgument, "volume_id is required"},
		{"stage: malformed volume ID", stage(func(r *csi.NodeStageVolumeRequest) { r.VolumeId = "junk" }), codes.InvalidArgument, `"junk"`},
		{"stage: no staging path", stage(func(r *csi.NodeStageVolumeRequest) { r.StagingTargetPath = "" }), codes.InvalidArgument, "staging_target_path is required"},
		{"stage: no capability", stage(func(r *csi.NodeStageVolumeRequest) { r.VolumeCapability = nil }), codes.InvalidArgument, "volume_capability"},
		{"stage: block", stage(func(r *csi.NodeStageVolumeRequest) { r.VolumeCapability = blockCap(rwo) }), codes.InvalidArgument,
			"block access is not supported: a CephFS volume is a shared file system"},
		{"stage: no secrets", stage(func(r *csi.NodeStageVolumeRequest) { r.Secrets = nil }), codes.InvalidArgument,
			"missing secrets userID and userKey (or adminID and adminKey)"},
		{"stage: no user key", stage(func(r *csi.NodeStageVolumeRequest) { r.Secrets = map[string]string{"userID": "x"} }), codes.InvalidArgument,
			"missing secret userKey"},
		{"stage: malformed key", stage(func(r *csi.NodeStageVolumeRequest) {
			r.Secrets = map[string]string{"userID": "x", "userKey": "not-a-key"}
		}),
			codes.InvalidArgument, "secret userKey is not a valid cephx key"},
		{"stage: unknown cluster", stage(func(r *csi.NodeStageVolumeRequest) { r.VolumeId = "1-04-nope-06-cephfs-03-csi-x" }), codes.InvalidArgument,
			`unknown clusterID "nope"`},
		{"stage: unknown mounter", withCtx("mounter", "rbd-fuse"), codes.InvalidArgument, `volume_context mounter: unknown mounter "rbd-fuse"`},
		{"stage: kernel mounter without the ceph module", withCtx("mounter", "kernel"), codes.FailedPrecondition, "no CephFS client"},
		{"stage: bad fuse option", withCtx("fuseMountOptions", "noatime,debug"), codes.InvalidArgument, `option "debug" is not supported`},
		{"stage: path outside the subvolume", withCtx("subvolumePath", "/volumes/csi"), codes.InvalidArgument,
			`volume_context subvolumePath="/volumes/csi" is not a directory of subvolume`},
		{"stage: path escaping the subvolume", withCtx("subvolumePath", v.context["subvolumePath"]+"/../../other"), codes.InvalidArgument,
			"is not a directory of subvolume"},
		{"stage: missing volume", stage(func(r *csi.NodeStageVolumeRequest) { r.VolumeId, r.VolumeContext = missingID, nil }), codes.NotFound,
			"does not exist"},
		{"stage: wrong key", stage(func(r *csi.NodeStageVolumeRequest) {
			r.Secrets = map[string]string{"userID": env["ROOKZMQ_CEPH_CEPHFS_USER"], "userKey": badKey}
		}), codes.PermissionDenied, "ceph-fuse"},
		{"publish: not staged", func() error {
			_, err := d.node.NodePublishVolume(c, v.publishReq(filepath.Join(t.TempDir(), "t"), false, nil))
			return err
		}, codes.FailedPrecondition, "is not staged at"},
		{"publish: no target", func() error {
			_, err := d.node.NodePublishVolume(c, v.publishReq("", false, nil))
			return err
		}, codes.InvalidArgument, "target_path is required"},
		{"publish: block", func() error {
			r := v.publishReq(filepath.Join(t.TempDir(), "t"), false, nil)
			r.VolumeCapability = blockCap(rwo)
			_, err := d.node.NodePublishVolume(c, r)
			return err
		}, codes.InvalidArgument, "block access is not supported"},
		{"stats: missing path", func() error {
			_, err := d.node.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.id, VolumePath: filepath.Join(t.TempDir(), "none")})
			return err
		}, codes.NotFound, "does not exist"},
		{"health: not staged", func() error {
			_, err := d.node.NodeGetVolumeHealth(c, &csi.NodeGetVolumeHealthRequest{VolumeId: v.id})
			return err
		}, codes.NotFound, "is not staged on this node"},
		{"unpublish: never published", func() error {
			_, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: filepath.Join(t.TempDir(), "t")})
			return err
		}, codes.OK, ""},
		{"unstage: never staged", func() error {
			_, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging})
			return err
		}, codes.OK, ""},
	}
	for _, tc := range cases {
		start := time.Now()
		err := tc.call()
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
			t.Errorf("%s: got %v (%v), want %v containing %q", tc.name, status.Code(err), err, tc.code, tc.msg)
		}
		if took := time.Since(start); took > 30*time.Second {
			t.Errorf("%s took %s", tc.name, took)
		}
		if err != nil && strings.Contains(err.Error(), badKey) || err != nil && strings.Contains(err.Error(), env["ROOKZMQ_CEPH_CEPHFS_KEY"]) {
			t.Errorf("%s: a key is in the error", tc.name)
		}
		if left := cephfsLeftovers(dir); len(left) != 0 {
			t.Fatalf("%s left:\n%s", tc.name, strings.Join(left, "\n"))
		}
	}
	deleteCephFS(t, d, v)
}

// No key in the log at -v=10, in an error, in a command line or environment
// (while ceph-fuse starts, too), nor in the stage record; the keyring file
// kept for remounts is 0600 and goes with the unstage.
func TestCephFSNodeSecretsNeverShown(t *testing.T) {
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil, "-v=10")
	v := createCephFSVolume(t, d, uniquePrefix(t), 64<<20)
	key := env["ROOKZMQ_CEPH_CEPHFS_KEY"]
	// A wrong key first: ceph-fuse refuses it; neither key may show.
	bad := v.stageReq()
	bad.Secrets = map[string]string{"userID": env["ROOKZMQ_CEPH_CEPHFS_USER"], "userKey": "AQAA8VNlAAAAABAA6Oqqywpz1H7d5jMJlw+a0Q=="}
	_, err := d.node.NodeStageVolume(ctx(t), bad)
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("stage with a wrong key: %v, want PermissionDenied", err)
	}
	stop := make(chan struct{})
	seen := make(chan []string, 1)
	go func() {
		var all []string
		for {
			all = append(all, keyExposures(key)...)
			select {
			case <-stop:
				seen <- all
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	stageCephFS(t, d, v)
	close(stop)
	if got := append(<-seen, keyExposures(key)...); len(got) != 0 {
		t.Fatalf("the key shows in:\n%s", strings.Join(got, "\n"))
	}
	recs := stageRecords(t, dir)
	b, _ := json.Marshal(recs)
	if len(recs) != 1 || strings.Contains(string(b), key) || recs[0]["userID"] != env["ROOKZMQ_CEPH_CEPHFS_USER"] {
		t.Fatalf("stage records: %s", b)
	}
	k := keyrings(t, dir)
	if len(k) != 1 {
		t.Fatalf("keyrings %v", k)
	}
	if fi, err := os.Stat(k[0]); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("keyring mode %v %v", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Dir(k[0])); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("keyring directory mode %v %v", fi.Mode(), err)
	}
	target := mountTarget(t)
	publishCephFS(t, d, v, target, false)
	if _, _, err := eventsClient(t, dir).Flush(v.id, "", ""); err != nil {
		t.Fatal(err)
	}
	unpublishCephFS(t, d, v, target)
	unstageCephFS(t, d, v)
	if k := keyrings(t, dir); len(k) != 0 {
		t.Fatalf("keyrings after unstage: %v", k)
	}
	deleteCephFS(t, d, v)
	d.stop()
	logb, rerr := os.ReadFile(d.log)
	if rerr != nil {
		t.Fatal(rerr)
	}
	if !strings.Contains(string(logb), "NodeStageVolume") || !strings.Contains(string(logb), "ceph-fuse mounted") {
		t.Fatal("the log has no NodeStageVolume or mount line at -v=10: the test proves nothing")
	}
	for _, k := range []string{key, bad.Secrets["userKey"]} {
		if strings.Contains(string(logb), k) || strings.Contains(fmt.Sprint(err), k) {
			t.Errorf("a key appears in the log or an error (%v)", err)
		}
	}
}

// ackIntervalSeconds: the node flushes a staged CephFS volume and acks it
// periodically, and stops at unstage.
func TestCephFSNodeAckInterval(t *testing.T) {
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil)
	rec := record(t, dir, 0)
	v := createCephFSVolume(t, d, uniquePrefix(t), 64<<20, "ackIntervalSeconds", "1")
	target := mountTarget(t)
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, target, false)
	for _, ev := range rec.wait(t, 4)[2:4] { // attach, publish, 2 periodic acks
		if ev.Kind != "ack" || ev.Trigger != "interval" || ev.Flushed == nil || !*ev.Flushed {
			t.Errorf("want periodic acks, got %+v", ev)
		}
	}
	unpublishCephFS(t, d, v, target)
	unstageCephFS(t, d, v)
	n := len(rec.snapshot())
	time.Sleep(2500 * time.Millisecond)
	if after := rec.snapshot(); len(after) != n || after[n-1].Kind != "detach" {
		t.Errorf("events after unstage: %+v", after[n-1:])
	}
	deleteCephFS(t, d, v)
}
