package e2e

import (
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// A controller SIGKILLed inside CreateSnapshot, CreateVolume from a snapshot
// or a volume, or DeleteSnapshot, restarted and retried, completes the call;
// afterwards everything deletes and nothing is left in the pool, the trash
// or the journal.
func TestCrashDuringSnapshotAndClone(t *testing.T) {
	dir := newDriverDir(t)
	prefix := uniquePrefix(t)
	d := startDriver(t, dir, nil, "--node=false")
	src, err := d.ctrl.CreateVolume(ctx(t), createReq(prefix+"src", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	srcID := src.GetVolume().GetVolumeId()
	d.stop()
	// crashed runs call and expects it to fail at point, then to succeed on
	// a restarted driver; it returns the restarted driver.
	crashed := func(point string, call func(d *driver) error) *driver {
		t.Helper()
		d := startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=" + point}, "--node=false")
		if err := call(d); err == nil {
			t.Fatalf("the call succeeded through crash point %s", point)
		}
		waitDead(t, d)
		d = startDriver(t, dir, nil, "--node=false")
		if err := call(d); err != nil {
			t.Fatalf("retry after a crash at %s: %v", point, err)
		}
		return d
	}
	params := map[string]string{"snapshotNamePrefix": prefix + "snap-"}
	var snapID string
	snap := func(name string) func(d *driver) error {
		return func(d *driver) error {
			r, err := d.ctrl.CreateSnapshot(ctx(t), &csi.CreateSnapshotRequest{Name: prefix + name, SourceVolumeId: srcID, Secrets: secrets(), Parameters: params})
			snapID = r.GetSnapshot().GetSnapshotId()
			return err
		}
	}
	var vols []string
	restore := func(name string, source *csi.VolumeContentSource) func(d *driver) error {
		return func(d *driver) error {
			q := createReq(prefix+name, prefix, 64<<20)
			q.VolumeContentSource = source
			r, err := d.ctrl.CreateVolume(ctx(t), q)
			if err == nil {
				vols = append(vols, r.GetVolume().GetVolumeId())
			}
			return err
		}
	}
	crashed("snapshot-after-reserve", snap("s1")).stop()
	first := snapID
	d = crashed("snapshot-after-clone", snap("s2"))
	if snapID == first || snapID == "" {
		t.Fatalf("two snapshot names, IDs %q and %q", first, snapID)
	}
	d.stop()
	fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snapID}}}
	crashed("create-after-clone", restore("r", fromSnap)).stop()
	fromVol := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: srcID}}}
	crashed("create-after-clone", restore("c", fromVol)).stop()
	if len(vols) != 2 {
		t.Fatalf("volumes made: %v", vols)
	}
	for _, id := range []string{first, snapID} {
		crashed("snapshot-delete-after-snap", func(d *driver) error {
			_, err := d.ctrl.DeleteSnapshot(ctx(t), &csi.DeleteSnapshotRequest{SnapshotId: id, Secrets: secrets()})
			return err
		}).stop()
	}
	d = startDriver(t, dir, nil, "--node=false")
	for _, id := range append(vols, srcID) {
		if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(3 * time.Minute)
	for len(trashed(t, prefix)) > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Second)
	}
	assertNoOrphans(t, prefix)
}
