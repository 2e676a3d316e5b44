package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// toolDir is a directory of tool wrappers put first on the driver's PATH.
type toolDir struct {
	t   *testing.T
	dir string
}

func newToolDir(t *testing.T) *toolDir {
	return &toolDir{t: t, dir: t.TempDir()}
}

// add writes an executable script named name.
func (d *toolDir) add(name, body string) {
	d.t.Helper()
	if err := os.WriteFile(filepath.Join(d.dir, name), []byte("#!/bin/bash\n"+body), 0o755); err != nil {
		d.t.Fatal(err)
	}
}

// env is the driver environment that puts the wrappers first.
func (d *toolDir) env() []string {
	return []string{"PATH=" + d.dir + ":" + os.Getenv("PATH")}
}

func (d *toolDir) file(name string) string { return filepath.Join(d.dir, name) }

func (d *toolDir) read(name string) string {
	b, _ := os.ReadFile(d.file(name))
	return string(b)
}

func (d *toolDir) set(name, content string) {
	d.t.Helper()
	if err := os.WriteFile(d.file(name), []byte(content), 0o644); err != nil {
		d.t.Fatal(err)
	}
}

// fakeRBD installs an `rbd` that logs its arguments to rbd.log and, by the
// content of the file "mode": fails (exit 1 with a message on stderr), hangs,
// or lists the image named in the file "mapped" (an empty list without it).
func fakeRBD(t *testing.T) *toolDir {
	d := newToolDir(t)
	d.add("rbd", fmt.Sprintf(`echo "$*" >> %[1]s/rbd.log
case "$(cat %[1]s/mode 2>/dev/null)" in
fail) echo "rbd: injected failure: connection refused" >&2; exit 1;;
hang) exec sleep 1000;;
esac
case "$1 $2" in
"device list") if [ -f %[1]s/mapped ]; then cat %[1]s/mapped; else echo '[]'; fi;;
"device unmap") rm -f %[1]s/mapped;;
*) echo "rbd: unexpected call" >&2; exit 22;;
esac
`, d.dir))
	return d
}

// stageFile is the stage record path of volumeID under the driver's state directory.
func stageFile(dir, volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return filepath.Join(dir, "state", "volumes", hex.EncodeToString(sum[:16])+".json")
}

// writeKRBDRecord makes the node believe volumeID is staged with krbd at
// staging (krbd cannot map on this machine: the record stands in for it).
func writeKRBDRecord(t *testing.T, dir, volumeID, image, staging string) {
	t.Helper()
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Fatal(err)
	}
	rec := map[string]any{
		"volumeID": volumeID, "stagingPath": staging, "mounter": "krbd", "device": "/dev/rbd7",
		"pool": "rbd", "image": image, "block": false, "fsType": "ext4", "readOnly": false,
		"accessMode": "SINGLE_NODE_WRITER", "volumeContext": map[string]string{"mounter": "krbd"},
		"bootID": strings.TrimSpace(string(boot)), "announced": true, "staged": true,
	}
	b, _ := json.Marshal(rec)
	path := stageFile(dir, volumeID)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// mountTmpfs mounts a small tmpfs at path (a live "staging mount").
func mountTmpfs(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(path, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", path, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(path, unix.MNT_DETACH) })
}

func mounted(path string) bool {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 4 && f[4] == path {
			return true
		}
	}
	return false
}

func kinds(evs []zmqbridge.Event, volumeID string) []string {
	var out []string
	for _, ev := range evs {
		if ev.VolumeID == volumeID {
			out = append(out, ev.Kind)
		}
	}
	return out
}

func eventsNow(r *recorder) []zmqbridge.Event {
	time.Sleep(300 * time.Millisecond) // heartbeats are 200 ms: anything emitted is in by now
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]zmqbridge.Event(nil), r.events...)
}

