package e2e

import (
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
