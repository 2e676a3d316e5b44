package csi

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeCgroups lays out a container's view of a hybrid host in plain
// directories: private mounts of its own cgroup (Root /kubepods/...) shadowed
// by the host's (Root /), as the chart's hostPath /sys gives.
func fakeCgroups(t *testing.T, hostView bool) (*DaemonCgroup, string) {
	t.Helper()
	dir := t.TempDir()
	own := "/kubepods/pod1/c1"
	var mi strings.Builder
	id := 100
	for _, h := range []struct{ name, fs, opts string }{
		{"cpuset", "cgroup", "rw,cpuset"}, {"memory", "cgroup", "rw,memory"},
		{"systemd", "cgroup", "rw,xattr,name=systemd"}, {"unified", "cgroup2", "rw"},
	} {
		mp := filepath.Join(dir, "sys/fs/cgroup", h.name)
		// The container's private mount shows its own cgroup as the root.
		fmt.Fprintf(&mi, "%d 1 0:%d %s %s rw - %s cgroup %s\n", id, id, own, mp, h.fs, h.opts)
		id++
		if hostView {
			fmt.Fprintf(&mi, "%d 1 0:%d / %s rw - %s cgroup %s\n", id, id-1, mp, h.fs, h.opts)
			id++
			if err := os.MkdirAll(filepath.Join(mp, own), 0o755); err != nil {
				t.Fatal(err)
			}
		} else if err := os.MkdirAll(mp, 0o755); err != nil {
			t.Fatal(err)
		}
		if h.name == "cpuset" {
			os.WriteFile(filepath.Join(mp, "cpuset.cpus"), []byte("0-1\n"), 0o644)
			os.WriteFile(filepath.Join(mp, "cpuset.mems"), []byte("0\n"), 0o644)
		}
	}
	mustWrite(t, filepath.Join(dir, "mountinfo"), mi.String())
	self := "5:cpuset:" + own + "\n4:memory:" + own + "\n1:name=systemd:" + own + "\n0::" + own + "\n"
	mustWrite(t, filepath.Join(dir, "self-cgroup"), self)
	return &DaemonCgroup{Name: "rookzmq-fuse", mountinfo: filepath.Join(dir, "mountinfo"),
		selfCgroup: filepath.Join(dir, "self-cgroup"), proc: filepath.Join(dir, "proc")}, dir
}

func mustWrite(t *testing.T, path, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDaemonCgroupAdopt(t *testing.T) {
	d, dir := fakeCgroups(t, true)
	// The kernel gives a new cpuset cgroup empty cpuset files.
	mustWrite(t, filepath.Join(dir, "sys/fs/cgroup/cpuset/rookzmq-fuse/cpuset.cpus"), "")
	mustWrite(t, filepath.Join(dir, "sys/fs/cgroup/cpuset/rookzmq-fuse/cpuset.mems"), "")
	if err := d.Adopt(4242); err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{"cpuset", "memory", "systemd", "unified"} {
		b, err := os.ReadFile(filepath.Join(dir, "sys/fs/cgroup", h, "rookzmq-fuse", "cgroup.procs"))
		if err != nil || string(b) != "4242" {
			t.Errorf("%s: cgroup.procs %q %v, want 4242", h, b, err)
		}
	}
	// It gets the root's CPUs and memory nodes (an empty cpuset refuses processes).
	for f, want := range map[string]string{"cpuset.cpus": "0-1\n", "cpuset.mems": "0\n"} {
		if b, _ := os.ReadFile(filepath.Join(dir, "sys/fs/cgroup/cpuset/rookzmq-fuse", f)); string(b) != want {
			t.Errorf("%s = %q, want %q", f, b, want)
		}
	}
	// Holds reads the process's own cgroup file.
	mustWrite(t, filepath.Join(dir, "proc/4242/cgroup"), "5:cpuset:/rookzmq-fuse\n4:memory:/rookzmq-fuse\n1:name=systemd:/rookzmq-fuse\n0::/rookzmq-fuse\n")
	mustWrite(t, filepath.Join(dir, "proc/4243/cgroup"), "5:cpuset:/rookzmq-fuse\n4:memory:/kubepods/pod1/c1\n1:name=systemd:/rookzmq-fuse\n0::/rookzmq-fuse\n")
	if ok, err := d.Holds(4242); !ok || err != nil {
		t.Errorf("Holds(4242) = %v %v, want true", ok, err)
	}
	if ok, err := d.Holds(4243); ok || err != nil {
		t.Errorf("Holds(4243) = %v %v, want false (memory is still the pod's)", ok, err)
	}
	if _, err := d.Holds(4244); err == nil {
		t.Error("Holds of a process that does not exist: no error")
	}
}

// Without the host's cgroup mounts (only the container's private ones), the
// move fails and says why, rather than moving into the container's own cgroup.
func TestDaemonCgroupContainerViewOnly(t *testing.T) {
	d, dir := fakeCgroups(t, false)
	err := d.Adopt(4242)
	if err == nil || !strings.Contains(err.Error(), "cgroup hierarchy cpuset") || !strings.Contains(err.Error(), "host's /sys/fs/cgroup") {
		t.Fatalf("Adopt with the container's view only: %v, want an error naming the hierarchy and the host's /sys/fs/cgroup", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "sys/fs/cgroup/cpuset/rookzmq-fuse")); err == nil {
		t.Fatal("a cgroup was made inside the container's own cgroup")
	}
}

func TestDaemonCgroupDisabledAndNames(t *testing.T) {
	var d *DaemonCgroup
	if d.Enabled() || d.Adopt(1) != nil {
		t.Fatal("a nil DaemonCgroup must do nothing")
	}
	for _, bad := range []string{".", "..", "a/b", "x\n", strings.Repeat("a", 101)} {
		if CheckDaemonCgroupName(bad) == nil {
			t.Errorf("CheckDaemonCgroupName(%q) accepted", bad)
		}
	}
	for _, good := range []string{"", "rookzmq-fuse", "rookzmq.slice"} {
		if err := CheckDaemonCgroupName(good); err != nil {
			t.Errorf("CheckDaemonCgroupName(%q): %v", good, err)
		}
	}
}
