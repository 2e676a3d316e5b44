// Package e2e runs the real driver binary against the throwaway Ceph cluster
// (e2e/ceph/cluster.sh up) and checks what it did with an independent admin
// connection.
package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

var (
	env     = map[string]string{} // the cluster's exports
	binPath string
	admin   *rados.IOContext // pool rbd, as client.admin
	// adminConn is admin's connection, for monitor and mgr commands.
	adminConn *rados.Conn
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	out, err := exec.Command("bash", "-c", `eval "$(./ceph/cluster.sh env)" && env`).Output()
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: the throwaway cluster is not up (make cluster-up): %v\n", err)
		return 1
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && (strings.HasPrefix(k, "ROOKZMQ_") || strings.HasPrefix(k, "CEPH_")) {
			env[k] = v
		}
	}
	binPath = os.Getenv("ROOKZMQ_BIN")
	if binPath == "" {
		binPath, _ = filepath.Abs("../bin/rookzmq")
	}
	if _, err := os.Stat(binPath); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: driver binary %s missing (make build): %v\n", binPath, err)
		return 1
	}
	conn, err := rados.NewConnWithUser("admin")
	if err == nil {
		conn.SetConfigOption("mon_host", env["ROOKZMQ_CEPH_MONITORS"])
		conn.SetConfigOption("key", env["ROOKZMQ_CEPH_ADMIN_KEY"])
		conn.SetConfigOption("admin_socket", "")
		err = conn.Connect()
	}
	if err == nil {
		admin, err = conn.OpenIOContext("rbd")
		adminConn = conn
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: admin connection: %v\n", err)
		return 1
	}
	defer conn.Shutdown()
	return m.Run()
}

// driver is one running rookzmq process.
type driver struct {
	t     testing.TB
	dir   string
	sock  string
	log   string
	cmd   *exec.Cmd
	conn  *grpc.ClientConn
	ctrl  csi.ControllerClient
	node  csi.NodeClient
	ident csi.IdentityClient
	// podEvents is the events.rookzmq.io node service (per-pod endpoints).
	podEvents csi.NodeClient
}

