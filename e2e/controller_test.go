package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func createReq(name, prefix string, size int64) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)},
		Parameters:         params("volumeNamePrefix", prefix), Secrets: secrets(),
	}
}

// 20 concurrent CreateVolume calls with one name make exactly one image; each
// call returns its ID or Aborted. 20 different names all succeed.
func TestConcurrentCreate(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil)
	c := ctx(t)
	prefix := uniquePrefix(t)

	var wg sync.WaitGroup
	ids := make([]string, 20)
	errs := make([]error, 20)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := d.ctrl.CreateVolume(c, createReq(prefix+"same", prefix, 64<<20))
			ids[i], errs[i] = r.GetVolume().GetVolumeId(), err
		}()
	}
	wg.Wait()
	var id string
	for i, err := range errs {
		switch {
		case err == nil && id == "":
			id = ids[i]
		case err == nil && ids[i] != id:
			t.Errorf("call %d returned volume %s, another returned %s", i, ids[i], id)
		case err != nil && status.Code(err) != codes.Aborted:
			t.Errorf("call %d: %v (want success or Aborted)", i, err)
		}
	}
	if got := images(t, prefix); len(got) != 1 {
		t.Fatalf("%d images after 20 same-name creates, want 1: %v", len(got), got)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}

	errs = make([]error, 20)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := d.ctrl.CreateVolume(c, createReq(fmt.Sprintf("%sname-%d", prefix, i), prefix, 64<<20))
			ids[i], errs[i] = r.GetVolume().GetVolumeId(), err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("create %d: %v", i, err)
		}
	}
	if got := images(t, prefix); len(got) != 20 {
		t.Errorf("%d images after 20 different creates, want 20", len(got))
	}
	for _, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
				t.Errorf("delete %s: %v", id, err)
			}
		}()
	}
	wg.Wait()
	assertNoOrphans(t, prefix)
}

// Idempotency: the same request returns the same volume; a different size for
// the same name is AlreadyExists.
func TestCreateIdempotent(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil)
	c := ctx(t)
	prefix := uniquePrefix(t)
	req := createReq(prefix+"vol", prefix, 64<<20)
	req.Parameters["csi.storage.k8s.io/pvc/name"] = "data"
	req.Parameters["csi.storage.k8s.io/pvc/namespace"] = "team-a"
	req.Parameters["csi.storage.k8s.io/pv/name"] = "pvc-123"
	a, err := d.ctrl.CreateVolume(c, req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := d.ctrl.CreateVolume(c, req)
	if err != nil {
		t.Fatal(err)
	}
	if a.GetVolume().GetVolumeId() != b.GetVolume().GetVolumeId() || a.GetVolume().GetCapacityBytes() != 64<<20 {
		t.Fatalf("retry gave %v, first %v", b.GetVolume(), a.GetVolume())
	}
	vc := a.GetVolume().GetVolumeContext()
	if vc["csi.storage.k8s.io/pvc/name"] != "data" || vc["csi.storage.k8s.io/pvc/namespace"] != "team-a" || vc["csi.storage.k8s.io/pv/name"] != "pvc-123" {
		t.Errorf("volume context lacks the PVC names: %v", vc)
	}
	img := images(t, prefix)
	if len(img) != 1 {
		t.Fatalf("images: %v", img)
	}
	meta := imageMetadata(t, img[0])
	if meta["csi.storage.k8s.io/pvc/name"] != "data" || meta["csi.storage.k8s.io/pv/name"] != "pvc-123" {
		t.Errorf("image metadata lacks the PVC names: %v", meta)
	}
	bigger := createReq(prefix+"vol", prefix, 128<<20)
	if _, err := d.ctrl.CreateVolume(c, bigger); status.Code(err) != codes.AlreadyExists {
		t.Errorf("same name, bigger size: %v, want AlreadyExists", err)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: a.GetVolume().GetVolumeId(), Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: a.GetVolume().GetVolumeId(), Secrets: secrets()}); err != nil {
		t.Errorf("second delete: %v", err)
	}
}

