package e2e

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
)

// Rounds of snapshot-then-restore make a lineage of clones; the one that
// would have more than four ancestors is flattened by the mgr, so lineages
// stay short (krbd maps no image with more than 16).
func TestSnapshotLineageFlattened(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil, "--node=false")
	c := ctx(t)
	prefix := uniquePrefix(t)
	v, err := d.ctrl.CreateVolume(c, createReq(prefix+"v0", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	vols, snaps := []string{v.GetVolume().GetVolumeId()}, []string{}
	for i := 1; i <= 3; i++ {
		s, err := d.ctrl.CreateSnapshot(c, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("%ss%d", prefix, i), SourceVolumeId: vols[len(vols)-1],
			Secrets: secrets(), Parameters: map[string]string{"snapshotNamePrefix": prefix + "snap-"}})
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s.GetSnapshot().GetSnapshotId())
		if i == 3 {
			break
		}
		q := createReq(fmt.Sprintf("%sv%d", prefix, i), prefix, 64<<20)
		q.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.GetSnapshot().GetSnapshotId()}}}
		r, err := d.ctrl.CreateVolume(c, q)
		if err != nil {
			t.Fatal(err)
		}
		vols = append(vols, r.GetVolume().GetVolumeId())
	}
	// v0 <- s1 <- v1 <- s2 <- v2 <- s3: s3 has five ancestors.
	last := snaps[2][strings.LastIndex(snaps[2], "-"+prefix)+1:]
	deadline := time.Now().Add(2 * time.Minute)
	for {
		img, err := rbd.OpenImageReadOnly(admin, last, rbd.NoSnapshot)
		if err != nil {
			t.Fatal(err)
		}
		_, perr := img.GetParent()
		img.Close()
		if errors.Is(perr, rbd.ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshot image %s still has a parent after 2 min (err %v)", last, perr)
		}
		time.Sleep(time.Second)
	}
	if log, _ := os.ReadFile(d.log); !strings.Contains(string(log), "deep clone: the mgr flattens it") {
		t.Error("the driver did not ask the mgr to flatten the deep clone")
	}
	for _, id := range snaps {
		if _, err := d.ctrl.DeleteSnapshot(c, &csi.DeleteSnapshotRequest{SnapshotId: id, Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range vols {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(3 * time.Minute); len(trashed(t, prefix)) > 0 && time.Now().Before(deadline); {
		time.Sleep(time.Second)
	}
	assertNoOrphans(t, prefix)
}
