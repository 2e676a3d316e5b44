package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cgroupOf reads /proc/PID/cgroup as hierarchy -> path.
func cgroupOf(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		m[f[1]] = f[2]
	}
	return m
}

func inCgroupEverywhere(t *testing.T, pid int, name string) bool {
	t.Helper()
	for h, p := range cgroupOf(t, pid) {
		if p != "/"+name {
			t.Logf("daemon %d: hierarchy %q: %s", pid, h, p)
			return false
		}
	}
	return true
}

// cgroupRoots lists the host's cgroup hierarchy roots (v1 and unified).
func cgroupRoots(t *testing.T) []string {
	t.Helper()
	var roots []string
	for _, e := range strings.Split(strings.TrimSpace(string(must(os.ReadFile("/proc/self/mountinfo")))), "\n") {
		f := strings.Fields(e)
		i := indexOf(f, "-")
		if i > 0 && (f[i+1] == "cgroup" || f[i+1] == "cgroup2") && f[3] == "/" {
			roots = append(roots, f[4])
		}
	}
	if len(roots) == 0 {
		t.Fatal("no cgroup mounts")
	}
	return roots
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func indexOf(f []string, s string) int {
	for i, x := range f {
		if x == s {
			return i
		}
	}
	return -1
}

// With --fuse-cgroup, the node plugin moves each rbd-fuse daemon into that
// cgroup in every hierarchy (out of its container's, which the runtime kills
// with the pod), and a restarted plugin moves one it finds elsewhere (started
// by a plugin that died before it could move it) before it serves.
func TestFuseDaemonCgroup(t *testing.T) {
	name := fmt.Sprintf("rookzmq-e2e-%d", time.Now().UnixNano()%1e9)
	roots := cgroupRoots(t)
	t.Cleanup(func() {
		for _, r := range roots {
			os.Remove(filepath.Join(r, name)) // empty by then
		}
	})
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil, "--fuse-cgroup="+name)
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("ext4", rwo))
	pid := fuseProcessPid(dir)
	if pid == 0 {
		t.Fatal("no rbd-fuse process")
	}
	if !inCgroupEverywhere(t, pid, name) {
		t.Fatalf("rbd-fuse %d is not in cgroup %s in every hierarchy", pid, name)
	}
	// As a daemon a plugin could not move: back to the root cgroups.
	d.kill()
	for _, r := range roots {
		if err := os.WriteFile(filepath.Join(r, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			t.Fatalf("moving %d back to %s: %v", pid, r, err)
		}
	}
	if inCgroupEverywhere(t, pid, name) {
		t.Fatal("rbd-fuse still in the cgroup after moving it out")
	}
	d = startDriver(t, dir, nil, "--fuse-cgroup="+name)
	waitReady(t, d)
	if !inCgroupEverywhere(t, pid, name) {
		t.Fatalf("the restarted plugin is ready, but rbd-fuse %d is not back in cgroup %s", pid, name)
	}
	log := string(must(os.ReadFile(d.log)))
	if !strings.Contains(log, fmt.Sprintf(`"staged volume kept" volumeID=%q mounter="rbd-fuse" pid=%d`, s.id, pid)) ||
		!strings.Contains(log, `"recovery of staged volumes done" volumes=1 repaired=0 failed=0 healthy=1`) {
		t.Fatalf("the restarted plugin did not report the staged volume healthy:\n%s", tail(d.log, 30))
	}
	if err := writeSync(filepath.Join(s.target, "after"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	unpublishUnstageDelete(t, d, s)
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

// The same for CephFS: each ceph-fuse goes into the cgroup at stage, and a
// restarted plugin moves one it finds elsewhere before it is ready.
func TestCephFuseDaemonCgroup(t *testing.T) {
	name := fmt.Sprintf("rookzmq-e2e-%d", time.Now().UnixNano()%1e9)
	roots := cgroupRoots(t)
	t.Cleanup(func() {
		for _, r := range roots {
			os.Remove(filepath.Join(r, name))
		}
	})
	ctrl := startCephFSDriver(t, newDriverDir(t), nil) // a killed controller's MDS session would hold caps
	dir := newDriverDir(t)
	d := startCephFSNode(t, dir, nil, "--controller=false", "--fuse-cgroup="+name)
	v := createCephFSVolume(t, ctrl, uniquePrefix(t), 1<<30)
	target := mountTarget(t)
	stageCephFS(t, d, v)
	publishCephFS(t, d, v, target, false)
	pid := cephFusePid(v.staging)
	if pid == 0 {
		t.Fatal("no ceph-fuse process")
	}
	if !inCgroupEverywhere(t, pid, name) {
		t.Fatalf("ceph-fuse %d is not in cgroup %s in every hierarchy", pid, name)
	}
	d.kill()
	for _, r := range roots {
		if err := os.WriteFile(filepath.Join(r, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			t.Fatalf("moving %d back to %s: %v", pid, r, err)
		}
	}
	if inCgroupEverywhere(t, pid, name) {
		t.Fatal("ceph-fuse still in the cgroup after moving it out")
	}
	d = startCephFSNode(t, dir, nil, "--controller=false", "--fuse-cgroup="+name)
	waitReady(t, d)
	if !inCgroupEverywhere(t, pid, name) {
		t.Fatalf("the restarted plugin is ready, but ceph-fuse %d is not back in cgroup %s", pid, name)
	}
	if !strings.Contains(string(must(os.ReadFile(d.log))), fmt.Sprintf(`"staged volume kept" volumeID=%q mounter="fuse" pid=%d`, v.id, pid)) {
		t.Fatalf("the restarted plugin did not report the staged volume kept:\n%s", tail(d.log, 30))
	}
	if err := writeSync(filepath.Join(target, "after"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	unpublishCephFS(t, d, v, target)
	unstageCephFS(t, d, v)
	deleteCephFS(t, ctrl, v)
	if left := cephfsLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

// A node plugin in a cgroup namespace of its own (containerd's default on
// cgroup v2) sees its cgroup as the root and may not move a process above it:
// it joins the host's cgroup namespace to move rbd-fuse. Here the driver runs
// under `unshare --cgroup` from a cgroup of its own, and the test process
// stands for the host's init (ROOKZMQ_HOST_CGROUPNS_PID).
func TestFuseDaemonCgroupFromOwnCgroupNamespace(t *testing.T) {
	name := fmt.Sprintf("rookzmq-e2e-%d", time.Now().UnixNano()%1e9)
	jail := name + "-plugin"
	roots := cgroupRoots(t)
	for _, r := range roots {
		if err := os.Mkdir(filepath.Join(r, jail), 0o755); err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(r, "/cpuset") {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				os.WriteFile(filepath.Join(r, jail, f), must(os.ReadFile(filepath.Join(r, f))), 0)
			}
		}
	}
	t.Cleanup(func() {
		for _, r := range roots {
			os.Remove(filepath.Join(r, name))
			os.Remove(filepath.Join(r, jail)) // empty once the driver is gone
		}
	})
	// The wrapper enters the plugin's cgroup in every hierarchy, then a new
	// cgroup namespace rooted there, then runs the driver.
	var enter strings.Builder
	for _, r := range roots {
		fmt.Fprintf(&enter, "echo $$ > %s/cgroup.procs && ", filepath.Join(r, jail))
	}
	wrapper := []string{"sh", "-c", enter.String() + `exec unshare --cgroup "$@"`, "wrap"}
	env := []string{fmt.Sprintf("%s=%d", "ROOKZMQ_HOST_CGROUPNS_PID", os.Getpid())}
	dir := newDriverDir(t)
	d := startDriverVia(t, dir, wrapper, env, "--fuse-cgroup="+name)
	own, _ := os.Readlink("/proc/self/ns/cgroup")
	theirs, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/cgroup", d.cmd.Process.Pid))
	if own == theirs || theirs == "" {
		t.Fatalf("the driver is not in a cgroup namespace of its own (%q, ours %q)", theirs, own)
	}
	s := createStagePublish(t, d, uniquePrefix(t), 64<<20, mountCap("ext4", rwo))
	pid := fuseProcessPid(dir)
	if pid == 0 {
		t.Fatal("no rbd-fuse process")
	}
	if !inCgroupEverywhere(t, pid, name) {
		t.Fatalf("rbd-fuse %d is not in cgroup %s in every hierarchy", pid, name)
	}
	unpublishUnstageDelete(t, d, s)
	if left := nodeLeftovers(dir); len(left) != 0 {
		t.Fatalf("left behind:\n%s", strings.Join(left, "\n"))
	}
}

// As PID 1 of a PID namespace of its own, whose members the kernel kills
// when it exits whatever their cgroup, the node plugin refuses --fuse-cgroup
// and says to run it in the host's.
func TestFuseCgroupRefusedAsPID1(t *testing.T) {
	out, err := exec.Command("unshare", "--pid", "--fork", binPath, "--node", "--nodeid", "n", "--registration-dir=",
		"--fuse-cgroup=rookzmq-e2e-x").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "PID 1 of its own PID namespace") || !strings.Contains(string(out), "hostPID") {
		t.Fatalf("--fuse-cgroup as PID 1: %v\n%s", err, out)
	}
}
