package e2e

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// 20 concurrent CreateVolume calls with one name make exactly one subvolume,
// and all of them return its volume ID.
func TestCephFSCreateStorm(t *testing.T) { testCephFSCreateStorm(t, cephfsSecrets(t)) }

func testCephFSCreateStorm(t *testing.T, sec map[string]string) {
	d := startCephFSDriver(t, newDriverDir(t), nil)
	prefix := uniquePrefix(t)
	var wg sync.WaitGroup
	ids := make([]string, 20)
	errs := make([]error, 20)
	for i := range ids {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := d.ctrl.CreateVolume(ctx(t), cephfsCreateReqAs(sec, prefix+"storm", prefix, 64<<20))
			ids[i], errs[i] = r.GetVolume().GetVolumeId(), err
		}(i)
	}
	wg.Wait()
	for i := range ids {
		if errs[i] != nil || ids[i] != ids[0] {
			t.Fatalf("call %d: id %q, err %v (call 0: %q)", i, ids[i], errs[i], ids[0])
		}
	}
	if got := subvolumesCLI(t, prefix); len(got) != 1 {
		t.Fatalf("subvolumes after the storm: %v, want exactly one", got)
	}
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: ids[0], Secrets: sec}); err != nil {
		t.Fatal(err)
	}
	waitNoCephFSOrphans(t, prefix)
}

// A controller SIGKILLed in the middle of CreateVolume or DeleteVolume,
// restarted and retried, leaves no orphan subvolume and no journal entry. A
// removal promised before the crash is finished even if nobody retries it.
func TestCephFSCrashDuringCreateAndDelete(t *testing.T) {
	testCephFSCrash(t, cephfsSecrets(t), "cephfs-create-after-reserve", "cephfs-create-after-mkdir", "cephfs-create-after-subvolume")
}

// testCephFSCrash kills the controller at each of createPoints, then in
// DeleteVolume and in the purge, provisioning with sec.
func testCephFSCrash(t *testing.T, sec map[string]string, createPoints ...string) {
	dir := newDriverDir(t)
	prefix := uniquePrefix(t)
	for _, point := range createPoints {
		t.Run(point, func(t *testing.T) {
			name := prefix + point
			req := cephfsCreateReqAs(sec, name, prefix, 64<<20)
			req.Parameters["csi.storage.k8s.io/pvc/name"] = "pvc-" + point
			d := startCephFSDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=" + point})
			if _, err := d.ctrl.CreateVolume(ctx(t), req); err == nil {
				t.Fatal("CreateVolume succeeded through its crash point")
			}
			waitDead(t, d)
			d = startCephFSDriver(t, dir, nil)
			r, err := d.ctrl.CreateVolume(ctx(t), req)
			if err != nil {
				t.Fatalf("retry after crash: %v", err)
			}
			// The retry finishes what the crash interrupted, metadata included.
			var meta map[string]string
			if err := json.Unmarshal([]byte(subvolumeCLI(t, "metadata ls", r.GetVolume().GetVolumeContext()["subvolumeName"])), &meta); err != nil ||
				meta["csi.storage.k8s.io/pvc/name"] != "pvc-"+point {
				t.Errorf("subvolume metadata after the retry: %v, %v", meta, err)
			}
			if n := len(cephfsJournal(t, name)); n != 2 {
				t.Errorf("journal has %d keys for %s, want 2", n, name)
			}
			if got := subvolumesCLI(t, prefix); len(got) != 1 {
				t.Errorf("subvolumes: %v, want one", got)
			}
			subvolumeCLI(t, "info", r.GetVolume().GetVolumeContext()["subvolumeName"])
			if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: sec}); err != nil {
				t.Fatal(err)
			}
			waitNoCephFSOrphans(t, prefix)
			d.stop()
		})
	}
	for _, retry := range []bool{true, false} {
		t.Run(fmt.Sprintf("cephfs-delete-after-promise/retry=%v", retry), func(t *testing.T) {
			d := startCephFSDriver(t, dir, nil)
			r, err := d.ctrl.CreateVolume(ctx(t), cephfsCreateReqAs(sec, prefix+"del", prefix, 64<<20))
			if err != nil {
				t.Fatal(err)
			}
			d.stop()
			d = startCephFSDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=cephfs-delete-after-promise"})
			id := r.GetVolume().GetVolumeId()
			if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec}); err == nil {
				t.Fatal("DeleteVolume succeeded through its crash point")
			}
			waitDead(t, d)
			if len(subvolumesCLI(t, prefix)) == 0 || len(cephfsJournal(t, r.GetVolume().GetVolumeContext()["subvolumeName"])) == 0 {
				t.Fatal("the subvolume or its journal entry is gone before the crash point: the test proves nothing")
			}
			d = startCephFSDriver(t, dir, nil)
			if retry {
				if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec}); err != nil {
					t.Fatalf("retry after crash: %v", err)
				}
			} else {
				// Any call that reaches the group resumes its purger.
				if _, err := d.ctrl.ValidateVolumeCapabilities(ctx(t), &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
					VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: sec}); status.Code(err) != codes.NotFound {
					t.Fatalf("ValidateVolumeCapabilities of a volume being deleted: %v, want NotFound", err)
				}
			}
			waitNoCephFSOrphans(t, prefix)
			d.stop()
		})
	}
	// The purger is killed after moving the subvolume to the trash: the next
	// process finishes the purge without any DeleteVolume retry.
	t.Run("cephfs-purge-after-trash", func(t *testing.T) {
		d := startCephFSDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=cephfs-purge-after-trash"})
		r, err := d.ctrl.CreateVolume(ctx(t), cephfsCreateReqAs(sec, prefix+"purge", prefix, 64<<20))
		if err != nil {
			t.Fatal(err)
		}
		id := r.GetVolume().GetVolumeId()
		if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec}); err != nil {
			t.Fatal(err)
		}
		waitDead(t, d)
		if len(cephfsJournal(t, r.GetVolume().GetVolumeContext()["subvolumeName"])) == 0 {
			t.Fatal("the journal forgot the volume before the crash point: the test proves nothing")
		}
		// With the credentials directory, the new process resumes the
		// purge at start, before any call.
		creds := filepath.Join(dir, "creds")
		if err := os.MkdirAll(filepath.Join(creds, "c1"), 0o700); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(creds, "c1", "userID"), []byte(sec["adminID"]), 0o600)
		os.WriteFile(filepath.Join(creds, "c1", "userKey"), []byte(sec["adminKey"]), 0o600)
		d = startCephFSDriver(t, dir, nil, "--credentials-dir", creds)
		waitNoCephFSOrphans(t, prefix)
		d.stop()
	})
}

