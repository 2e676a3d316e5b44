package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The log line of a decision to provision through the mgr.
const mgrPathLog = "goes through the mgr volumes module"

// A provisioner user with ceph-csi's caps (no MDS caps, or no p flag)
// provisions through the mgr volumes module: the subvolumes are the same
// (ls, info, getpath, metadata), expand, validate and delete work, and the
// choice is logged once with its reason.
func TestCephFSMgrPathLifecycle(t *testing.T) {
	for _, u := range []struct {
		name   string
		sec    func(testing.TB) map[string]string
		reason string
	}{
		{"ceph-csi caps up to v3.10 (no MDS caps)", cephCSISecrets, "the MDS refused this user a libcephfs mount of /volumes"},
		{"ceph-csi caps since v3.11 (MDS r on /volumes)", cephCSI311Secrets, "creating a directory in /volumes/_deleting"},
		{"MDS rw on /volumes without the p flag", func(testing.TB) map[string]string {
			return map[string]string{"adminID": env["ROOKZMQ_CEPH_CEPHFS_USER"], "adminKey": env["ROOKZMQ_CEPH_CEPHFS_KEY"]}
		}, "setting ceph.quota.max_bytes (needs the MDS p flag)"},
	} {
		t.Run(u.name, func(t *testing.T) { testMgrPathLifecycle(t, u.sec(t), u.reason) })
	}
}

func testMgrPathLifecycle(t *testing.T, sec map[string]string, reason string) {
	d := startCephFSDriver(t, newDriverDir(t), nil, "-v=10")
	c := ctx(t)
	prefix := uniquePrefix(t)
	req := cephfsCreateReqAs(sec, prefix+"pvc", prefix, 100<<20)
	req.Parameters["csi.storage.k8s.io/pvc/name"] = "data"
	req.Parameters["csi.storage.k8s.io/pvc/namespace"] = "ns1"
	req.Parameters["csi.storage.k8s.io/pv/name"] = "pvc-123"
	r, err := d.ctrl.CreateVolume(c, req)
	if err != nil {
		t.Fatal(err)
	}
	vc := r.GetVolume().GetVolumeContext()
	name, id := vc["subvolumeName"], r.GetVolume().GetVolumeId()
	if !strings.HasPrefix(name, prefix) || r.GetVolume().GetCapacityBytes() != 100<<20 {
		t.Fatalf("CreateVolume = %+v", r.GetVolume())
	}
	if madeByFastPath(t, name) {
		t.Fatal("the subvolume was made through libcephfs, not the mgr")
	}
	if again, err := d.ctrl.CreateVolume(c, req); err != nil || again.GetVolume().GetVolumeId() != id {
		t.Fatalf("CreateVolume again = %v, %v; want %s", again, err, id)
	}
	if got := subvolumesCLI(t, prefix); len(got) != 1 || got[0] != name {
		t.Fatalf("ceph fs subvolume ls: %v, want [%s]", got, name)
	}
	var info struct {
		Path       string `json:"path"`
		BytesQuota any    `json:"bytes_quota"`
		DataPool   string `json:"data_pool"`
		State      string `json:"state"`
		Mode       int    `json:"mode"`
	}
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "info", name)), &info); err != nil {
		t.Fatal(err)
	}
	if info.Path != vc["subvolumePath"] || info.BytesQuota != float64(100<<20) || info.DataPool != "cephfs_data" ||
		info.State != "complete" || info.Mode&0o777 != 0o755 {
		t.Fatalf("ceph fs subvolume info: %+v (volume context %v)", info, vc)
	}
	if p := strings.TrimSpace(subvolumeCLI(t, "getpath", name)); p != info.Path {
		t.Fatalf("getpath = %q, want %q", p, info.Path)
	}
	var meta map[string]string
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "metadata ls", name)), &meta); err != nil {
		t.Fatal(err)
	}
	if meta["csi.storage.k8s.io/pvc/name"] != "data" || meta["csi.storage.k8s.io/pvc/namespace"] != "ns1" || meta["csi.storage.k8s.io/pv/name"] != "pvc-123" {
		t.Fatalf("subvolume metadata ls = %v", meta)
	}
	for _, want := range []struct{ ask, got int64 }{{200 << 20, 200 << 20}, {150 << 20, 200 << 20}} {
		e, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: want.ask}, Secrets: sec})
		if err != nil || e.GetCapacityBytes() != want.got || !e.GetNodeExpansionRequired() {
			t.Fatalf("expand to %d = %v, %v; want %d", want.ask, e, err, want.got)
		}
	}
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "info", name)), &info); err != nil || info.BytesQuota != float64(200<<20) {
		t.Fatalf("after expand, info quota = %v, %v", info.BytesQuota, err)
	}
	if v, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: sec}); err != nil || v.GetConfirmed() == nil {
		t.Fatalf("validate = %v, %v", v, err)
	}
	// No capacity: no quota; an explicit data pool is the subvolume's layout.
	r2, err := d.ctrl.CreateVolume(c, &csi.CreateVolumeRequest{Name: prefix + "nosize",
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)},
		Parameters:         cephfsParams("volumeNamePrefix", prefix, "pool", "cephfs_data"), Secrets: sec})
	if err != nil || r2.GetVolume().GetCapacityBytes() != 0 {
		t.Fatalf("CreateVolume without capacity = %v, %v", r2, err)
	}
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "info", r2.GetVolume().GetVolumeContext()["subvolumeName"])), &info); err != nil ||
		info.BytesQuota != "infinite" || info.DataPool != "cephfs_data" {
		t.Fatalf("info of the volume without capacity: %+v, %v", info, err)
	}

	for _, del := range []string{id, r2.GetVolume().GetVolumeId()} {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: del, Secrets: sec}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.ctrl.ValidateVolumeCapabilities(c, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: sec}); status.Code(err) != codes.NotFound {
		t.Fatalf("ValidateVolumeCapabilities after DeleteVolume: %v, want NotFound", err)
	}
	if _, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 400 << 20}, Secrets: sec}); status.Code(err) != codes.NotFound {
		t.Fatalf("ControllerExpandVolume after DeleteVolume: %v, want NotFound", err)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec}); err != nil {
		t.Fatalf("second DeleteVolume: %v", err)
	}
	waitNoCephFSOrphans(t, prefix)

	// The mgr removes the subvolume first: our DeleteVolume succeeds.
	r, err = d.ctrl.CreateVolume(c, cephfsCreateReqAs(sec, prefix+"pvc2", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	subvolumeCLI(t, "rm", r.GetVolume().GetVolumeContext()["subvolumeName"])
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: sec}); err != nil {
		t.Fatalf("DeleteVolume after ceph fs subvolume rm: %v", err)
	}
	waitNoCephFSOrphans(t, prefix)

	d.stop()
	if n := logCount(t, d, mgrPathLog); n != 1 {
		t.Errorf("the log has %d lines saying the user goes through the mgr, want 1", n)
	}
	if n := logCount(t, d, reason); n == 0 {
		t.Errorf("the log does not give the reason %q", reason)
	}
	if logCount(t, d, "allow rwps fsname="+env["ROOKZMQ_CEPH_FS_NAME"]+" path=/volumes") == 0 {
		t.Error("the log does not name the caps that make provisioning fast")
	}
	if logCount(t, d, sec["adminKey"]) != 0 {
		t.Error("the key appears in the log (-v=10)")
	}
}

