package e2e

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Two controller processes (as during a rollout) asked at the same moment to
// create the same names agree on one image per name: both return its ID, and
// no second image is left behind.
func TestCreateRaceTwoProcesses(t *testing.T) {
	a := startDriver(t, newDriverDir(t), nil, "--node=false")
	b := startDriver(t, newDriverDir(t), nil, "--node=false")
	c := ctx(t)
	prefix := uniquePrefix(t)
	// Warm both connections, so that the creates below start together.
	for _, d := range []*driver{a, b} {
		if _, err := d.ctrl.CreateVolume(c, createReq(prefix+"warm", prefix, 16<<20)); err != nil {
			t.Fatal(err)
		}
	}
	const n = 15
	ids := createOnBoth(t, a, b, n, func(i int) *csi.CreateVolumeRequest {
		return createReq(fmt.Sprintf("%sv%d", prefix, i), prefix, 16<<20)
	})
	seen := map[string]bool{}
	for i, p := range ids {
		if p[0] != p[1] {
			t.Errorf("name %d: driver 0 returned %s, driver 1 %s", i, p[0], p[1])
		}
		seen[p[0]], seen[p[1]] = true, true
	}
	got := images(t, prefix)
	sort.Strings(got)
	if len(got) != n+1 {
		t.Errorf("%d images for %d names (and one warm-up), want one per name: %v", len(got), n, got)
	}
	// Each process's concurrent creates share turns under the lock.
	shared := regexp.MustCompile(`"journal reservations" batch=([2-9]|1[0-9])`)
	for k, d := range []*driver{a, b} {
		if log, _ := os.ReadFile(d.log); !shared.Match(log) {
			t.Errorf("driver %d: no turn under the journal's lock served two or more of its %d concurrent creates", k, n)
		}
	}
	// Delete through the returned IDs, and any extra image's journal entry
	// through an ID made from its name, so that the orphan check only
	// reports what the race left.
	r, err := a.ctrl.CreateVolume(c, createReq(prefix+"warm", prefix, 16<<20))
	if err != nil {
		t.Fatal(err)
	}
	seen[r.GetVolume().GetVolumeId()] = true
	for id := range seen {
		if id == "" {
			continue
		}
		if _, err := a.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
			t.Errorf("delete %s: %v", id, err)
		}
	}
	assertNoOrphans(t, prefix)
}

// createOnBoth sends request i (0 <= i < n) to drivers a and b at once, all
// at the same time, and returns the volume IDs each answered.
func createOnBoth(t *testing.T, a, b *driver, n int, req func(i int) *csi.CreateVolumeRequest) [][2]string {
	ids := make([][2]string, n)
	var wg sync.WaitGroup
	for i := range n {
		for k, d := range []*driver{a, b} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := d.ctrl.CreateVolume(ctx(t), req(i))
				if err != nil {
					t.Errorf("create %d on driver %d: %v", i, k, err)
				}
				ids[i][k] = r.GetVolume().GetVolumeId()
			}()
		}
	}
	wg.Wait()
	return ids
}

// While another client holds the journal's reservation lock, a CreateVolume
// of a new name answers Aborted before its deadline (and one of a reserved
// name needs no lock); once the lock is free, the create goes through.
func TestCreateReserveLockBusy(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil, "--node=false")
	c := ctx(t)
	prefix := uniquePrefix(t)
	old, err := d.ctrl.CreateVolume(c, createReq(prefix+"old", prefix, 16<<20))
	if err != nil {
		t.Fatal(err)
	}
	if ret, err := admin.LockExclusive("rookzmq.volumes", "rookzmq.reserve", "e2e-busy", "test", time.Minute, nil); err != nil || ret != 0 {
		t.Fatalf("taking the reservation lock: %d %v", ret, err)
	}
	locked := true
	unlock := func() {
		if locked {
			admin.Unlock("rookzmq.volumes", "rookzmq.reserve", "e2e-busy")
			locked = false
		}
	}
	t.Cleanup(unlock)
	c2, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	start := time.Now()
	_, err = d.ctrl.CreateVolume(c2, createReq(prefix+"new", prefix, 16<<20))
	cancel()
	if took := time.Since(start); status.Code(err) != codes.Aborted || took >= 2*time.Second {
		t.Errorf("create under another's lock: %v after %s, want Aborted before the 2 s deadline", err, took)
	}
	if r, err := d.ctrl.CreateVolume(c, createReq(prefix+"old", prefix, 16<<20)); err != nil || r.GetVolume().GetVolumeId() != old.GetVolume().GetVolumeId() {
		t.Errorf("retry of a reserved name under another's lock: %v %v", r.GetVolume().GetVolumeId(), err)
	}
	unlock()
	r, err := d.ctrl.CreateVolume(c, createReq(prefix+"new", prefix, 16<<20))
	if err != nil {
		t.Fatalf("create after the lock was freed: %v", err)
	}
	for _, id := range []string{old.GetVolume().GetVolumeId(), r.GetVolume().GetVolumeId()} {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
			t.Errorf("delete %s: %v", id, err)
		}
	}
	assertNoOrphans(t, prefix)
}