// A device listing that fails or hangs is never read as "not mapped": stage,
// publish and unstage answer the error (naming the tool and its stderr), the
// live staging mount stays, nothing is mapped a second time, no detach is
// emitted and the stage record is kept. Once the listing works and the image
// is not in it, unstage completes.
func TestListingFailureIsNotUnmapped(t *testing.T) {
	tools := fakeRBD(t)
	dir := newDriverDir(t)
	id := "1-02-c1-03-rbd-00--e2e-krbd-" + fmt.Sprint(time.Now().UnixNano()%1e9)
	image := id[strings.LastIndex(id, "--")+2:]
	staging := filepath.Join(t.TempDir(), "staging")
	mountTmpfs(t, staging)
	writeKRBDRecord(t, dir, id, image, staging)
	record0, _ := os.ReadFile(stageFile(dir, id))
	d := startDriver(t, dir, tools.env())
	rec := record(t, dir, 0)
	vc := mountCap("ext4", rwo)
	stage := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc,
		VolumeContext: map[string]string{"mounter": "krbd"}, Secrets: secrets()}
	pub := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: filepath.Join(t.TempDir(), "t"), VolumeCapability: vc}
	unstage := &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}
	keep := func(what string) {
		t.Helper()
		if b, err := os.ReadFile(stageFile(dir, id)); err != nil || !strings.Contains(string(b), `"staged": true`) && !strings.Contains(string(b), `"staged":true`) {
			t.Fatalf("%s: stage record lost or no longer staged: %s %v", what, b, err)
		}
		if k := kinds(eventsNow(rec), id); strings.Contains(strings.Join(k, " "), "detach") {
			t.Fatalf("%s: detach emitted (events %v)", what, k)
		}
		if strings.Contains(tools.read("rbd.log"), "map ") && !strings.Contains(tools.read("rbd.log"), "unmap") {
			t.Fatalf("%s: rbd map ran:\n%s", what, tools.read("rbd.log"))
		}
	}
	wantErr := func(what string, err error, code codes.Code, words ...string) {
		t.Helper()
		if status.Code(err) != code {
			t.Fatalf("%s: %v, want %s", what, err, code)
		}
		for _, w := range words {
			if !strings.Contains(err.Error(), w) {
				t.Fatalf("%s: %v does not name %q", what, err, w)
			}
		}
	}

	tools.set("mode", "fail")
	_, err := d.node.NodeStageVolume(ctx(t), stage)
	wantErr("stage with a failing listing", err, codes.Internal, "rbd device list", "injected failure")
	if !mounted(staging) {
		t.Fatal("stage with a failing listing unmounted the live staging mount")
	}
	if b, _ := os.ReadFile(stageFile(dir, id)); string(b) != string(record0) {
		t.Fatalf("stage with a failing listing changed the record:\n%s", b)
	}
	keep("stage")
	_, err = d.node.NodePublishVolume(ctx(t), pub)
	wantErr("publish with a failing listing", err, codes.Internal, "rbd device list")
	h, err := d.node.NodeGetVolumeHealth(ctx(t), &csi.NodeGetVolumeHealthRequest{VolumeId: id})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) == 0 || h.GetVolumeHealth().GetHealthStatuses()[0].GetReason() != "MappingUnchecked" {
		t.Fatalf("health with a failing listing: %v %v, want MappingUnchecked", h, err)
	}

	tools.set("mode", "hang")
	start := time.Now()
	_, err = d.node.NodeStageVolume(ctx(t), stage)
	wantErr("stage with a hung listing", err, codes.Unavailable, "rbd device list", "did not answer")
	t.Logf("stage with a hung listing answered in %s: %v", time.Since(start).Round(time.Millisecond), err)
	if !mounted(staging) {
		t.Fatal("stage with a hung listing unmounted the live staging mount")
	}
	keep("stage (hung)")

	tools.set("mode", "fail")
	_, err = d.node.NodeUnstageVolume(ctx(t), unstage)
	wantErr("unstage with a failing listing", err, codes.Internal, "rbd device list", "injected failure")
	keep("unstage")
	tools.set("mode", "hang")
	_, err = d.node.NodeUnstageVolume(ctx(t), unstage)
	wantErr("unstage with a hung listing", err, codes.Unavailable, "rbd device list")
	keep("unstage (hung)")

	// Every rbd call had no admin socket and no log file.
	for _, l := range strings.Split(strings.TrimSpace(tools.read("rbd.log")), "\n") {
		if !strings.Contains(l, "--admin-socket= ") || !strings.Contains(l, "--log-file=") {
			t.Errorf("rbd ran without --admin-socket= --log-file=: %s", l)
		}
	}
	// A listing that works and shows the image mapped: unmap, then detach.
	tools.set("mapped", fmt.Sprintf(`[{"id":"7","pool":"rbd","namespace":"","name":%q,"snap":"-","device":"/dev/rbd7"}]`, image))
	tools.set("mode", "ok")
	if _, err := d.node.NodeUnstageVolume(ctx(t), unstage); err != nil {
		t.Fatalf("unstage with a working listing: %v\n%s", err, tools.read("rbd.log"))
	}
	if !strings.Contains(tools.read("rbd.log"), "device unmap --device-type=krbd /dev/rbd7") {
		t.Errorf("unstage did not unmap /dev/rbd7:\n%s", tools.read("rbd.log"))
	}
	if _, err := os.Stat(stageFile(dir, id)); !os.IsNotExist(err) {
		t.Errorf("stage record still there after unstage: %v", err)
	}
	if k := kinds(eventsNow(rec), id); len(k) == 0 || k[len(k)-1] != "detach" {
		t.Errorf("events after unstage %v, want detach last", k)
	}
}

