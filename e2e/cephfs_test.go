package e2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// waitNoCephFSOrphans waits (the purge is asynchronous) until neither the mgr
// lists a subvolume with prefix nor the journal holds a key naming it.
func waitNoCephFSOrphans(t *testing.T, prefix string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		svs, keys := subvolumesCLI(t, prefix), cephfsJournal(t, prefix)
		if len(svs) == 0 && len(keys) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("orphans after 30s: subvolumes %v, journal %v", svs, keys)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// A volume made through our controller is a subvolume the mgr understands:
// ls, info, getpath, metadata and resize work on it, and our expand and delete
// work after the mgr changed it.
func TestCephFSLifecycleWithCLI(t *testing.T) {
	d := startCephFSDriver(t, newDriverDir(t), nil)
	prefix := uniquePrefix(t)
	req := cephfsCreateReq(t, prefix+"pvc", prefix, 100<<20)
	req.Parameters["csi.storage.k8s.io/pvc/name"] = "data"
	req.Parameters["csi.storage.k8s.io/pvc/namespace"] = "ns1"
	req.Parameters["csi.storage.k8s.io/pv/name"] = "pvc-123"
	r, err := d.ctrl.CreateVolume(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	vc := r.GetVolume().GetVolumeContext()
	name := vc["subvolumeName"]
	if !strings.HasPrefix(name, prefix) || r.GetVolume().GetCapacityBytes() != 100<<20 {
		t.Fatalf("CreateVolume = %+v", r.GetVolume())
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
	id := r.GetVolume().GetVolumeId()
	e, err := d.ctrl.ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 200 << 20}, Secrets: cephfsSecrets(t)})
	if err != nil || e.GetCapacityBytes() != 200<<20 || !e.GetNodeExpansionRequired() {
		t.Fatalf("expand = %v, %v", e, err)
	}
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "info", name)), &info); err != nil || info.BytesQuota != float64(200<<20) {
		t.Fatalf("after expand, info quota = %v, %v", info.BytesQuota, err)
	}
	// The mgr resizes our subvolume; our controller reads its quota back.
	subvolumeCLI(t, "resize", name, "314572800")
	e, err = d.ctrl.ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 250 << 20}, Secrets: cephfsSecrets(t)})
	if err != nil || e.GetCapacityBytes() != 300<<20 {
		t.Fatalf("expand after mgr resize = %v, %v", e, err)
	}
	if _, err := d.ctrl.ValidateVolumeCapabilities(ctx(t), &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatal(err)
	}
	// Deleted at once for CSI, even before the purger got to it.
	if _, err := d.ctrl.ValidateVolumeCapabilities(ctx(t), &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: cephfsSecrets(t)}); status.Code(err) != codes.NotFound {
		t.Fatalf("ValidateVolumeCapabilities after DeleteVolume: %v, want NotFound", err)
	}
	if _, err := d.ctrl.ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 400 << 20}, Secrets: cephfsSecrets(t)}); status.Code(err) != codes.NotFound {
		t.Fatalf("ControllerExpandVolume after DeleteVolume: %v, want NotFound", err)
	}
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatalf("second DeleteVolume: %v", err)
	}
	waitNoCephFSOrphans(t, prefix)

	// The other way round: the mgr removes our subvolume (rm), then our DeleteVolume succeeds.
	r, err = d.ctrl.CreateVolume(ctx(t), cephfsCreateReq(t, prefix+"pvc2", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	subvolumeCLI(t, "rm", r.GetVolume().GetVolumeContext()["subvolumeName"])
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: cephfsSecrets(t)}); err != nil {
		t.Fatalf("DeleteVolume after ceph fs subvolume rm: %v", err)
	}
	waitNoCephFSOrphans(t, prefix)
}

// GetCapacity reports the data pool's free space; ListVolumes lists our
// volume (credentials remembered from the CreateVolume) and pages by token.
func TestCephFSCapacityAndList(t *testing.T) {
	d := startCephFSDriver(t, newDriverDir(t), nil)
	prefix := uniquePrefix(t)
	var ids []string
	for i := 0; i < 3; i++ {
		r, err := d.ctrl.CreateVolume(ctx(t), cephfsCreateReq(t, prefix+string(rune('a'+i)), prefix, 64<<20))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.GetVolume().GetVolumeId())
	}
	capResp, err := d.ctrl.GetCapacity(ctx(t), &csi.GetCapacityRequest{Parameters: cephfsParams()})
	if err != nil || capResp.GetAvailableCapacity() <= 0 {
		t.Fatalf("GetCapacity = %v, %v", capResp, err)
	}
	if _, err := d.ctrl.GetCapacity(ctx(t), &csi.GetCapacityRequest{Parameters: cephfsParams("pool", "rbd")}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("GetCapacity of a pool that is not a data pool: %v", err)
	}
	seen := map[string]bool{}
	token := ""
	for pages := 0; ; pages++ {
		l, err := d.ctrl.ListVolumes(ctx(t), &csi.ListVolumesRequest{MaxEntries: 2, StartingToken: token})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range l.GetEntries() {
			seen[e.GetVolume().GetVolumeId()] = true
		}
		if token = l.GetNextToken(); token == "" || pages > 1000 {
			break
		}
	}
	for _, id := range ids {
		if !seen[id] {
			t.Errorf("ListVolumes misses %s", id)
		}
		if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: cephfsSecrets(t)}); err != nil {
			t.Fatal(err)
		}
	}
	l, err := d.ctrl.ListVolumes(ctx(t), &csi.ListVolumesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range l.GetEntries() {
		if strings.Contains(e.GetVolume().GetVolumeId(), prefix) {
			t.Errorf("ListVolumes still lists deleted %s", e.GetVolume().GetVolumeId())
		}
	}
	waitNoCephFSOrphans(t, prefix)
}
