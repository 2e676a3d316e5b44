package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// What cannot be served is refused with a precise code; DeleteVolume answers
// OK only for volumes that cannot exist, and warns when the ID is not a
// volume ID at all.
func TestAdoptCephCSIRefusals(t *testing.T) {
	dir := adoptDriverDir(t)
	d := startDriver(t, dir, nil)
	c := ctx(t)
	poolID := rbdPoolID(t)
	idFor := func(cluster string, pool int64, u string) string {
		return fmt.Sprintf("0001-%04x-%s-%016x-%s", len(cluster), cluster, pool, u)
	}
	noObject := idFor(adoptCluster, poolID, uuid.NewString())
	encrypted := makeCephCSIVolume(t, adoptCluster, "", "default", 16<<20, "", map[string]string{"csi.volume.encryptKMS": "vault-prod"})
	hostile := makeCephCSIVolume(t, adoptCluster, "", "default", 16<<20, "", map[string]string{"csi.imagename": "-ofoo"})
	stage := func(id string) error {
		_, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: filepath.Join(t.TempDir(), "s"),
			VolumeCapability: mountCap("ext4", rwo), Secrets: secrets(), VolumeContext: map[string]string{"mounter": "rbd-fuse"}})
		return err
	}
	del := func(id string) error {
		_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()})
		return err
	}
	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"delete: not a volume ID", func() error { return del("reallyfakevolumeid") }, codes.OK, ""},
		{"delete: ceph-csi's shape, malformed", func() error { return del("0001-0009-rook-ceph-zz") }, codes.OK, ""},
		{"delete: cluster not in the clusters file", func() error { return del(idFor("nope", poolID, uuid.NewString())) },
			codes.InvalidArgument, `unknown clusterID "nope"`},
		{"delete: no secrets", func() error {
			_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: noObject})
			return err
		}, codes.InvalidArgument, "missing secrets"},
		{"delete: pool gone", func() error { return del(idFor(adoptCluster, 1<<40, uuid.NewString())) }, codes.OK, ""},
		{"delete: journal object gone", func() error { return del(noObject) }, codes.OK, ""},
		{"stage: malformed", func() error { return stage("0001-0009-rook-ceph-000000000000000G-" + uuid.NewString()) },
			codes.InvalidArgument, "malformed pool ID"},
		{"stage: no journal object", func() error { return stage(noObject) }, codes.NotFound, "no journal object csi.volume."},
		{"stage: pool gone", func() error { return stage(idFor(adoptCluster, 1<<40, uuid.NewString())) }, codes.NotFound, "no pool with ID"},
		{"stage: encrypted", func() error { return stage(encrypted.handle) }, codes.FailedPrecondition, `encrypted (KMS "vault-prod")`},
		{"stage: hostile image name", func() error { return stage(hostile.handle) }, codes.FailedPrecondition, `starts with '-'`},
		{"publish: malformed", func() error {
			_, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: "0001-0009-rook-ceph-x", StagingTargetPath: t.TempDir(),
				TargetPath: filepath.Join(t.TempDir(), "t"), VolumeCapability: mountCap("ext4", rwo)})
			return err
		}, codes.InvalidArgument, "shorter than"},
		{"expand: no journal object", func() error {
			_, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: noObject,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, Secrets: secrets()})
			return err
		}, codes.NotFound, "no journal object"},
		{"expand: malformed", func() error {
			_, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: "0001-0009-rook-ceph-x",
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, Secrets: secrets()})
			return err
		}, codes.NotFound, "shorter than"},
		{"validate: found", func() error {
			r, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: encrypted.handle,
				VolumeCapabilities: []*csi.VolumeCapability{mountCap("ext4", rwo)}, Secrets: secrets()})
			if err == nil && r.GetConfirmed() == nil {
				return fmt.Errorf("not confirmed: %v", r)
			}
			return err
		}, codes.OK, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
				t.Errorf("got %v, want %v with a message containing %q", err, tc.code, tc.msg)
			}
		})
	}
	log, _ := os.ReadFile(d.log)
	for _, id := range []string{"reallyfakevolumeid", "0001-0009-rook-ceph-zz"} {
		if !strings.Contains(string(log), fmt.Sprintf("DeleteVolume: volume ID %q is neither rookzmq's nor ceph-csi's", id)) {
			t.Errorf("no warning logged for DeleteVolume of %q", id)
		}
	}
	for _, l := range strings.Split(string(log), "\n") {
		if strings.Contains(l, "is neither rookzmq's nor ceph-csi's") && !strings.HasPrefix(l, "W") {
			t.Errorf("not at warning level: %s", l)
		}
	}
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("refused stages left:\n%s", strings.Join(left, "\n"))
	}
	// Refused volumes stay whole; deleting them works (the encrypted one with a warning).
	for _, v := range []*cephCSIVol{encrypted, hostile} {
		if left := cephCSILeftovers(t, v); len(left) != 3 {
			t.Fatalf("refused volume %s: %v, want image, key and object", v.handle, left)
		}
	}
	if err := del(encrypted.handle); err != nil {
		t.Fatal(err)
	}
	if left := cephCSILeftovers(t, encrypted); len(left) != 0 {
		t.Fatalf("left after deleting the encrypted volume: %v", left)
	}
	if !logHasWarning(t, d, `ceph-csi volume `+encrypted.handle+` was encrypted with KMS "vault-prod"`) {
		t.Error("no warning about the KMS key of the encrypted volume")
	}
	if err := del(hostile.handle); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("delete of a volume whose journal names a hostile image: %v, want FailedPrecondition", err)
	}
}

