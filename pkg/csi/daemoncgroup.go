package csi

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
)

// HostCgroupNSPidEnv names the environment variable that gives the PID whose
// cgroup namespace counts as the host's (default 1, the host's init, seen in
// the host PID namespace), so tests can run the driver in a cgroup namespace
// of its own. Unset in production.
const HostCgroupNSPidEnv = "ROOKZMQ_HOST_CGROUPNS_PID"

// DaemonCgroup moves the daemons that serve a node's mounts (rbd-fuse,
// ceph-fuse) into a
// cgroup of their own at the root of every cgroup hierarchy, out of the node
// plugin's container. When the node plugin's pod goes (deleted, restarted,
// upgraded), the container runtime and kubelet kill every process left in its
// container's and pod's cgroups; a FUSE server killed that way fails every
// I/O of the pods using its mount. With the node plugin in the host PID
// namespace, a daemon in this cgroup outlives the pod.
//
// A container in a cgroup namespace of its own (the default of containerd on
// cgroup v2) sees its own cgroup as the root and may not move a process out
// of it: the work is done on a thread that joined the host's cgroup namespace
// (that of PID 1 in the host PID namespace) for the purpose, and then ends.
type DaemonCgroup struct {
	// Name is the cgroup's directory under each hierarchy's root ("" disables).
	Name string

	// Where the process tables are read (tests): default /proc/self/mountinfo,
	// /proc/self/cgroup and /proc.
	mountinfo, selfCgroup, proc string
}

// Enabled says whether daemons are moved at all.
func (d *DaemonCgroup) Enabled() bool { return d != nil && d.Name != "" }

// CheckDaemonCgroupName accepts a cgroup name: one path element, no dots or slashes.
func CheckDaemonCgroupName(name string) error {
	if name == "" {
		return nil
	}
	if name == "." || name == ".." || strings.ContainsAny(name, "/\x00\n") || len(name) > 100 {
		return fmt.Errorf("cgroup name %q: want one directory name", name)
	}
	return nil
}

func (d *DaemonCgroup) paths() (mountinfo, self, proc string) {
	mountinfo, self, proc = d.mountinfo, d.selfCgroup, d.proc
	// This thread's views: cgroup paths and cgroup mounts' roots are shown
	// relative to the reading thread's cgroup namespace.
	if mountinfo == "" {
		mountinfo = "/proc/thread-self/mountinfo"
	}
	if self == "" {
		self = "/proc/thread-self/cgroup"
	}
	if proc == "" {
		proc = "/proc"
	}
	return
}

// hierarchy is one cgroup hierarchy as this process sees it.
type hierarchy struct {
	controllers string // "cpu,cpuacct", "name=systemd"; "" for cgroup v2
	root        string // where the hierarchy's root directory is mounted
}

// hierarchies finds, for every hierarchy in /proc/self/cgroup, a mount that
// shows its root: one whose Root is "/" and under which this process's own
// cgroup exists. A container's private cgroup mounts show only its own
// cgroup; the node plugin needs the host's (the chart mounts the host's /sys).
func (d *DaemonCgroup) hierarchies() ([]hierarchy, error) {
	mi, self, _ := d.paths()
	infos, err := mount.ParseMountInfo(mi)
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	own, err := readCgroupFile(self)
	if err != nil {
		return nil, err
	}
	var out []hierarchy
	for _, c := range own {
		var found string
		for _, m := range infos {
			if m.Root != "/" || !cgroupMountOf(m, c.controllers) {
				continue
			}
			if fi, err := os.Stat(filepath.Join(m.MountPoint, c.path)); err == nil && fi.IsDir() {
				found = m.MountPoint
				break
			}
		}
		if found == "" {
			what := "cgroup v2"
			if c.controllers != "" {
				what = "cgroup hierarchy " + c.controllers
			}
			return nil, fmt.Errorf("no mount of %s shows its root (only the container's own cgroup is mounted?): "+
				"the node plugin needs the host's /sys/fs/cgroup", what)
		}
		out = append(out, hierarchy{controllers: c.controllers, root: found})
	}
	return out, nil
}

// cgroupMountOf says whether m mounts the hierarchy of the given controllers.
func cgroupMountOf(m mount.MountInfo, controllers string) bool {
	if controllers == "" {
		return m.FsType == "cgroup2"
	}
	if m.FsType != "cgroup" {
		return false
	}
	for _, c := range strings.Split(controllers, ",") {
		if !slices.Contains(m.SuperOptions, c) {
			return false
		}
	}
	return true
}

type cgroupLine struct{ controllers, path string }