// SIGKILL at random moments of CreateVolume and DeleteVolume: every retry
// completes and nothing is orphaned.
func TestCephFSRandomKills(t *testing.T) { testCephFSRandomKills(t, cephfsSecrets(t)) }

func testCephFSRandomKills(t *testing.T, sec map[string]string) {
	dir := newDriverDir(t)
	prefix := uniquePrefix(t)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for i := 0; i < 6; i++ {
		name := fmt.Sprintf("%sr%d", prefix, i)
		d := startCephFSDriver(t, dir, nil)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); d.ctrl.CreateVolume(ctx(t), cephfsCreateReqAs(sec, name, prefix, 64<<20)) }()
		time.Sleep(time.Duration(rng.Intn(30)) * time.Millisecond)
		d.kill()
		wg.Wait()
		d = startCephFSDriver(t, dir, nil)
		r, err := d.ctrl.CreateVolume(ctx(t), cephfsCreateReqAs(sec, name, prefix, 64<<20))
		if err != nil {
			t.Fatalf("create retry after kill: %v", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: sec})
		}()
		time.Sleep(time.Duration(rng.Intn(10)) * time.Millisecond)
		d.kill()
		wg.Wait()
		d = startCephFSDriver(t, dir, nil)
		if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: sec}); err != nil {
			t.Fatalf("delete retry after kill: %v", err)
		}
		d.stop()
	}
	// A new process resumes any purge a kill interrupted on its first call.
	d := startCephFSDriver(t, dir, nil)
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: "1-02-c1-06-cephfs-03-csi-" + prefix + "none", Secrets: sec}); err != nil {
		t.Fatal(err)
	}
	waitNoCephFSOrphans(t, prefix)
}

