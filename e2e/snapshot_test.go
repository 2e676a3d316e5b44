package e2e

import (
	"bytes"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func imageOf(t *testing.T, volumeID string) string {
	t.Helper()
	i := strings.LastIndex(volumeID, "-e2e-")
	if i < 0 {
		t.Fatalf("volume ID %s names no e2e image", volumeID)
	}
	return volumeID[i+1:]
}

// A snapshot keeps the volume's content of its moment: a volume made from it
// reads that content (grown to the size asked for), a clone of the volume
// reads the volume's current content, and volume, snapshot and the volumes
// made from them can be deleted in any order, leaving nothing behind.
func TestSnapshotRestoreAndClone(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil, "--node=false")
	c := ctx(t)
	prefix := uniquePrefix(t)
	a, err := d.ctrl.CreateVolume(c, createReq(prefix+"a", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	aID := a.GetVolume().GetVolumeId()
	before, after := bytes.Repeat([]byte("before!"), 100), bytes.Repeat([]byte("after!!"), 100)
	writeImageIn(t, admin, imageOf(t, aID), before)

	snapReq := &csi.CreateSnapshotRequest{Name: prefix + "s1", SourceVolumeId: aID, Secrets: secrets(),
		Parameters: map[string]string{"snapshotNamePrefix": prefix + "snap-"}}
	t0 := time.Now()
	s, err := d.ctrl.CreateSnapshot(c, snapReq)
	if err != nil {
		t.Fatal(err)
	}
	snap := s.GetSnapshot()
	if !snap.GetReadyToUse() || snap.GetSizeBytes() != 64<<20 || snap.GetSourceVolumeId() != aID ||
		snap.GetCreationTime().AsTime().Before(t0.Add(-time.Minute)) || snap.GetCreationTime().AsTime().After(time.Now().Add(time.Minute)) {
		t.Fatalf("CreateSnapshot = %v", snap)
	}
	again, err := d.ctrl.CreateSnapshot(c, snapReq)
	if err != nil || again.GetSnapshot().GetSnapshotId() != snap.GetSnapshotId() ||
		!again.GetSnapshot().GetCreationTime().AsTime().Equal(snap.GetCreationTime().AsTime()) {
		t.Fatalf("CreateSnapshot again = %v, %v; want %v", again, err, snap)
	}
	b, err := d.ctrl.CreateVolume(c, createReq(prefix+"b", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	other := &csi.CreateSnapshotRequest{Name: snapReq.Name, SourceVolumeId: b.GetVolume().GetVolumeId(), Secrets: secrets(), Parameters: snapReq.Parameters}
	if _, err := d.ctrl.CreateSnapshot(c, other); status.Code(err) != codes.AlreadyExists {
		t.Errorf("the same snapshot name for another volume: %v, want AlreadyExists", err)
	}
	writeImageIn(t, admin, imageOf(t, aID), after)

	fromSnap := createReq(prefix+"r", prefix, 128<<20)
	fromSnap.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}}
	r, err := d.ctrl.CreateVolume(c, fromSnap)
	if err != nil {
		t.Fatal(err)
	}
	if r.GetVolume().GetContentSource().GetSnapshot().GetSnapshotId() != snap.GetSnapshotId() || r.GetVolume().GetCapacityBytes() != 128<<20 {
		t.Errorf("volume from the snapshot: %v", r.GetVolume())
	}
	if got, size := readImage(t, imageOf(t, r.GetVolume().GetVolumeId()), 0, len(before)), imageSizeIn(t, admin, imageOf(t, r.GetVolume().GetVolumeId())); !bytes.Equal(got, before) || size != 128<<20 {
		t.Errorf("volume from the snapshot reads %q..., %d bytes; want the content before the snapshot, 128 MiB", got[:14], size)
	}
	if _, err := d.ctrl.CreateVolume(c, createReq(prefix+"r", prefix, 128<<20)); status.Code(err) != codes.AlreadyExists {
		t.Errorf("the name of a volume made from a snapshot, asked for without a source: %v, want AlreadyExists", err)
	}
	plainWithSource := createReq(prefix+"a", prefix, 64<<20)
	plainWithSource.VolumeContentSource = fromSnap.VolumeContentSource
	if _, err := d.ctrl.CreateVolume(c, plainWithSource); status.Code(err) != codes.AlreadyExists {
		t.Errorf("the name of a plain volume, asked for with a snapshot as source: %v, want AlreadyExists", err)
	}
	clone := createReq(prefix+"c", prefix, 0)
	clone.CapacityRange = nil
	clone.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: aID}}}
	cl, err := d.ctrl.CreateVolume(c, clone)
	if err != nil {
		t.Fatal(err)
	}
	if got, size := readImage(t, imageOf(t, cl.GetVolume().GetVolumeId()), 0, len(after)), imageSizeIn(t, admin, imageOf(t, cl.GetVolume().GetVolumeId())); !bytes.Equal(got, after) || size != 64<<20 {
		t.Errorf("clone of the volume reads %q..., %d bytes; want its current content, 64 MiB", got[:14], size)
	}
	small := createReq(prefix+"small", prefix, 0)
	small.CapacityRange = &csi.CapacityRange{LimitBytes: 32 << 20}
	small.VolumeContentSource = fromSnap.VolumeContentSource
	if _, err := d.ctrl.CreateVolume(c, small); status.Code(err) != codes.OutOfRange {
		t.Errorf("a volume smaller than its snapshot: %v, want OutOfRange", err)
	}

	list := func(req *csi.ListSnapshotsRequest) []string {
		t.Helper()
		resp, err := d.ctrl.ListSnapshots(c, req)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, e := range resp.GetEntries() {
			ids = append(ids, e.GetSnapshot().GetSnapshotId())
		}
		return ids
	}
	if got := list(&csi.ListSnapshotsRequest{SnapshotId: snap.GetSnapshotId(), Secrets: secrets()}); len(got) != 1 || got[0] != snap.GetSnapshotId() {
		t.Errorf("ListSnapshots by ID: %v", got)
	}
	if got := list(&csi.ListSnapshotsRequest{SourceVolumeId: aID, Secrets: secrets()}); len(got) != 1 {
		t.Errorf("ListSnapshots by source: %v", got)
	}
	if got := list(&csi.ListSnapshotsRequest{SourceVolumeId: b.GetVolume().GetVolumeId(), Secrets: secrets()}); len(got) != 0 {
		t.Errorf("ListSnapshots by a source with none: %v", got)
	}

	// A snapshot's ID is no volume's: DeleteVolume leaves it alone.
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: snap.GetSnapshotId(), Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	if got := list(&csi.ListSnapshotsRequest{SnapshotId: snap.GetSnapshotId(), Secrets: secrets()}); len(got) != 1 {
		t.Fatalf("DeleteVolume of a snapshot's ID removed the snapshot: %v", got)
	}
	// The snapshot goes first, while a volume made from it lives.
	if _, err := d.ctrl.DeleteSnapshot(c, &csi.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshotId(), Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	if got := list(&csi.ListSnapshotsRequest{SnapshotId: snap.GetSnapshotId(), Secrets: secrets()}); len(got) != 0 {
		t.Errorf("ListSnapshots of a deleted snapshot: %v", got)
	}
	if _, err := d.ctrl.CreateVolume(c, func() *csi.CreateVolumeRequest {
		q := createReq(prefix+"r2", prefix, 64<<20)
		q.VolumeContentSource = fromSnap.VolumeContentSource
		return q
	}()); status.Code(err) != codes.NotFound {
		t.Errorf("a volume from a deleted snapshot: %v, want NotFound", err)
	}
	if got := readImage(t, imageOf(t, r.GetVolume().GetVolumeId()), 0, len(before)); !bytes.Equal(got, before) {
		t.Errorf("the volume made from the snapshot changed when the snapshot was deleted: %q...", got[:14])
	}
	// A volume's ID is no snapshot's: DeleteSnapshot leaves it alone.
	if _, err := d.ctrl.DeleteSnapshot(c, &csi.DeleteSnapshotRequest{SnapshotId: aID, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	if got := readImage(t, imageOf(t, aID), 0, len(after)); !bytes.Equal(got, after) {
		t.Errorf("DeleteSnapshot of a volume's ID changed the volume")
	}
	// The source goes while its clone lives.
	for _, id := range []string{aID, b.GetVolume().GetVolumeId()} {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
	}
	if got := readImage(t, imageOf(t, cl.GetVolume().GetVolumeId()), 0, len(after)); !bytes.Equal(got, after) {
		t.Errorf("the clone changed when its source was deleted: %q...", got[:14])
	}
	for _, v := range []*csi.Volume{r.GetVolume(), cl.GetVolume()} {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId(), Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
	}
	// The mgr retries the removal of a parent until its last clone is gone.
	start, deadline := time.Now(), time.Now().Add(3*time.Minute)
	for len(trashed(t, prefix)) > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Second)
	}
	t.Logf("the trash was empty %.0f s after the last clone's delete", time.Since(start).Seconds())
	if log, _ := os.ReadFile(d.log); !strings.Contains(string(log), "purge waits for the image's clones") {
		t.Errorf("no purge waited for clones: the parents were deleted after their clones' removal?")
	}
	assertNoOrphans(t, prefix)
}