// newDriverDir makes a work directory with a clusters file.
func newDriverDir(t testing.TB) string {
	dir := t.TempDir()
	cfg := fmt.Sprintf(`[{"clusterID":"c1","monitors":[%q],"rbd":{"radosNamespace":""}}]`, env["ROOKZMQ_CEPH_MONITORS"])
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

// startDriver runs the binary (controller + node, rbd-fuse) in dir with extra
// environment and flags, and connects to it.
func startDriver(t testing.TB, dir string, extraEnv []string, flags ...string) *driver {
	t.Helper()
	return startDriverVia(t, dir, nil, extraEnv, flags...)
}

// startDriverVia is startDriver with the binary run by a wrapper command
// (e.g. unshare), which must exec it with the arguments that follow.
func startDriverVia(t testing.TB, dir string, wrapper []string, extraEnv []string, flags ...string) *driver {
	t.Helper()
	d := &driver{t: t, dir: dir, sock: filepath.Join(dir, "csi.sock"), log: filepath.Join(dir, "driver.log")}
	os.Remove(d.sock)
	args := append([]string{"--controller", "--node", "--registration-dir=", "--endpoint", "unix://" + d.sock, "--nodeid", "e2e-node",
		"--clusters", filepath.Join(dir, "config.json"), "--default-mounter", "rbd-fuse",
		"--statedir", filepath.Join(dir, "state"), "--events-dir", filepath.Join(dir, "events"),
		"--events-heartbeat", "200ms", "--events-endpoint", "unix://" + filepath.Join(dir, "events-csi.sock"), "-v=4",
		// Tests that kill a FUSE daemon check what follows; those of the
		// repair loop turn it on.
		"--repair-interval=0"}, flags...)
	logf, err := os.OpenFile(d.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	argv := append(append(append([]string{}, wrapper...), binPath), args...)
	d.cmd = exec.Command(argv[0], argv[1:]...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	d.cmd.Env = append(os.Environ(), extraEnv...)
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	exited := make(chan struct{})
	go func() { d.cmd.Wait(); close(exited) }()
	for i := 0; ; i++ {
		// The socket file exists from bind(2) on, a moment before listen(2):
		// wait until a connection is accepted, not for the file.
		if c, err := net.Dial("unix", d.sock); err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			t.Fatalf("driver exited at start:\n%s", tail(d.log, 20))
		case <-time.After(50 * time.Millisecond):
		}
		if i > 200 {
			t.Fatalf("driver made no socket in 10s:\n%s", tail(d.log, 20))
		}
	}
	d.conn, err = grpc.NewClient("unix://"+d.sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	d.ctrl, d.node, d.ident = csi.NewControllerClient(d.conn), csi.NewNodeClient(d.conn), csi.NewIdentityClient(d.conn)
	evConn, err := grpc.NewClient("unix://"+filepath.Join(dir, "events-csi.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	d.podEvents = csi.NewNodeClient(evConn)
	t.Cleanup(func() { evConn.Close() })
	t.Cleanup(func() { d.stop() })
	return d
}

// kill SIGKILLs the driver and waits for it to go.
func (d *driver) kill() {
	if d.cmd.ProcessState == nil && d.cmd.Process != nil {
		d.cmd.Process.Signal(syscall.SIGKILL)
		for d.alive() {
			time.Sleep(10 * time.Millisecond)
		}
	}
	d.conn.Close()
}

func (d *driver) alive() bool {
	return d.cmd.Process.Signal(syscall.Signal(0)) == nil && !zombie(d.cmd.Process.Pid)
}

func (d *driver) stop() {
	if d.alive() {
		d.cmd.Process.Signal(syscall.SIGTERM)
		deadline := time.Now().Add(15 * time.Second)
		for d.alive() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if d.alive() {
			d.t.Errorf("driver did not stop within 15s of SIGTERM")
			d.cmd.Process.Kill()
		}
	}
	d.conn.Close()
}

func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] == 'Z'
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return c
}

// secrets are the restricted csi-rbd user's.
func secrets() map[string]string {
	return map[string]string{"userID": env["ROOKZMQ_CEPH_RBD_USER"], "userKey": env["ROOKZMQ_CEPH_RBD_KEY"]}
}

func params(extra ...string) map[string]string {
	p := map[string]string{"clusterID": "c1", "pool": "rbd", "mounter": "rbd-fuse"}
	for i := 0; i+1 < len(extra); i += 2 {
		p[extra[i]] = extra[i+1]
	}
	return p
}

func mountCap(fs string, mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

func blockCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

var rwo = csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER

// images lists the pool's images with the given name prefix.
func images(t *testing.T, prefix string) []string {
	t.Helper()
	names, err := rbd.GetImageNames(admin)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, n := range names {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	return out
}

// journal returns the journal's keys that mention s.
func journal(t *testing.T, s string) []string {
	t.Helper()
	vals, err := admin.GetAllOmapValues("rookzmq.volumes", "", "", 1000)
	if err != nil && !strings.Contains(err.Error(), "No such file") {
		t.Fatal(err)
	}
	var out []string
	for k, v := range vals {
		if strings.Contains(k, s) || strings.Contains(string(v), s) {
			out = append(out, k)
		}
	}
	return out
}

// uniquePrefix gives each test its own image name prefix.
func uniquePrefix(t *testing.T) string {
	return fmt.Sprintf("e2e-%d-", time.Now().UnixNano()%1e9)
}

// trashed lists the pool's trash entries whose image name has prefix.
func trashed(t testing.TB, prefix string) []string {
	t.Helper()
	entries, err := rbd.GetTrashList(admin)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name, prefix) {
			out = append(out, e.Name+" (id "+e.Id+")")
		}
	}
	return out
}

// assertNoOrphans fails t if any image, trash entry or journal entry with
// prefix is left. The driver hands deleted images to the mgr, and the mgr
// purges them from the trash, in the background: that gets a minute.
func assertNoOrphans(t *testing.T, prefix string) {
	t.Helper()
	if got := images(t, prefix); len(got) != 0 {
		t.Errorf("orphan images: %v", got)
	}
	deadline := time.Now().Add(time.Minute)
	for (len(trashed(t, prefix)) != 0 || len(journal(t, prefix)) != 0) && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	if got := trashed(t, prefix); len(got) != 0 {
		t.Errorf("orphan trash entries a minute after the deletes: %v", got)
	}
	if keys := journal(t, prefix); len(keys) != 0 {
		t.Errorf("orphan journal entries: %v", keys)
	}
}

// deleteEventually deletes a volume, retrying while Ceph still sees a killed
// client's watch on the image ("in use": FailedPrecondition, which a CO retries).
func deleteEventually(t *testing.T, d *driver, id string) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		_, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()})
		if err == nil {
			return
		}
		if status.Code(err) != codes.FailedPrecondition || time.Now().After(deadline) {
			t.Fatalf("delete: %v", err)
		}
		time.Sleep(time.Second)
	}
}