// Bad input gets precise codes and messages naming the problem.
func TestCephFSBadInput(t *testing.T) {
	d := startCephFSDriver(t, newDriverDir(t), nil, "--node=true")
	c := ctx(t)
	prefix := uniquePrefix(t)
	good := func() *csi.CreateVolumeRequest { return cephfsCreateReq(t, prefix+"bad", prefix, 64<<20) }
	with := func(f func(r *csi.CreateVolumeRequest)) func() error {
		return func() error { r := good(); f(r); _, err := d.ctrl.CreateVolume(c, r); return err }
	}
	missingID := "1-02-c1-06-cephfs-03-csi-" + prefix + "missing"
	noCaps := cephUser(t, "rookzmq-e2e-nocaps-"+strings.TrimSuffix(prefix, "-"), true)
	noPath := cephUser(t, "rookzmq-e2e-nopath-"+strings.TrimSuffix(prefix, "-"), true,
		"mon", "allow r", "osd", "allow rw tag cephfs metadata=*")
	cases := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"no name", with(func(r *csi.CreateVolumeRequest) { r.Name = "" }), codes.InvalidArgument, "name is required"},
		{"block", with(func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{blockCap(rwo)}
		}), codes.InvalidArgument, "block access is not supported: a CephFS volume is a shared file system"},
		{"no capabilities", with(func(r *csi.CreateVolumeRequest) { r.VolumeCapabilities = nil }), codes.InvalidArgument, "volume_capabilities"},
		{"unknown parameter", with(func(r *csi.CreateVolumeRequest) { r.Parameters["fsname"] = "x" }), codes.InvalidArgument, `unknown parameter "fsname"`},
		{"no fsName", with(func(r *csi.CreateVolumeRequest) { delete(r.Parameters, "fsName") }), codes.InvalidArgument, "fsName is required"},
		{"missing fs", with(func(r *csi.CreateVolumeRequest) { r.Parameters["fsName"] = "nofs" }), codes.InvalidArgument, `file system "nofs" does not exist`},
		{"bad mounter", with(func(r *csi.CreateVolumeRequest) { r.Parameters["mounter"] = "rbd-fuse" }), codes.InvalidArgument, `unknown mounter "rbd-fuse"`},
		{"pool not a data pool", with(func(r *csi.CreateVolumeRequest) { r.Parameters["pool"] = "rbd" }), codes.InvalidArgument, `"rbd" is not a data pool`},
		{"unknown clusterID", with(func(r *csi.CreateVolumeRequest) { r.Parameters["clusterID"] = "nope" }), codes.InvalidArgument, `unknown clusterID "nope"`},
		{"missing secrets", with(func(r *csi.CreateVolumeRequest) { r.Secrets = nil }), codes.InvalidArgument, "missing secrets adminID and adminKey"},
		{"user secrets only", with(func(r *csi.CreateVolumeRequest) {
			r.Secrets = map[string]string{"userID": "x", "userKey": "AQAA8VNlAAAAABAA6Oqqywpz1H7d5jMJlw+a0Q=="}
		}), codes.InvalidArgument, "missing secrets adminID and adminKey"},
		{"negative capacity", with(func(r *csi.CreateVolumeRequest) { r.CapacityRange.RequiredBytes = -1 }), codes.InvalidArgument, "required_bytes is negative"},
		{"content source", with(func(r *csi.CreateVolumeRequest) {
			r.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: missingID}}}
		}), codes.InvalidArgument, "volume_content_source"},
		{"wrong key", with(func(r *csi.CreateVolumeRequest) {
			r.Secrets = map[string]string{"adminID": cephfsProvisioner, "adminKey": "AQAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAA=="}
		}), codes.PermissionDenied, "connecting to cluster"},
		// ceph-csi's caps work, through the mgr (cephfs_mgr_test.go); a
		// user with neither path's caps is refused, naming both.
		{"no caps at all", with(func(r *csi.CreateVolumeRequest) { r.Secrets = noCaps }),
			codes.PermissionDenied, "either mds 'allow rwps fsname=<fs> path=/volumes'"},
		{"neither MDS nor mgr caps", with(func(r *csi.CreateVolumeRequest) { r.Secrets = noPath }),
			codes.PermissionDenied, "neither through libcephfs (the MDS refused this user a libcephfs mount of /volumes"},
		{"neither MDS nor mgr caps (names the caps)", with(func(r *csi.CreateVolumeRequest) { r.Secrets = noPath }),
			codes.PermissionDenied, "or mgr 'allow rw' (the mgr volumes module"},
		{"expand missing", func() error {
			_, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: missingID,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}, Secrets: cephfsSecrets(t)})
			return err
		}, codes.NotFound, "does not exist"},
		{"expand no range", func() error {
			_, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: missingID, Secrets: cephfsSecrets(t)})
			return err
		}, codes.InvalidArgument, "capacity_range is required"},
		{"validate missing", func() error {
			_, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: missingID,
				VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: cephfsSecrets(t)})
			return err
		}, codes.NotFound, "does not exist"},
		{"validate malformed", func() error {
			_, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "junk",
				VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: cephfsSecrets(t)})
			return err
		}, codes.NotFound, "junk"},
		{"delete malformed", func() error {
			_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: "junk", Secrets: cephfsSecrets(t)})
			return err
		}, codes.OK, ""},
		{"node stage of a missing volume", func() error {
			_, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: missingID, StagingTargetPath: filepath.Join(t.TempDir(), "s"),
				VolumeCapability: mountCap("", rwo), Secrets: cephfsSecrets(t)})
			return err
		}, codes.NotFound, "does not exist"},
		{"delete missing", func() error {
			_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: missingID, Secrets: cephfsSecrets(t)})
			return err
		}, codes.OK, ""},
	}
	for _, tc := range cases {
		err := tc.call()
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
			t.Errorf("%s: got %v (%v), want %v containing %q", tc.name, status.Code(err), err, tc.code, tc.msg)
		}
	}
	// The refused users reserved nothing (the promise of "delete missing"
	// names another volume).
	if keys := cephfsJournal(t, prefix+"bad"); len(keys) != 0 {
		t.Errorf("journal keys after the refused calls: %v", keys)
	}
	// Same name, a size the existing volume does not fit: AlreadyExists.
	r, err := d.ctrl.CreateVolume(c, good())
	if err != nil {
		t.Fatal(err)
	}
	bigger := good()
	bigger.CapacityRange.RequiredBytes = 128 << 20
	if _, err := d.ctrl.CreateVolume(c, bigger); status.Code(err) != codes.AlreadyExists {
		t.Errorf("same name, larger size: %v, want AlreadyExists", err)
	}
	for _, mode := range []csi.VolumeCapability_AccessMode_Mode{rwo, csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER,
		csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER} {
		v, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: r.GetVolume().GetVolumeId(),
			VolumeCapabilities: []*csi.VolumeCapability{mountCap("", mode)}, Secrets: cephfsSecrets(t)})
		if err != nil || v.GetConfirmed() == nil {
			t.Errorf("validate %v: %v, %v", mode, v, err)
		}
	}
	v, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: r.GetVolume().GetVolumeId(),
		VolumeCapabilities: []*csi.VolumeCapability{blockCap(rwo)}, Secrets: cephfsSecrets(t)})
	if err != nil || v.GetConfirmed() != nil || !strings.Contains(v.GetMessage(), "block") {
		t.Errorf("validate block: %v, %v", v, err)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatal(err)
	}
	waitNoCephFSOrphans(t, prefix)
}

