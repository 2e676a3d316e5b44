package e2e

import (
	"fmt"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// Two CephFS controller processes (as during a rollout) asked at the same
// moment to create the same names agree on one subvolume per name: both
// return its ID, and no second subvolume or journal entry is left behind.
func TestCephFSCreateRaceTwoProcesses(t *testing.T) { testCephFSCreateRace(t, cephfsSecrets(t)) }

func testCephFSCreateRace(t *testing.T, sec map[string]string) {
	a := startCephFSDriver(t, newDriverDir(t), nil)
	b := startCephFSDriver(t, newDriverDir(t), nil)
	c := ctx(t)
	prefix := uniquePrefix(t)
	seen := map[string]bool{}
	for _, d := range []*driver{a, b} { // warm both connections and mounts
		r, err := d.ctrl.CreateVolume(c, cephfsCreateReqAs(sec, prefix+"warm", prefix, 16<<20))
		if err != nil {
			t.Fatal(err)
		}
		seen[r.GetVolume().GetVolumeId()] = true
	}
	const n = 12
	ids := createOnBoth(t, a, b, n, func(i int) *csi.CreateVolumeRequest {
		return cephfsCreateReqAs(sec, fmt.Sprintf("%sv%d", prefix, i), prefix, 16<<20)
	})
	for i, p := range ids {
		if p[0] != p[1] {
			t.Errorf("name %d: driver 0 returned %s, driver 1 %s", i, p[0], p[1])
		}
		seen[p[0]], seen[p[1]] = true, true
	}
	if got := subvolumesCLI(t, prefix); len(got) != n+1 {
		t.Errorf("%d subvolumes for %d names (and one warm-up), want one per name: %v", len(got), n, got)
	}
	for id := range seen {
		if id == "" {
			continue
		}
		if _, err := a.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec}); err != nil {
			t.Errorf("delete %s: %v", id, err)
		}
	}
	// A subvolume the race made twice has a second journal entry and no ID
	// returned to anyone: the orphan check reports it.
	waitNoCephFSOrphans(t, prefix)
}
