package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// A volume whose rbd-fuse died (an OOM kill, a node plugin pod deleted
// without --fuse-cgroup) can still be unpublished and unstaged: what was not
// flushed is lost with the daemon, and the mounts, loop device and stage
// record go, so the pod's deletion and the volume's are not stuck.
func TestUnstageAfterFuseDied(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("ext4", rwo))
	// A writer with data in flight, as a pod would have.
	if err := os.WriteFile(filepath.Join(s.target, "pending"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	pid := fuseProcessPid(dir)
	if pid <= 0 {
		t.Fatal("no rbd-fuse process")
	}
	syscall.Kill(pid, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); fuseProcessPid(dir) != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("rbd-fuse %d still running 10 s after SIGKILL", pid)
		}
	}
	c := ctx(t)
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatalf("unpublish after rbd-fuse died: %v", err)
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatalf("unstage after rbd-fuse died: %v", err)
	}
	deleteEventually(t, d, s.id)
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}