// Bad input gets a precise code and a message that names the problem.
func TestBadInput(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil)
	c := ctx(t)
	prefix := uniquePrefix(t)
	good := func() *csi.CreateVolumeRequest { return createReq(prefix+"bad", prefix, 64<<20) }
	with := func(f func(r *csi.CreateVolumeRequest)) *csi.CreateVolumeRequest { r := good(); f(r); return r }
	validID := "1-02-c1-03-rbd-00--" + prefix + "missing"
	cases := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"no name", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.Name = "" }))
			return err
		}, codes.InvalidArgument, "name"},
		{"unknown clusterID", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.Parameters["clusterID"] = "nope" }))
			return err
		}, codes.InvalidArgument, `unknown clusterID "nope"`},
		{"unknown parameter", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.Parameters["imageFeature"] = "layering" }))
			return err
		}, codes.InvalidArgument, `unknown parameter "imageFeature"`},
		{"missing secrets", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.Secrets = nil }))
			return err
		}, codes.InvalidArgument, "missing secrets userID and userKey"},
		{"missing key", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.Secrets = map[string]string{"userID": "x"} }))
			return err
		}, codes.InvalidArgument, "missing secret userKey"},
		{"negative capacity", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.CapacityRange.RequiredBytes = -1 }))
			return err
		}, codes.InvalidArgument, "required_bytes is negative"},
		{"inverted capacity", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.CapacityRange.LimitBytes = 1 << 20 }))
			return err
		}, codes.InvalidArgument, "limit_bytes"},
		{"RWX filesystem", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) {
				r.VolumeCapabilities = []*csi.VolumeCapability{mountCap("", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}
			}))
			return err
		}, codes.InvalidArgument, "only supported for block"},
		{"unsupported fstype", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) {
				r.VolumeCapabilities = []*csi.VolumeCapability{mountCap("btrfs", rwo)}
			}))
			return err
		}, codes.InvalidArgument, "btrfs"},
		{"no capabilities", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) { r.VolumeCapabilities = nil }))
			return err
		}, codes.InvalidArgument, "volume_capabilities"},
		{"wrong key", func() error {
			_, err := d.ctrl.CreateVolume(c, with(func(r *csi.CreateVolumeRequest) {
				r.Secrets = map[string]string{"userID": env["ROOKZMQ_CEPH_RBD_USER"], "userKey": "AQAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAA=="}
			}))
			return err
		}, codes.PermissionDenied, "connecting to cluster"},
		{"delete: empty ID", func() error {
			_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{Secrets: secrets()})
			return err
		}, codes.InvalidArgument, "volume_id"},
		{"delete: no secrets", func() error {
			_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: validID})
			return err
		}, codes.InvalidArgument, "missing secrets"},
		{"expand: malformed ID", func() error {
			_, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: "garbage", CapacityRange: &csi.CapacityRange{RequiredBytes: 1}, Secrets: secrets()})
			return err
		}, codes.NotFound, "garbage"},
		{"expand: missing volume", func() error {
			_, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: validID, CapacityRange: &csi.CapacityRange{RequiredBytes: 1}, Secrets: secrets()})
			return err
		}, codes.NotFound, "missing"},
		{"validate: missing volume", func() error {
			_, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: validID, VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: secrets()})
			return err
		}, codes.NotFound, "missing"},
		{"stage: malformed ID", func() error {
			_, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: "1-zz", StagingTargetPath: t.TempDir(), VolumeCapability: mountCap("", rwo), Secrets: secrets()})
			return err
		}, codes.InvalidArgument, "malformed"},
		{"stage: no secrets", func() error {
			_, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: validID, StagingTargetPath: t.TempDir(), VolumeCapability: mountCap("", rwo)})
			return err
		}, codes.InvalidArgument, "missing secrets"},
		{"stage: krbd without the kernel module", func() error {
			_, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: validID, StagingTargetPath: t.TempDir(),
				VolumeCapability: mountCap("", rwo), Secrets: secrets(), VolumeContext: map[string]string{"mounter": "krbd"}})
			return err
		}, codes.FailedPrecondition, "mounter krbd cannot work"},
		{"stage: rbd-nbd without the kernel module", func() error {
			_, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: validID, StagingTargetPath: t.TempDir(),
				VolumeCapability: mountCap("", rwo), Secrets: secrets(), VolumeContext: map[string]string{"mounter": "rbd-nbd"}})
			return err
		}, codes.FailedPrecondition, "mounter rbd-nbd cannot work"},
		{"publish: not staged", func() error {
			_, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: validID, StagingTargetPath: t.TempDir(), TargetPath: t.TempDir() + "/t", VolumeCapability: mountCap("", rwo)})
			return err
		}, codes.FailedPrecondition, "not staged"},
		{"node expand: not staged", func() error {
			_, err := d.node.NodeExpandVolume(c, &csi.NodeExpandVolumeRequest{VolumeId: validID, VolumePath: "/nonexistent"})
			return err
		}, codes.NotFound, "not staged"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if (strings.Contains(tc.name, "krbd") && kernelModule("rbd")) || (strings.Contains(tc.name, "rbd-nbd") && kernelModule("nbd")) {
				t.Skip("the kernel module is loaded here: the mounter can work")
			}
			err := tc.call()
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Errorf("got %v, want %v with a message containing %q", err, tc.code, tc.msg)
			}
		})
	}
	if got := images(t, prefix); len(got) != 0 {
		t.Errorf("bad requests created images: %v", got)
	}
}