// A static PV's handle whose pool is an option (`--log-file=/some/path`) is
// refused with InvalidArgument before any tool runs: no rbd, rbd-fuse or
// rbd-nbd process, no file at the path.
func TestHostileVolumeIDRefused(t *testing.T) {
	tools := newToolDir(t)
	for _, name := range []string{"rbd", "rbd-fuse", "rbd-nbd"} {
		tools.add(name, fmt.Sprintf("echo \"%s $*\" >> %s/calls.log\nexit 1\n", name, tools.dir))
	}
	dir := newDriverDir(t)
	d := startDriver(t, dir, tools.env())
	logFile := filepath.Join(t.TempDir(), "some", "path")
	pool := "--log-file=" + logFile
	staging, target := filepath.Join(t.TempDir(), "staging"), filepath.Join(t.TempDir(), "target")
	for _, id := range []string{
		fmt.Sprintf("1-02-c1-%02x-%s-00--img", len(pool), pool),
		"1-02-c1-03-rbd-00---o",
		"1-02-c1-03-rbd-04---id-img",
		"1-02-c1-03-rbd-00--im g",
	} {
		for _, mounter := range []string{"rbd-fuse", "krbd", "rbd-nbd"} {
			_, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
				VolumeCapability: mountCap("xfs", rwo), VolumeContext: map[string]string{"mounter": mounter}, Secrets: secrets()})
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("stage of %q with %s: %v, want InvalidArgument", id, mounter, err)
			}
		}
		_, err := d.node.NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: mountCap("xfs", rwo)})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("publish of %q: %v, want InvalidArgument", id, err)
		}
	}
	if calls := tools.read("calls.log"); calls != "" {
		t.Errorf("tools ran for a refused volume ID:\n%s", calls)
	}
	if _, err := os.Stat(filepath.Dir(logFile)); !os.IsNotExist(err) {
		t.Errorf("%s exists: %v", filepath.Dir(logFile), err)
	}
}

// A read-only publish stays read-only when the mount flags say "rw"; the
// volume context's fsType is checked like the capability's.
func TestReadOnlyPublishBeatsRW(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	vc := mountCap("ext4", rwo)
	vc.GetMount().MountFlags = []string{"rw"}
	s := createStagePublish(t, d, prefix, 64<<20, vc)
	if err := writeSync(filepath.Join(s.target, "f"), []byte("rw")); err != nil {
		t.Fatalf("write through the read-write publish: %v", err)
	}
	ro := filepath.Join(t.TempDir(), "ro")
	if _, err := d.node.NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		TargetPath: ro, VolumeCapability: vc, Readonly: true}); err != nil {
		t.Fatalf("read-only publish: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(ro, "f")); err != nil || string(b) != "rw" {
		t.Fatalf("read through the read-only publish: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(ro, "g"), []byte("x"), 0o644); err == nil {
		t.Errorf("wrote through a read-only publish whose mount flags say rw")
	} else if !strings.Contains(err.Error(), "read-only") {
		t.Errorf("write through the read-only publish: %v, want EROFS", err)
	}
	if _, err := d.node.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: ro}); err != nil {
		t.Fatal(err)
	}
	unpublishUnstageDelete(t, d, s)

	// fsType from the volume context (the StorageClass's) is refused like the capability's.
	for _, fs := range []string{"ntfs", "ext4,nodev", "xfs -K"} {
		_, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: "1-02-c1-03-rbd-00--" + prefix + "nofs",
			StagingTargetPath: filepath.Join(t.TempDir(), "s"), VolumeCapability: mountCap("", rwo),
			VolumeContext: map[string]string{"fsType": fs}, Secrets: secrets()})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "fsType") {
			t.Errorf("stage with volume context fsType %q: %v, want InvalidArgument naming fsType", fs, err)
		}
	}
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

