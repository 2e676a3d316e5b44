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

	// The cut-off reaches the OSDs with their next map: until then calls
	// still succeed on the old client. Once it does, the first call may find
	// the client cut off (Unavailable); the next one runs on a new mount.
	var ids, failed []string
	var errs []error
	for i, deadline := 0, time.Now().Add(30*time.Second); ; i++ {
		name := fmt.Sprintf("%sb%d", prefix, i)
		c20, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		r, err := d.ctrl.CreateVolume(c20, cephfsCreateReq(t, name, prefix, 16<<20))
		cancel()
		if err == nil {
			ids = append(ids, r.GetVolume().GetVolumeId())
			if clientAddr(t, d) != addr {
				break // on the new client
			}
		} else {
			errs, failed = append(errs, err), append(failed, name)
			if status.Code(err) != codes.Unavailable {
				t.Errorf("call %d on the blocklisted client: %v, want Unavailable", i, err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the driver still uses client %s 30 s after it was blocklisted (%d calls, failures %v)", addr, i+1, errs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(errs) > 1 {
		t.Fatalf("after blocklisting the controller's client %s: %d failures (%v), want at most 1 before a success", addr, len(errs), errs)
	}
	for _, name := range failed {
		// A failed create may still have reserved its name: retry it
		// on the new mount, so that its delete cleans everything up.
		r, err := d.ctrl.CreateVolume(c, cephfsCreateReq(t, name, prefix, 16<<20))
		if err != nil {
			t.Fatalf("retrying create %s: %v", name, err)
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