// readCgroupFile parses /proc/PID/cgroup ("ID:controllers:path" lines).
func readCgroupFile(path string) ([]cgroupLine, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	var out []cgroupLine
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.SplitN(sc.Text(), ":", 3)
		if len(f) != 3 {
			continue
		}
		// f[1] == "": cgroup v2, alone or as the unified hierarchy of a
		// hybrid host (runc puts containers in it too).
		out = append(out, cgroupLine{f[1], f[2]})
	}
	return out, nil
}

// onHostThread runs f on a thread of its own in the host's cgroup namespace
// (joined if this process is in another); the thread ends with f.
func (d *DaemonCgroup) onHostThread(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the goroutine's end takes the thread, and its
		// cgroup namespace, along.
		runtime.LockOSThread()
		if d.mountinfo == "" { // not a test's fake tree
			if err := joinHostCgroupNS(); err != nil {
				errc <- err
				return
			}
		}
		errc <- f()
	}()
	return <-errc
}

// joinHostCgroupNS moves the calling (locked) thread into the cgroup
// namespace of the host's PID 1 if it is in another one. A PID 1 whose
// namespace cannot be read (not the host's init, or one that hides it) leaves
// the thread where it is: the caller's checks then tell whether the host's
// cgroups are reachable from there.
func joinHostCgroupNS() error {
	hostPid := "1"
	if p := os.Getenv(HostCgroupNSPidEnv); p != "" {
		hostPid = p
	}
	host, err := os.Readlink("/proc/" + hostPid + "/ns/cgroup")
	if err != nil {
		return nil
	}
	own, err := os.Readlink("/proc/thread-self/ns/cgroup")
	if err != nil || own == host {
		return nil
	}
	f, err := os.Open("/proc/" + hostPid + "/ns/cgroup")
	if err != nil {
		return fmt.Errorf("opening the host's cgroup namespace: %w", err)
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWCGROUP); err != nil {
		return fmt.Errorf("joining the host's cgroup namespace: %w", err)
	}
	return nil
}

// Adopt moves pid, with all its threads, into the cgroup in every hierarchy;
// a hierarchy it cannot reach or write is an error naming it.
func (d *DaemonCgroup) Adopt(pid int) error {
	if !d.Enabled() {
		return nil
	}
	return d.onHostThread(func() error { return d.adopt(pid) })
}

func (d *DaemonCgroup) adopt(pid int) error {
	hs, err := d.hierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		dir := filepath.Join(h.root, d.Name)
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("creating cgroup %s: %w", dir, err)
		}
		if slices.Contains(strings.Split(h.controllers, ","), "cpuset") {
			// A new cpuset cgroup has no CPUs or memory nodes: take the root's.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				cur, err := os.ReadFile(filepath.Join(dir, f))
				if err == nil && len(bytes.TrimSpace(cur)) == 0 {
					v, err := os.ReadFile(filepath.Join(h.root, f))
					if err != nil {
						return fmt.Errorf("reading %s: %w", filepath.Join(h.root, f), err)
					}
					if err := os.WriteFile(filepath.Join(dir, f), v, 0); err != nil {
						return fmt.Errorf("setting %s: %w", filepath.Join(dir, f), err)
					}
				}
			}
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("moving process %d into cgroup %s: %w", pid, dir, err)
		}
	}
	return nil
}

// Keep makes sure the daemon pid, which serves what (for messages), is in the
// cgroup, moving it there if it is not; nothing when d is not Enabled. A
// daemon that stays in the node plugin's cgroup would die with its pod and
// fail its volume's I/O: that is FailedPrecondition, not a volume to serve.
func (d *DaemonCgroup) Keep(pid int, what string) error {
	if !d.Enabled() {
		return nil
	}
	if pid <= 0 {
		return Coded(codes.Internal, "no daemon process serves %s", what)
	}
	if ok, err := d.Holds(pid); err == nil && ok {
		return nil
	}
	if err := d.Adopt(pid); err != nil {
		return Coded(codes.FailedPrecondition, "daemon %d of %s would not outlive the node plugin: %v", pid, what, err)
	}
	klog.V(3).InfoS("daemon moved out of the node plugin's cgroup", "pid", pid, "serves", what, "cgroup", d.Name)
	return nil
}

// Holds reports whether pid is in the cgroup in every hierarchy it belongs to.
func (d *DaemonCgroup) Holds(pid int) (bool, error) {
	if !d.Enabled() {
		return false, nil
	}
	var held bool
	err := d.onHostThread(func() (err error) {
		held, err = d.holds(pid)
		return err
	})
	return held, err
}

func (d *DaemonCgroup) holds(pid int) (bool, error) {
	_, _, proc := d.paths()
	lines, err := readCgroupFile(filepath.Join(proc, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return false, err
	}
	for _, l := range lines {
		if l.path != "/"+d.Name {
			return false, nil
		}
	}
	return len(lines) > 0, nil
}
