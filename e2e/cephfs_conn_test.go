package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A CephFS controller whose client the cluster blocklisted (as an eviction
// does) drops its cached mount and connection: the next call mounts afresh
// and succeeds, and the background purge of a later delete finishes on the
// new mount.
func TestCephFSBlocklistedClient(t *testing.T) {
	d := startCephFSDriver(t, newDriverDir(t), nil)
	c := ctx(t)
	prefix := uniquePrefix(t)
	r, err := d.ctrl.CreateVolume(c, cephfsCreateReq(t, prefix+"a", prefix, 16<<20))
	if err != nil {
		t.Fatal(err)
	}
	addr := clientAddr(t, d)
	monCommand(t, map[string]any{"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
	t.Cleanup(func() { monCommand(t, map[string]any{"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}) })

	// The first call may find the client cut off (Unavailable); the next
	// one runs on a new mount.
	var ids []string
	var errs []error
	for i := 0; i < 3 && len(ids) == 0; i++ {
		c20, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		r, err := d.ctrl.CreateVolume(c20, cephfsCreateReq(t, fmt.Sprintf("%sb%d", prefix, i), prefix, 16<<20))
		cancel()
		if err == nil {
			ids = append(ids, r.GetVolume().GetVolumeId())
			continue
		}
		errs = append(errs, err)
		if status.Code(err) != codes.Unavailable {
			t.Errorf("call %d on the blocklisted client: %v, want Unavailable", i, err)
		}
	}
	if len(ids) == 0 || len(errs) > 1 {
		t.Fatalf("after blocklisting the controller's client %s: %d failures (%v), want at most 1 before a success", addr, len(errs), errs)
	}
	if newAddr := clientAddr(t, d); newAddr == addr {
		t.Errorf("the driver still uses client %s", addr)
	}
	for i := range errs {
		// A failed create may still have reserved its name: retry it
		// on the new mount, so that its delete cleans everything up.
		r, err := d.ctrl.CreateVolume(c, cephfsCreateReq(t, fmt.Sprintf("%sb%d", prefix, i), prefix, 16<<20))
		if err != nil {
			t.Fatalf("retrying create %d: %v", i, err)
		}
		ids = append(ids, r.GetVolume().GetVolumeId())
	}
	for _, id := range append(ids, r.GetVolume().GetVolumeId()) {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: cephfsSecrets(t)}); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
	waitNoCephFSOrphans(t, prefix)
}
