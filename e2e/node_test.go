package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// staged is a volume created, staged and published by a test.
type staged struct {
	id, staging, target string
	capability          *csi.VolumeCapability
	context             map[string]string
}

func createStagePublish(t *testing.T, d *driver, prefix string, size int64, vc *csi.VolumeCapability, extra ...string) staged {
	t.Helper()
	c := ctx(t)
	req := createReq(prefix+"vol", prefix, size)
	req.VolumeCapabilities = []*csi.VolumeCapability{vc}
	req.Parameters = params(append([]string{"volumeNamePrefix", prefix}, extra...)...)
	r, err := d.ctrl.CreateVolume(c, req)
	if err != nil {
		t.Fatal(err)
	}
	dropOnFailure(t, d, r.GetVolume().GetVolumeId())
	dir := t.TempDir()
	s := staged{id: r.GetVolume().GetVolumeId(), staging: filepath.Join(dir, "staging"), target: filepath.Join(dir, "pod", "mount"),
		capability: vc, context: r.GetVolume().GetVolumeContext()}
	os.MkdirAll(s.staging, 0o750)
	if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		VolumeCapability: vc, VolumeContext: s.context, Secrets: secrets()}); err != nil {
		t.Fatalf("stage: %v\n%s", err, tail(d.log, 10))
	}
	if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		TargetPath: s.target, VolumeCapability: vc, VolumeContext: s.context}); err != nil {
		t.Fatalf("publish: %v", err)
	}
	return s
}

func unpublishUnstageDelete(t *testing.T, d *driver, s staged) {
	t.Helper()
	c := ctx(t)
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatalf("unpublish: %v", err)
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatalf("unstage: %v", err)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: s.id, Secrets: secrets()}); err != nil {
		t.Fatalf("delete: %v", err)
	}
}

// dropOnFailure deletes the volume at the end of a failed test (best effort;
// a passing test deletes its volumes itself).
func dropOnFailure(t *testing.T, d *driver, id string) {
	t.Cleanup(func() {
		if !t.Failed() || !d.alive() {
			return
		}
		c, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if recs, _ := filepath.Glob(filepath.Join(d.dir, "state", "volumes", "*.json")); len(recs) > 0 {
			return // still staged: deleting would fail; leave it for inspection
		}
		d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()})
	})
}

// nodeLeftovers lists mounts, loop devices and rbd-fuse processes under dir.
func nodeLeftovers(dir string) []string {
	var out []string
	b, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, dir) {
			out = append(out, "mount: "+l)
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, l := range loops {
		if b, _ := os.ReadFile(l); strings.Contains(string(b), dir) {
			out = append(out, "loop: "+l+" -> "+strings.TrimSpace(string(b)))
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if argv0, _, _ := bytes.Cut(b, []byte{0}); filepath.Base(string(argv0)) == "rbd-fuse" && bytes.Contains(b, []byte(dir)) && !zombie(pidOf(p)) {
			out = append(out, "process: "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return out
}

func pidOf(procPath string) int {
	var pid int
	for _, c := range strings.Split(procPath, "/")[2] {
		pid = pid*10 + int(c-'0')
	}
	return pid
}

// A volume staged with rbd-fuse keeps working while the driver is SIGKILLed
// and restarted; unpublish and unstage afterwards leave nothing behind.
func TestFuseSurvivesDriverRestart(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 512<<20, mountCap("xfs", rwo))
	file := filepath.Join(s.target, "before.txt")
	if err := os.WriteFile(file, []byte("written before the kill"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.kill()
	// The filesystem lives on without the driver.
	after := filepath.Join(s.target, "after.txt")
	if err := writeSync(after, []byte("written while the driver was down")); err != nil {
		t.Fatalf("write with the driver dead: %v", err)
	}
	if b, err := os.ReadFile(file); err != nil || string(b) != "written before the kill" {
		t.Fatalf("read with the driver dead: %q %v", b, err)
	}
	d = startDriver(t, dir, nil)
	// The restarted driver knows the volume: publish again is idempotent, stats work.
	if _, err := d.node.NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		TargetPath: s.target, VolumeCapability: s.capability}); err != nil {
		t.Fatalf("publish after restart: %v", err)
	}
	h, err := d.node.NodeGetVolumeHealth(ctx(t), &csi.NodeGetVolumeHealthRequest{VolumeId: s.id, VolumePublishPath: s.target})
	if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) != 0 {
		t.Fatalf("health after restart: %v %v", h, err)
	}
	unpublishUnstageDelete(t, d, s)
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind after unstage:\n%s", strings.Join(left, "\n"))
	}
	if got := images(t, prefix); len(got) != 0 {
		t.Fatalf("images left: %v", got)
	}
}

func writeSync(path string, b []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		return err
	}
	return f.Sync()
}

// ext4 (the default filesystem): stage, publish, write, stats, and online
// growth where the plugin has CAP_SYS_RESOURCE (FailedPrecondition otherwise).
func TestExt4Lifecycle(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("", rwo))
	if err := writeSync(filepath.Join(s.target, "f"), bytes.Repeat([]byte("x"), 1<<20)); err != nil {
		t.Fatal(err)
	}
	st, err := d.node.NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: s.id, VolumePath: s.target})
	if err != nil || st.GetUsage()[0].GetUsed() < 1<<20 || st.GetUsage()[1].GetUnit() != csi.VolumeUsage_INODES {
		t.Fatalf("stats: %v %v", st, err)
	}
	if _, err := d.ctrl.ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: s.id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	r, err := d.node.NodeExpandVolume(ctx(t), &csi.NodeExpandVolumeRequest{VolumeId: s.id, VolumePath: s.target,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}})
	if hasCapSysResource() {
		if err != nil || r.GetCapacityBytes() < 128<<20 {
			t.Fatalf("online ext4 growth: %v %v", r, err)
		}
	} else if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "CAP_SYS_RESOURCE") {
		t.Fatalf("ext4 growth without CAP_SYS_RESOURCE: %v, want FailedPrecondition naming it", err)
	}
	// Staging again with the same capability is idempotent; another is refused.
	if _, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		VolumeCapability: s.capability, VolumeContext: s.context, Secrets: secrets()}); err != nil {
		t.Fatalf("repeated stage: %v", err)
	}
	if _, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		VolumeCapability: mountCap("xfs", rwo), Secrets: secrets()}); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("stage with another fstype: %v, want AlreadyExists", err)
	}
	unpublishUnstageDelete(t, d, s)
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