// The guarantees of the fast path hold on the mgr path, tested the same way.
func TestCephFSMgrPathCreateStorm(t *testing.T) { testCephFSCreateStorm(t, cephCSISecrets(t)) }

func TestCephFSMgrPathCrashDuringCreateAndDelete(t *testing.T) {
	testCephFSCrash(t, cephCSISecrets(t), "cephfs-create-after-reserve", "cephfs-create-after-mgr-create", "cephfs-create-after-subvolume")
}

func TestCephFSMgrPathRandomKills(t *testing.T) { testCephFSRandomKills(t, cephCSISecrets(t)) }

func TestCephFSMgrPathCreateRaceTwoProcesses(t *testing.T) {
	testCephFSCreateRace(t, cephCSISecrets(t))
}

// The decision stands until --cephfs-caps-recheck has passed: a user given
// the fast path's caps then provisions through libcephfs. A user whose
// libcephfs mount is refused later (caps taken away, client evicted) goes
// back to the mgr on the next call.
func TestCephFSCapsRecheck(t *testing.T) {
	const recheck = 8 * time.Second
	user := fmt.Sprintf("rookzmq-e2e-recheck-%d", time.Now().UnixNano()%1e9)
	oldCaps := []string{"mon", "allow r", "mgr", "allow rw", "osd", "allow rw tag cephfs metadata=*"}
	sec := cephUser(t, user, true, oldCaps...)
	d := startCephFSDriver(t, newDriverDir(t), nil, "--cephfs-caps-recheck="+recheck.String())
	c := ctx(t)
	prefix := uniquePrefix(t)
	var ids []string
	create := func(n string) string {
		t.Helper()
		var err error
		for i := 0; i < 3; i++ {
			c20, cancel := context.WithTimeout(c, 20*time.Second)
			var r *csi.CreateVolumeResponse
			r, err = d.ctrl.CreateVolume(c20, cephfsCreateReqAs(sec, prefix+n, prefix, 16<<20))
			cancel()
			if err == nil {
				ids = append(ids, r.GetVolume().GetVolumeId())
				return r.GetVolume().GetVolumeContext()["subvolumeName"]
			}
			if status.Code(err) != codes.Unavailable { // the evicted client's first call
				break
			}
		}
		t.Fatalf("create %s: %v", n, err)
		return ""
	}
	decided := time.Now()
	if madeByFastPath(t, create("a")) {
		t.Fatal("a user without MDS caps provisioned through libcephfs")
	}
	setCaps(t, user, fastCaps()...)
	b := create("b")
	if time.Since(decided) >= recheck {
		t.Fatal("too slow to tell the decision stood: the recheck passed")
	}
	if madeByFastPath(t, b) {
		t.Fatal("the decision did not stand until the recheck")
	}
	time.Sleep(time.Until(decided.Add(recheck + 100*time.Millisecond)))
	if !madeByFastPath(t, create("c")) {
		t.Fatal("a user given the caps still provisions through the mgr after the recheck")
	}
	if n := logCount(t, d, "goes through libcephfs again"); n != 1 {
		t.Errorf("%d log lines say the user goes through libcephfs again, want 1", n)
	}

	// Caps taken away: once the client is cut off and mounts again, the
	// refused mount sends the user back to the mgr.
	setCaps(t, user, oldCaps...)
	evictUser(t, user)
	if madeByFastPath(t, create("d")) {
		t.Fatal("a user whose mount is refused still provisions through libcephfs")
	}
	if n := logCount(t, d, mgrPathLog); n != 2 {
		t.Errorf("%d log lines say the user goes through the mgr, want 2 (first decision, and after the caps were taken away)", n)
	}
	for _, id := range ids {
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec}); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
	waitNoCephFSOrphans(t, prefix)
}