// Keys reach rbd-fuse as a memfd (never a file on disk), and the driver runs
// with RLIMIT_CORE 0 even when started with core files allowed.
func TestKeysNeverOnDisk(t *testing.T) {
	tools := newToolDir(t)
	tools.add("rbd-fuse", fmt.Sprintf(`{ echo "ARGS $*"; echo "FD3 $(readlink /proc/self/fd/3)"; } >> %s/fuse.log
exec /usr/bin/rbd-fuse "$@"
`, tools.dir))
	dir := newDriverDir(t)
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_CORE, &old); err != nil {
		t.Fatal(err)
	}
	// The driver inherits a core limit it must lower itself.
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}); err != nil {
		t.Skipf("cannot raise RLIMIT_CORE: %v", err)
	}
	d := startDriver(t, dir, tools.env())
	unix.Setrlimit(unix.RLIMIT_CORE, &old)
	limits, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", d.cmd.Process.Pid))
	for _, l := range strings.Split(string(limits), "\n") {
		if strings.HasPrefix(l, "Max core file size") {
			if f := strings.Fields(l); len(f) < 6 || f[4] != "0" || f[5] != "0" {
				t.Errorf("driver core limit: %q, want 0 0", l)
			}
		}
	}
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("ext4", rwo))
	log := tools.read("fuse.log")
	if !strings.Contains(log, "--keyfile=/proc/self/fd/3 ") || !strings.Contains(log, "FD3 /memfd:") {
		t.Errorf("rbd-fuse did not get its key as a memfd at fd 3:\n%s", log)
	}
	if strings.Contains(log, env["ROOKZMQ_CEPH_RBD_KEY"]) {
		t.Errorf("the key is on rbd-fuse's command line")
	}
	for _, want := range []string{"--poolname=rbd ", "--image=" + prefix, "--admin-socket= ", "--log-file= "} {
		if !strings.Contains(log, want) {
			t.Errorf("rbd-fuse args lack %q:\n%s", want, log)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "keys")); !os.IsNotExist(err) {
		t.Errorf("a key directory exists on disk: %v", err)
	}
	unpublishUnstageDelete(t, d, s)
}

// A stage whose deadline passes in the middle still cleans up all it made
// when it fails: the clean-up does not inherit the expired deadline.
func TestStageCleanupOutlivesDeadline(t *testing.T) {
	tools := newToolDir(t)
	tools.add("mkfs.xfs", "sleep 3\necho 'mkfs.xfs: injected failure' >&2\nexit 1\n")
	dir := newDriverDir(t)
	d := startDriver(t, dir, tools.env())
	prefix := uniquePrefix(t)
	req := createReq(prefix+"vol", prefix, 64<<20)
	req.Parameters = params("volumeNamePrefix", prefix)
	r, err := d.ctrl.CreateVolume(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	dropOnFailure(t, d, id)
	staging := filepath.Join(t.TempDir(), "staging")
	c, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	_, err = d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mountCap("xfs", rwo), VolumeContext: r.GetVolume().GetVolumeContext(), Secrets: secrets()})
	if err == nil {
		t.Fatal("stage succeeded through a failing mkfs")
	}
	// The driver goes on after the deadline: mkfs fails, the stage is undone.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, recErr := os.Stat(stageFile(dir, id))
		left := nodeLeftovers(dir)
		if os.IsNotExist(recErr) && len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30 s after a failed stage: record %v, left %v\n%s", recErr, left, tail(d.log, 15))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if b, _ := os.ReadFile(d.log); strings.Contains(string(b), "cleaning up a failed stage") {
		t.Errorf("clean-up failed:\n%s", tail(d.log, 15))
	}
	deleteEventually(t, d, id)
	assertNoOrphans(t, prefix)
}