// GetCapacity reports the pool's free space; ListVolumes pages through the
// journal in volume ID order with the credentials of a credentials directory.
func TestCapacityAndList(t *testing.T) {
	dir := newDriverDir(t)
	creds := filepath.Join(dir, "creds", "c1")
	os.MkdirAll(creds, 0o700)
	os.WriteFile(filepath.Join(creds, "userID"), []byte(env["ROOKZMQ_CEPH_RBD_USER"]), 0o600)
	os.WriteFile(filepath.Join(creds, "userKey"), []byte(env["ROOKZMQ_CEPH_RBD_KEY"]+"\n"), 0o600)
	d := startDriver(t, dir, nil, "--credentials-dir", filepath.Join(dir, "creds"))
	c := ctx(t)
	capResp, err := d.ctrl.GetCapacity(c, &csi.GetCapacityRequest{Parameters: map[string]string{"clusterID": "c1", "pool": "rbd"}})
	if err != nil || capResp.GetAvailableCapacity() <= 0 {
		t.Fatalf("GetCapacity: %v %v", capResp, err)
	}
	if _, err := d.ctrl.GetCapacity(c, &csi.GetCapacityRequest{Parameters: map[string]string{"clusterID": "c1", "pool": "nope"}}); status.Code(err) != codes.NotFound {
		t.Errorf("GetCapacity of a missing pool: %v, want NotFound", err)
	}
	prefix := uniquePrefix(t)
	var ids []string
	for i := 0; i < 5; i++ {
		r, err := d.ctrl.CreateVolume(c, createReq(fmt.Sprintf("%s%d", prefix, i), prefix, 64<<20))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.GetVolume().GetVolumeId())
	}
	seen := map[string]int{}
	token := ""
	for pages := 0; ; pages++ {
		r, err := d.ctrl.ListVolumes(c, &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		if len(r.GetEntries()) > 2 || pages > 1000 {
			t.Fatalf("page of %d entries", len(r.GetEntries()))
		}
		for _, e := range r.GetEntries() {
			seen[e.GetVolume().GetVolumeId()]++
		}
		if token = r.GetNextToken(); token == "" {
			break
		}
	}
	for _, id := range ids {
		if seen[id] != 1 {
			t.Errorf("volume %s listed %d times", id, seen[id])
		}
	}
	if _, err := d.ctrl.ListVolumes(c, &csi.ListVolumesRequest{StartingToken: "bogus"}); status.Code(err) != codes.Aborted {
		t.Errorf("bad token: %v, want Aborted", err)
	}
	for _, id := range ids {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
	}
	assertNoOrphans(t, prefix)
}
