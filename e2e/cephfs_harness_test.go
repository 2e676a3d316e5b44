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

	gocephfs "github.com/ceph/go-ceph/cephfs"
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
	return startDriver(t, dir, extraEnv, append([]string{"--type=cephfs", "--node=false", "--drivername=cephfs.rookzmq.io", "--default-mounter=fuse"}, flags...)...)
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

// Provisioning users with ceph-csi's documented CephFS caps
// (docs/capabilities.md): up to v3.10 no MDS caps at all; since v3.11 MDS
// 'r' on /volumes and 'rws' on the group, never the p flag. With either the
// controller provisions through the mgr volumes module.
const (
	cephCSIProvisioner    = "rookzmq-e2e-cephcsi-prov"
	cephCSI311Provisioner = "rookzmq-e2e-cephcsi311-prov"
)

// cephCSISecrets are the adminID/adminKey of a user with exactly ceph-csi's
// CephFS provisioner caps up to v3.10: mon 'allow r' mgr 'allow rw' osd
// 'allow rw tag cephfs metadata=*'.
func cephCSISecrets(t testing.TB) map[string]string {
	return cephUser(t, cephCSIProvisioner, false, "mon", "allow r", "mgr", "allow rw", "osd", "allow rw tag cephfs metadata=*")
}

// cephCSI311Secrets are those of a user with ceph-csi's caps since v3.11.
func cephCSI311Secrets(t testing.TB) map[string]string {
	fs, group := env["ROOKZMQ_CEPH_FS_NAME"], env["ROOKZMQ_CEPH_SUBVOLUMEGROUP"]
	return cephUser(t, cephCSI311Provisioner, false, "mgr", "allow rw",
		"osd", "allow rw tag cephfs metadata="+fs+", allow rw tag cephfs data="+fs,
		"mds", "allow r fsname="+fs+" path=/volumes, allow rws fsname="+fs+" path=/volumes/"+group,
		"mon", "allow r fsname="+fs)
}

// fastCaps are the caps of the libcephfs path (cephfsProvisioner's).
func fastCaps() []string {
	fs := env["ROOKZMQ_CEPH_FS_NAME"]
	return []string{"mon", "allow r", "mgr", "allow rw", "osd", "allow rw tag cephfs metadata=" + fs + ", allow rw tag cephfs data=" + fs,
		"mds", "allow rwps fsname=" + fs + " path=/volumes"}
}

// cephUser makes client.name hold exactly caps (none: a new user with no
// caps at all) and returns its adminID/adminKey; temporary users are removed
// when t ends.
func cephUser(t testing.TB, name string, temporary bool, caps ...string) map[string]string {
	t.Helper()
	if out, err := cephCLI("auth", "get-or-create-key", "client."+name); err != nil {
		t.Fatalf("creating client.%s: %v: %s", name, err, out)
	}
	if temporary {
		t.Cleanup(func() { cephCLI("auth", "rm", "client."+name) })
	}
	if len(caps) > 0 {
		setCaps(t, name, caps...)
	}
	key, err := cephCLI("auth", "get-key", "client."+name)
	if err != nil {
		t.Fatalf("key of client.%s: %v: %s", name, err, key)
	}
	return map[string]string{"adminID": name, "adminKey": strings.TrimSpace(key)}
}

// setCaps replaces the caps of client.name.
func setCaps(t testing.TB, name string, caps ...string) {
	t.Helper()
	if out, err := cephCLI(append([]string{"auth", "caps", "client." + name}, caps...)...); err != nil {
		t.Fatalf("setting the caps of client.%s: %v: %s", name, err, out)
	}
}

// madeByFastPath says whether subvolume name's base directory holds the
// libcephfs path's create lock file (the mgr path makes none; a create
// retried on the fast path makes one too), read as client.admin through a
// libcephfs mount of its own.
func madeByFastPath(t testing.TB, name string) bool {
	t.Helper()
	m, err := gocephfs.CreateFromRados(adminConn)
	if err == nil {
		err = m.SelectFilesystem(env["ROOKZMQ_CEPH_FS_NAME"])
	}
	if err == nil {
		err = m.Mount()
	}
	if err != nil {
		t.Fatal(err)
	}
	defer func() { m.Unmount(); m.Release() }()
	base := "/volumes/" + env["ROOKZMQ_CEPH_SUBVOLUMEGROUP"] + "/" + name
	if _, err := m.Statx(base+"/.meta", gocephfs.StatxBasicStats, 0); err != nil {
		t.Fatalf("subvolume %s: %v", name, err)
	}
	_, err = m.Statx(base+"/.rookzmq-create.lock", gocephfs.StatxBasicStats, 0)
	return err == nil
}

// logCount counts the lines of d's log that contain s.
func logCount(t testing.TB, d *driver, s string) int {
	t.Helper()
	b, err := os.ReadFile(d.log)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), s)
}