// Concurrent deletes of one ceph-csi volume: each answers OK or Aborted, and
// nothing is left.
func TestAdoptCephCSIConcurrentDelete(t *testing.T) {
	d := startDriver(t, adoptDriverDir(t), nil)
	v := makeCephCSIVolume(t, adoptCluster, "", "default", 16<<20, "", nil)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.handle, Secrets: secrets()})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil && status.Code(err) != codes.Aborted {
			t.Errorf("delete %d: %v", i, err)
		}
	}
	deleteEventually(t, d, v.handle)
	if left := cephCSILeftovers(t, v); len(left) != 0 {
		t.Fatalf("left: %v", left)
	}
}

// A controller SIGKILLed at any point of deleting a ceph-csi volume leaves
// what a retry finishes.
func TestAdoptCephCSICrashDuringDelete(t *testing.T) {
	dir := adoptDriverDir(t)
	for _, tc := range []struct {
		point string
		left  int // image, key, object: what the crash must leave
	}{
		{"cephcsi-delete-before-image", 3},
		{"cephcsi-delete-after-image", 2},
		{"cephcsi-delete-after-name", 1},
	} {
		t.Run(tc.point, func(t *testing.T) {
			v := makeCephCSIVolume(t, adoptCluster, "", "default", 16<<20, "", nil)
			d := startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=" + tc.point})
			if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.handle, Secrets: secrets()}); err == nil {
				t.Fatal("DeleteVolume succeeded through its crash point")
			}
			waitDead(t, d)
			// A trashed image is not counted: its purge was recorded, and
			// is queued when the driver restarts.
			if left := cephCSILeftoversNow(t, v, false); len(left) != tc.left {
				t.Fatalf("at the crash: %v, want %d things left", left, tc.left)
			}
			d = startDriver(t, dir, nil)
			if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.handle, Secrets: secrets()}); err != nil {
				t.Fatalf("retry after the crash: %v", err)
			}
			if left := cephCSILeftovers(t, v); len(left) != 0 {
				t.Fatalf("left after the retry: %v", left)
			}
			d.stop()
		})
	}
}

// Half-finished states ceph-csi (or a crashed delete) can leave are finished:
// an image already in the trash or gone, a journal object missing the request
// name or the image name. A request name that points at another volume keeps
// its key.
func TestAdoptCephCSIPartialStates(t *testing.T) {
	d := startDriver(t, adoptDriverDir(t), nil)
	other := uuid.NewString()
	for _, tc := range []struct {
		name    string
		prepare func(t *testing.T, v *cephCSIVol)
		want    []string
	}{
		{"image in the trash", func(t *testing.T, v *cephCSIVol) {
			img, err := rbd.OpenImage(v.io, v.image, rbd.NoSnapshot)
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if err := img.Trash(time.Hour); err != nil {
				t.Fatal(err)
			}
		}, nil},
		{"image gone", func(t *testing.T, v *cephCSIVol) {
			if err := rbd.RemoveImage(v.io, v.image); err != nil {
				t.Fatal(err)
			}
		}, nil},
		{"no csi.volname", func(t *testing.T, v *cephCSIVol) {
			if err := v.io.RmOmapKeys("csi.volume."+v.uuid, []string{"csi.volname"}); err != nil {
				t.Fatal(err)
			}
		}, nil},
		{"no csi.imagename", func(t *testing.T, v *cephCSIVol) {
			if err := v.io.RmOmapKeys("csi.volume."+v.uuid, []string{"csi.imagename"}); err != nil {
				t.Fatal(err)
			}
		}, nil},
		{"name reserved by another volume", func(t *testing.T, v *cephCSIVol) {
			if err := v.io.SetOmap("csi.volumes.default", map[string][]byte{"csi.volume." + v.reqName: []byte(other)}); err != nil {
				t.Fatal(err)
			}
		}, []string{"key"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := makeCephCSIVolume(t, adoptCluster, "", "default", 16<<20, "", nil)
			tc.prepare(t, v)
			if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.handle, Secrets: secrets()}); err != nil {
				t.Fatal(err)
			}
			left := cephCSILeftovers(t, v)
			if len(left) != len(tc.want) {
				t.Fatalf("left: %v, want %v", left, tc.want)
			}
			if tc.want != nil {
				if val, _ := omapKey(t, v.io, "csi.volumes.default", "csi.volume."+v.reqName); val != other {
					t.Fatalf("the other volume's key now holds %q", val)
				}
				if !logHasWarning(t, d, `key "csi.volume.`+v.reqName+`" points at "`+other+`"`) {
					t.Error("no warning about the key left alone")
				}
			}
		})
	}
}

// logHasWarning says whether the driver logged a warning-level line containing s.
func logHasWarning(t *testing.T, d *driver, s string) bool {
	t.Helper()
	b, err := os.ReadFile(d.log)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "W") && strings.Contains(l, s) {
			return true
		}
	}
	return false
}