// No secret appears in the log at -v=10, nor in an error message.
func TestCephFSSecretsNeverShown(t *testing.T) {
	dir := newDriverDir(t)
	d := startCephFSDriver(t, dir, nil, "-v=10")
	prefix := uniquePrefix(t)
	realKey := cephfsSecrets(t)["adminKey"]
	fakeKey := "AQAA8VNlAAAAABAA6Oqqywpz1H7d5jMJlw+a0Q=="
	r, err := d.ctrl.CreateVolume(ctx(t), cephfsCreateReq(t, prefix+"s", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	var msgs []string
	bad := cephfsCreateReq(t, prefix+"s2", prefix, 64<<20)
	bad.Secrets = map[string]string{"adminID": cephfsProvisioner, "adminKey": fakeKey}
	_, err = d.ctrl.CreateVolume(ctx(t), bad)
	msgs = append(msgs, fmt.Sprint(err))
	_, err = d.ctrl.ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(),
		CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, Secrets: cephfsSecrets(t)})
	msgs = append(msgs, fmt.Sprint(err))
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatal(err)
	}
	waitNoCephFSOrphans(t, prefix) // the purge runs in this process
	d.stop()
	logb, err := os.ReadFile(d.log)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(logb), "CreateVolume") {
		t.Fatal("the log has no CreateVolume line at -v=10: the test proves nothing")
	}
	for _, k := range []string{realKey, fakeKey} {
		if strings.Contains(string(logb), k) || strings.Contains(strings.Join(msgs, "\n"), k) {
			t.Errorf("a key appears in the log or an error")
		}
	}
}
