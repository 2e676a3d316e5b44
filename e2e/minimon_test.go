package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// miniMon is a throwaway cluster of one monitor and no OSD, of this test's
// own (the shared cluster's monitor is never stopped).
type miniMon struct {
	dir, conf, keyring, addr, key string
	cmd                           *exec.Cmd
}

func startMiniMon(t *testing.T) *miniMon {
	t.Helper()
	m := &miniMon{dir: t.TempDir(), addr: closedPort(t)}
	m.conf, m.keyring = filepath.Join(m.dir, "ceph.conf"), filepath.Join(m.dir, "admin.keyring")
	conf := fmt.Sprintf(`[global]
fsid = %s
mon host = v1:%s
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = %[3]s
admin socket =
log file = %[3]s/$name.log
keyring = %[3]s/admin.keyring
mon data = %[3]s/mon
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
mon allow pool size one = true
`, uuid.NewString(), m.addr, m.dir)
	if err := os.WriteFile(m.conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	monKeyring := filepath.Join(m.dir, "mon.keyring")
	for _, args := range [][]string{
		{"ceph-authtool", "--create-keyring", monKeyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"},
		{"ceph-authtool", "--create-keyring", m.keyring, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"},
		{"ceph-authtool", monKeyring, "--import-keyring", m.keyring},
		{"monmaptool", "--create", "--fsid", strings.TrimSpace(strings.Split(strings.Split(conf, "fsid = ")[1], "\n")[0]), "--addv", "a", "[v1:" + m.addr + "]", filepath.Join(m.dir, "monmap")},
		{"ceph-mon", "--conf", m.conf, "--mkfs", "-i", "a", "--monmap", filepath.Join(m.dir, "monmap"), "--keyring", monKeyring},
	} {
		if out, err := m.command(args...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	m.cmd = m.command("ceph-mon", "--conf", m.conf, "-i", "a", "-f")
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.stop)
	out, err := m.command("ceph-authtool", m.keyring, "-n", "client.admin", "-p").Output()
	if err != nil {
		t.Fatal(err)
	}
	m.key = strings.TrimSpace(string(out))
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err := m.command("timeout", "10", "ceph", "--conf", m.conf, "-n", "client.admin", "--keyring", m.keyring,
			"osd", "pool", "create", "rbd", "8").CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the throwaway monitor never answered: %v\n%s", err, out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	return m
}

// command runs a Ceph tool that sees only this cluster's configuration.
func (m *miniMon) command(args ...string) *exec.Cmd {
	cmd := exec.Command(args[0], args[1:]...)
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "CEPH_") {
			cmd.Env = append(cmd.Env, e)
		}
	}
	return cmd
}

func (m *miniMon) stop() {
	if m.cmd != nil && m.cmd.ProcessState == nil {
		m.cmd.Process.Kill()
		m.cmd.Wait()
	}
}

// A cluster whose monitor answers but that has no OSD, and then one whose
// monitor stopped under the driver's cached connection: every call answers
// Unavailable naming the monitor before its deadline, and the driver still
// stops promptly.
func TestStoppedMonitor(t *testing.T) {
	m := startMiniMon(t)
	dir := t.TempDir()
	cfg := fmt.Sprintf(`[{"clusterID":"mini","monitors":[%q]}]`, m.addr)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	d := startDriver(t, dir, nil, "--node=false")
	sec := map[string]string{"userID": "admin", "userKey": m.key}
	prefix := uniquePrefix(t)
	check := func(what string, deadline time.Duration, call func(ctx context.Context) error) time.Duration {
		t.Helper()
		c, cancel := context.WithTimeout(context.Background(), deadline)
		defer cancel()
		start := time.Now()
		err := call(c)
		took := time.Since(start)
		defer func() { t.Logf("%s: %v after %s", what, err, took) }()
		if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), m.addr) {
			t.Errorf("%s: %v after %s, want Unavailable naming monitor %s", what, err, took, m.addr)
		}
		if took >= deadline {
			t.Errorf("%s answered after %s, its deadline was %s", what, took, deadline)
		}
		return took
	}
	// Each call names its own volume: a call that answered at its deadline
	// keeps its volume's lock until Ceph gives up (a retry gets Aborted).
	create := func(name string) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			r := createReq(prefix+name, prefix, 64<<20)
			r.Parameters["clusterID"], r.Secrets = "mini", sec
			_, err := d.ctrl.CreateVolume(ctx, r)
			return err
		}
	}
	del := func(name string) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			id := fmt.Sprintf("1-04-mini-03-rbd-00--%s%s", prefix, name)
			_, err := d.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: sec})
			return err
		}
	}
	check("CreateVolume, no OSD", 4*time.Second, create("a"))
	check("DeleteVolume, no OSD", 3*time.Second, del("a"))
	m.stop()
	check("CreateVolume, monitor stopped", 4*time.Second, create("b"))
	check("DeleteVolume, monitor stopped", 3*time.Second, del("b"))
	// Longer than the driver's Ceph operation timeout: Ceph gives up first.
	if took := check("CreateVolume, monitor stopped, long deadline", 20*time.Second, create("c")); took > 15*time.Second {
		t.Errorf("Ceph's operation timeout (10 s) did not end the call: it took %s", took)
	}
	start := time.Now()
	d.stop()
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the driver took %s to stop", took)
	}
}