// evictUser evicts the MDS sessions of client.user (which also blocklists
// them): the controller's libcephfs mount is cut off, and the capabilities
// its session held are free at once, so that later tests on the shared
// cluster do not wait for its timeout.
func evictUser(t *testing.T, user string) {
	t.Helper()
	mds := "mds." + env["ROOKZMQ_CEPH_FS_NAME"] + ":0"
	var sessions []struct {
		ID       int64          `json:"id"`
		Metadata map[string]any `json:"client_metadata"`
	}
	if err := json.Unmarshal(cephOut(t, "tell", mds, "session", "ls", "--format=json"), &sessions); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, s := range sessions {
		if s.Metadata["entity_id"] == user {
			cephOut(t, "tell", mds, "client", "evict", "id="+strconv.FormatInt(s.ID, 10))
			n++
		}
	}
	if n == 0 {
		t.Fatalf("no MDS session of client.%s", user)
	}
}

// A create the mgr path left without its metadata (killed between `fs
// subvolume create` and `metadata set`) and retried after the user got the
// fast path's caps is finished by the fast path: the PVC name is recorded
// in the mgr's .meta, which `ceph fs subvolume metadata ls` reads.
func TestCephFSMetadataAfterPathChange(t *testing.T) {
	user := fmt.Sprintf("rookzmq-e2e-pathchange-%d", time.Now().UnixNano()%1e9)
	sec := cephUser(t, user, true, "mon", "allow r", "mgr", "allow rw", "osd", "allow rw tag cephfs metadata=*")
	dir := newDriverDir(t)
	prefix := uniquePrefix(t)
	req := cephfsCreateReqAs(sec, prefix+"pvc", prefix, 32<<20)
	req.Parameters["csi.storage.k8s.io/pvc/name"] = "data"
	d := startCephFSDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=cephfs-create-after-mgr-create"})
	if _, err := d.ctrl.CreateVolume(ctx(t), req); err == nil {
		t.Fatal("CreateVolume succeeded through its crash point")
	}
	waitDead(t, d)
	setCaps(t, user, fastCaps()...)
	d = startCephFSDriver(t, dir, nil)
	r, err := d.ctrl.CreateVolume(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	name := r.GetVolume().GetVolumeContext()["subvolumeName"]
	// Both processes log to one file: the first went through the mgr and
	// reached its crash point, the second did not go through the mgr.
	if logCount(t, d, "crash point reached") != 1 || logCount(t, d, mgrPathLog) != 1 {
		t.Fatal("not one create through the mgr then a retry through libcephfs: the test proves nothing")
	}
	var meta map[string]string
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "metadata ls", name)), &meta); err != nil || meta["csi.storage.k8s.io/pvc/name"] != "data" {
		t.Errorf("subvolume metadata after the retry: %v, %v", meta, err)
	}
	var info struct {
		BytesQuota any    `json:"bytes_quota"`
		State      string `json:"state"`
	}
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "info", name)), &info); err != nil || info.BytesQuota != float64(32<<20) || info.State != "complete" {
		t.Errorf("info after the fast path rewrote .meta: %+v, %v", info, err)
	}
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: sec}); err != nil {
		t.Fatal(err)
	}
	waitNoCephFSOrphans(t, prefix)
}