func hasCapSysResource() bool {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:\t"); ok {
			var caps uint64
			for _, c := range v {
				caps = caps<<4 | uint64(strings.IndexRune("0123456789abcdef", c))
			}
			return caps&(1<<24) != 0
		}
	}
	return false
}

// Block mode: the device is published as a file and data written through it
// is in the image.
func TestBlockLifecycle(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, blockCap(rwo))
	pattern := bytes.Repeat([]byte("rookzmq!"), 512) // 4 KiB
	f, err := os.OpenFile(s.target, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(pattern, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := d.node.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatal(err)
	}
	// Read back through librbd, independent of the node's caches.
	if got := readImage(t, images(t, prefix)[0], 1<<20, len(pattern)); !bytes.Equal(got, pattern) {
		t.Fatalf("image holds %q..., want the pattern", got[:16])
	}
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: s.id, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

// A READER_ONLY volume is mapped read-only: its device refuses writes, and
// the filesystem is mounted read-only.
func TestReadOnlyVolume(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	// Make a filesystem first, as a writer.
	w := createStagePublish(t, d, prefix, 64<<20, mountCap("", rwo))
	if err := writeSync(filepath.Join(w.target, "data"), []byte("hello")); err != nil {
		t.Fatal(err)
	}
	c := ctx(t)
	d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: w.id, TargetPath: w.target})
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: w.id, StagingTargetPath: w.staging}); err != nil {
		t.Fatal(err)
	}
	for _, vc := range []*csi.VolumeCapability{
		mountCap("", csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY),
		blockCap(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY),
	} {
		target := filepath.Join(t.TempDir(), "ro")
		if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: w.id, StagingTargetPath: w.staging,
			VolumeCapability: vc, VolumeContext: w.context, Secrets: secrets()}); err != nil {
			t.Fatalf("read-only stage: %v", err)
		}
		if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: w.id, StagingTargetPath: w.staging,
			TargetPath: target, VolumeCapability: vc}); err != nil {
			t.Fatalf("read-only publish: %v", err)
		}
		if vc.GetBlock() != nil {
			if f, err := os.OpenFile(target, os.O_WRONLY, 0); err == nil {
				_, werr := f.Write([]byte("x"))
				f.Close()
				if werr == nil {
					t.Errorf("wrote to a read-only block volume")
				}
			}
		} else {
			if b, err := os.ReadFile(filepath.Join(target, "data")); err != nil || string(b) != "hello" {
				t.Errorf("read-only mount reads %q, %v", b, err)
			}
			if err := os.WriteFile(filepath.Join(target, "new"), []byte("x"), 0o644); err == nil {
				t.Errorf("wrote to a read-only filesystem")
			}
		}
		d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: w.id, TargetPath: target})
		if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: w.id, StagingTargetPath: w.staging}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: w.id, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

// A staged volume whose mapping died (as after a node reboot) is never bound
// into a pod: publish refuses, stage maps it again, and the data is intact.
func TestStaleStageIsRestaged(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 512<<20, mountCap("xfs", rwo))
	if err := writeSync(filepath.Join(s.target, "keep"), []byte("survives")); err != nil {
		t.Fatal(err)
	}
	c := ctx(t)
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatal(err)
	}
	// The mapping dies (as in a reboot, or an OOM kill of rbd-fuse).
	// Wait for it to be gone: the kernel aborts the FUSE connection only when
	// the daemon's /dev/fuse descriptor closes, at its exit.
	pid := fuseProcessPid(dir)
	if pid <= 0 {
		t.Fatalf("no rbd-fuse process found for %s", dir)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); fuseProcessPid(dir) != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("rbd-fuse %d still running 10 s after SIGKILL", pid)
		}
	}
	pub := &csi.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging, TargetPath: s.target, VolumeCapability: s.capability}
	if _, err := d.node.NodePublishVolume(c, pub); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("publish of a volume whose staging is gone: %v, want FailedPrecondition", err)
	}
	if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		VolumeCapability: s.capability, VolumeContext: s.context, Secrets: secrets()}); err != nil {
		t.Fatalf("stage again: %v", err)
	}
	if _, err := d.node.NodePublishVolume(c, pub); err != nil {
		t.Fatalf("publish after staging again: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(s.target, "keep")); err != nil || string(b) != "survives" {
		t.Fatalf("data after re-staging: %q %v", b, err)
	}
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatal(err)
	}
	deleteEventually(t, d, s.id) // the killed rbd-fuse's watch expires first
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

func fuseProcessPid(dir string) int {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if argv0, _, _ := bytes.Cut(b, []byte{0}); filepath.Base(string(argv0)) == "rbd-fuse" && bytes.Contains(b, []byte(dir)) && !zombie(pidOf(p)) {
			return pidOf(p)
		}
	}
	return 0
}