// A stage retried after a crash that followed the attach event keeps owing
// its detach: when the retry fails and undoes the stage, ack and detach go out.
func TestStageRetryKeepsAnnounced(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=stage-after-attach"})
	prefix := uniquePrefix(t)
	req := createReq(prefix+"vol", prefix, 64<<20)
	req.Parameters = params("volumeNamePrefix", prefix)
	r, err := d.ctrl.CreateVolume(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	staging := filepath.Join(t.TempDir(), "staging")
	stage := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: mountCap("ext4", rwo), VolumeContext: r.GetVolume().GetVolumeContext(), Secrets: secrets()}
	if _, err := d.node.NodeStageVolume(ctx(t), stage); err == nil {
		t.Fatal("stage succeeded through its crash point")
	}
	for i := 0; d.alive(); i++ {
		if i > 500 {
			t.Fatalf("driver alive 5 s after its crash point:\n%s", tail(d.log, 10))
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.conn.Close()
	// The retry will fail: the staging mount is gone and mount(8) fails.
	if err := unix.Unmount(staging, 0); err != nil {
		t.Fatalf("unmounting the staging path the crash left: %v", err)
	}
	tools := newToolDir(t)
	tools.add("mount", "echo 'mount: injected failure' >&2\nexit 32\n")
	d = startDriver(t, dir, tools.env())
	dropOnFailure(t, d, id)
	rec := record(t, dir, 0)
	if _, err := d.node.NodeStageVolume(ctx(t), stage); err == nil || !strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("stage retry: %v, want the injected mount failure", err)
	}
	k := kinds(eventsNow(rec), id)
	if len(k) < 3 || k[0] != "attach" || k[len(k)-2] != "ack" || k[len(k)-1] != "detach" {
		t.Errorf("events %v, want attach ... ack detach", k)
	}
	if _, err := os.Stat(stageFile(dir, id)); !os.IsNotExist(err) {
		t.Errorf("stage record kept after the failed retry was undone: %v", err)
	}
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Errorf("left behind:\n%s", strings.Join(left, "\n"))
	}
	deleteEventually(t, d, id)
	assertNoOrphans(t, prefix)
}

// procsNamed counts live processes whose argv[0] is name and whose command
// line mentions dir.
func procsNamed(name, dir string) int {
	n := 0
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		args := strings.Split(string(b), "\x00")
		if len(args) > 0 && args[0] == name && strings.Contains(string(b), dir) && !zombie(pidOf(p)) {
			n++
		}
	}
	return n
}

// The rbd-fuse process lookup finding nothing (here: rbd-fuse runs under
// another argv[0]) is no evidence that the mapping died: while its FUSE mount
// answers, a repeated stage is idempotent and publish works. Nothing is
// unmounted, remapped or started twice.
func TestFuseLookupMissIsNotDeath(t *testing.T) {
	tools := newToolDir(t)
	tools.add("rbd-fuse", "exec -a rbd-fuse-renamed /usr/bin/rbd-fuse \"$@\"\n")
	dir := newDriverDir(t)
	d := startDriver(t, dir, tools.env())
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("ext4", rwo))
	if err := writeSync(filepath.Join(s.target, "f"), []byte("kept")); err != nil {
		t.Fatal(err)
	}
	if n := procsNamed("rbd-fuse-renamed", dir); n != 1 {
		t.Fatalf("%d rbd-fuse processes after stage, want 1", n)
	}
	for i := 0; i < 2; i++ {
		if _, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
			VolumeCapability: s.capability, VolumeContext: s.context, Secrets: secrets()}); err != nil {
			t.Fatalf("repeated stage: %v\n%s", err, tail(d.log, 10))
		}
	}
	if _, err := d.node.NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		TargetPath: s.target, VolumeCapability: s.capability, VolumeContext: s.context}); err != nil {
		t.Fatalf("repeated publish: %v", err)
	}
	if n := procsNamed("rbd-fuse-renamed", dir); n != 1 {
		t.Errorf("%d rbd-fuse processes after repeated stages, want 1", n)
	}
	if !mounted(s.staging) {
		t.Errorf("the live staging mount was unmounted")
	}
	loops := 0
	for _, l := range nodeLeftovers(dir) {
		if strings.HasPrefix(l, "loop: ") {
			loops++
		}
	}
	if loops != 1 {
		t.Errorf("%d loop devices on the image, want 1", loops)
	}
	if b, err := os.ReadFile(filepath.Join(s.target, "f")); err != nil || string(b) != "kept" {
		t.Errorf("data after repeated stages: %q %v", b, err)
	}
	c := ctx(t)
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatal(err)
	}
	deleteEventually(t, d, s.id) // unstage could not wait for a process it cannot find
	for i := 0; procsNamed("rbd-fuse-renamed", dir) != 0; i++ {
		if i > 300 {
			t.Fatal("rbd-fuse still running 30 s after unstage")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}
