package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/ceph/go-ceph/rados"
	"github.com/container-storage-interface/spec/lib/go/csi"
)

// cephfsProvisioner is the CephFS provisioning user the tests create: the
// cluster's csi-cephfs user has ceph-csi's caps, which lack the MDS 'p' flag
// that setting quotas and layouts directly (without the mgr) needs.
const cephfsProvisioner = "rookzmq-cephfs-prov"

var (
	cephfsOnce sync.Once
	cephfsKey  string
	cephfsErr  error
)

// cephfsSecrets are the provisioner's adminID/adminKey.
func cephfsSecrets(t testing.TB) map[string]string {
	t.Helper()
	cephfsOnce.Do(func() {
		fsName := env["ROOKZMQ_CEPH_FS_NAME"]
		out, err := cephCLI("auth", "get-or-create", "client."+cephfsProvisioner,
			"mon", "allow r", "mgr", "allow rw",
			"osd", "allow rw tag cephfs metadata="+fsName+", allow rw tag cephfs data="+fsName,
			"mds", "allow rwps fsname="+fsName+" path=/volumes")
		if err != nil {
			cephfsErr = fmt.Errorf("creating client.%s: %v: %s", cephfsProvisioner, err, out)
			return
		}
		for _, line := range strings.Split(out, "\n") {
			if k, v, ok := strings.Cut(strings.TrimSpace(line), "="); ok && strings.TrimSpace(k) == "key" {
				cephfsKey = strings.TrimSpace(v)
			}
		}
		if cephfsKey == "" {
			cephfsErr = fmt.Errorf("no key for client.%s", cephfsProvisioner)
		}
	})
	if cephfsErr != nil {
		t.Fatal(cephfsErr)
	}
	return map[string]string{"adminID": cephfsProvisioner, "adminKey": cephfsKey}
}

// cephCLI runs the ceph CLI as client.admin and returns its output.
func cephCLI(args ...string) (string, error) {
	cmd := exec.Command("ceph", append([]string{"--conf", env["CEPH_CONF"]}, args...)...)
	cmd.Env = append(os.Environ(), "CEPH_ARGS="+env["CEPH_ARGS"])
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// subvolumeCLI runs `ceph fs subvolume SUB <fs> ARGS... --group_name csi`.
func subvolumeCLI(t testing.TB, sub string, args ...string) string {
	t.Helper()
	all := append(append([]string{"fs", "subvolume"}, strings.Fields(sub)...), env["ROOKZMQ_CEPH_FS_NAME"])
	all = append(all, args...)
	all = append(all, "--group_name", env["ROOKZMQ_CEPH_SUBVOLUMEGROUP"])
	out, err := cephCLI(all...)
	if err != nil {
		t.Fatalf("ceph %s: %v: %s", strings.Join(all, " "), err, out)
	}
	return out
}

// subvolumesCLI lists the group's subvolumes with prefix, through the mgr.
func subvolumesCLI(t testing.TB, prefix string) []string {
	t.Helper()
	var ls []struct{ Name string }
	if err := json.Unmarshal([]byte(subvolumeCLI(t, "ls")), &ls); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ls {
		if strings.HasPrefix(e.Name, prefix) {
			out = append(out, e.Name)
		}
	}
	return out
}

// startCephFSDriver runs the binary as a CephFS controller in dir.
func startCephFSDriver(t testing.TB, dir string, extraEnv []string, flags ...string) *driver {
	t.Helper()
	cfg := fmt.Sprintf(`[{"clusterID":"c1","monitors":[%q],"cephFS":{"subvolumeGroup":%q}}]`,
		env["ROOKZMQ_CEPH_MONITORS"], env["ROOKZMQ_CEPH_SUBVOLUMEGROUP"])
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return startDriver(t, dir, extraEnv, append([]string{"--type=cephfs", "--node=false", "--drivername=cephfs.rookzmq.io"}, flags...)...)
}

func cephfsParams(extra ...string) map[string]string {
	p := map[string]string{"clusterID": "c1", "fsName": env["ROOKZMQ_CEPH_FS_NAME"]}
	for i := 0; i+1 < len(extra); i += 2 {
		p[extra[i]] = extra[i+1]
	}
	return p
}

func cephfsCreateReq(t testing.TB, name, prefix string, size int64) *csi.CreateVolumeRequest {
	return cephfsCreateReqAs(cephfsSecrets(t), name, prefix, size)
}

// cephfsCreateReqAs is cephfsCreateReq with the provisioner secrets sec.
func cephfsCreateReqAs(sec map[string]string, name, prefix string, size int64) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap("", csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)},
		Parameters:         cephfsParams("volumeNamePrefix", prefix), Secrets: sec,
	}
}

var (
	metaOnce sync.Once
	metaIO   *rados.IOContext
	metaErr  error
)

// cephfsJournal returns the keys of the CephFS journal (read as client.admin)
// that mention s.
func cephfsJournal(t testing.TB, s string) []string {
	t.Helper()
	metaOnce.Do(func() {
		var conn *rados.Conn
		conn, metaErr = rados.NewConnWithUser("admin")
		if metaErr == nil {
			conn.SetConfigOption("mon_host", env["ROOKZMQ_CEPH_MONITORS"])
			conn.SetConfigOption("key", env["ROOKZMQ_CEPH_ADMIN_KEY"])
			conn.SetConfigOption("admin_socket", "")
			metaErr = conn.Connect()
		}
		if metaErr == nil {
			metaIO, metaErr = conn.OpenIOContext("cephfs_metadata")
		}
		if metaErr == nil {
			metaIO.SetNamespace("rookzmq")
		}
	})
	if metaErr != nil {
		t.Fatal(metaErr)
	}
	vals, err := metaIO.GetAllOmapValues("rookzmq.cephfs."+env["ROOKZMQ_CEPH_SUBVOLUMEGROUP"], "", "", 100000)
	if err != nil && !strings.Contains(err.Error(), "No such file") {
		t.Fatal(err)
	}
	var out []string
	for k, v := range vals {
		if strings.Contains(k, s) || strings.Contains(string(v), s) {
			out = append(out, k+"="+string(v))
		}
	}
	return out
}
