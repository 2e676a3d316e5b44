package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	gocephfs "github.com/ceph/go-ceph/cephfs"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/rookzmq/rookzmq/pkg/cephfs"
	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// These tests drive pkg/cephfs's mounters in-process (the node service that
// will call them is not there yet) against the throwaway cluster, as the
// restricted client.csi-cephfs user.

// newSubvolume creates a subvolume through the mgr and returns its path; it
// is removed at the end of the test.
func newSubvolume(t testing.TB, name string) string {
	t.Helper()
	subvolumeCLI(t, "create", name, "--size", strconv.Itoa(1<<30))
	t.Cleanup(func() {
		cephCLI("fs", "subvolume", "rm", env["ROOKZMQ_CEPH_FS_NAME"], name, "--group_name", env["ROOKZMQ_CEPH_SUBVOLUMEGROUP"], "--force")
	})
	return strings.TrimSpace(subvolumeCLI(t, "getpath", name))
}

func userSpec(path string) cephfs.MountSpec {
	return cephfs.MountSpec{Monitors: []string{env["ROOKZMQ_CEPH_MONITORS"]}, FsName: env["ROOKZMQ_CEPH_FS_NAME"], Path: path,
		Creds: rcsi.Credentials{ID: env["ROOKZMQ_CEPH_CEPHFS_USER"], Key: env["ROOKZMQ_CEPH_CEPHFS_KEY"]}}
}

func fuseMounter(t testing.TB) cephfs.Mounter {
	m, err := cephfs.NewMounter(cephfs.MounterFuse)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Available(); err != nil {
		t.Fatal(err)
	}
	return m
}

// mountTarget is a fresh directory to mount at; whatever is mounted there at
// the end of the test is detached (and its ceph-fuse stopped).
func mountTarget(t testing.TB) string {
	target := filepath.Join(t.TempDir(), "mnt")
	t.Cleanup(func() {
		if pid := cephFusePid(target); pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		for i := 0; i < 8 && unix.Unmount(target, unix.MNT_DETACH) == nil; i++ {
		}
	})
	return target
}

// cephFusePid finds the ceph-fuse daemon serving target (0: none).
func cephFusePid(target string) int {
	matches, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range matches {
		b, _ := os.ReadFile(p)
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(args) > 1 && filepath.Base(args[0]) == "ceph-fuse" && args[len(args)-1] == target && !zombie(pidOf(p)) {
			return pidOf(p)
		}
	}
	return 0
}

// cephOut runs the ceph CLI as client.admin and returns its stdout alone.
func cephOut(t testing.TB, args ...string) []byte {
	t.Helper()
	cmd := exec.Command("ceph", append([]string{"--conf", env["CEPH_CONF"]}, args...)...)
	cmd.Env = append(os.Environ(), "CEPH_ARGS="+env["CEPH_ARGS"])
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("ceph %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// killFuse SIGKILLs pid, the ceph-fuse daemon of target, and evicts its MDS session
// (so that another client gets the caps it held at once, not after the
// session times out). The MDS then recovers the sizes of the files it was
// writing from the objects in RADOS: what the daemon had not written there is
// lost.
func killFuse(t testing.TB, target string, pid int) {
	t.Helper()
	syscall.Kill(pid, syscall.SIGKILL)
	for deadline := time.Now().Add(10 * time.Second); !zombie(pid); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("ceph-fuse %d alive 10 s after SIGKILL", pid)
		}
	}
	evictSession(t, target, pid)
}

// evictSession evicts the MDS session of the (dead) ceph-fuse pid that served target.
func evictSession(t testing.TB, target string, pid int) {
	t.Helper()
	mds := "mds." + env["ROOKZMQ_CEPH_FS_NAME"] + ":0"
	var sessions []struct {
		ID       int64          `json:"id"`
		Metadata map[string]any `json:"client_metadata"`
	}
	if err := json.Unmarshal(cephOut(t, "tell", mds, "session", "ls", "--format=json"), &sessions); err != nil {
		t.Fatal(err)
	}
	for _, s := range sessions {
		if s.Metadata["pid"] == strconv.Itoa(pid) && s.Metadata["mount_point"] == target {
			cephOut(t, "tell", mds, "client", "evict", "id="+strconv.FormatInt(s.ID, 10))
			return
		}
	}
	t.Fatalf("no MDS session of ceph-fuse %d", pid)
}

// readBack reads a file through a new libcephfs client of its own (as
// client.admin): its size and content.
func readBack(t testing.TB, path string) (int64, []byte) {
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
	st, err := m.Statx(path, gocephfs.StatxBasicStats, 0)
	if err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	f, err := m.Open(path, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, st.Size+1)
	n := 0
	for n < len(buf) {
		k, err := f.Read(buf[n:])
		n += k
		if k == 0 || err != nil {
			break
		}
	}
	return int64(st.Size), buf[:n]
}

func pattern(tag string, n int) []byte {
	b := bytes.Repeat([]byte(tag+"/0123456789abcdef/"), n/(len(tag)+18)+1)
	return b[:n]
}

// writes are what a workload did through a mount: files written and closed,
// one still open, one nested, one through a shared mapping; all without fsync.
type writes struct {
	files map[string][]byte
	open  []*os.File
	maps  [][]byte
}

func writeWorkload(t *testing.T, dir, tag string) *writes {
	t.Helper()
	w := &writes{files: map[string][]byte{
		tag + "-closed":                 pattern(tag+"-closed", 1<<20+3),
		tag + "-open":                   pattern(tag+"-open", 777<<10+5),
		"sub/" + tag + "/deeper/nested": pattern(tag+"-nested", 300<<10+1),
		tag + "-mmap":                   pattern(tag+"-mmap", 256<<10),
		// Big enough that writing it to the OSDs takes longer than the
		// moment between Flush's return and the SIGKILL, small enough
		// (with the rest, under client_oc_target_dirty, 8 MiB) that
		// ceph-fuse does not start writing it back on its own.
		tag + "-big": pattern(tag+"-big", 5<<20+7),
	}}
	for name, data := range w.files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case strings.HasSuffix(name, "-mmap"):
			if err := f.Truncate(int64(len(data))); err != nil {
				t.Fatal(err)
			}
			mem, err := unix.Mmap(int(f.Fd()), 0, len(data), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err != nil {
				t.Fatal(err)
			}
			copy(mem, data) // no msync
			w.maps = append(w.maps, mem)
			f.Close()
		default:
			if _, err := f.Write(data); err != nil {
				t.Fatal(err)
			}
			if strings.HasSuffix(name, "-open") {
				w.open = append(w.open, f)
			} else {
				f.Close()
			}
		}
	}
	return w
}

func (w *writes) release() {
	for _, f := range w.open {
		f.Close()
	}
	for _, m := range w.maps {
		unix.Munmap(m)
	}
}

// lost reads every file back through another client and lists those whose
// size or content differs from what was written.
func (w *writes) lost(t *testing.T, subvolumePath string) []string {
	t.Helper()
	var out []string
	for name, data := range w.files {
		size, got := readBack(t, subvolumePath+"/"+name)
		if size != int64(len(data)) || !bytes.Equal(got, data) {
			out = append(out, fmt.Sprintf("%s (size %d, want %d; content equal: %v)", name, size, len(data), bytes.Equal(got, data)))
		}
	}
	return out
}

// Flush -> durable: what a workload wrote through ceph-fuse without fsync is
// read back, size and content, through another client after the ceph-fuse
// daemon was SIGKILLed right after Flush returned. The control round, the
// same writes and kill without Flush, must lose data, or the test proves
// nothing.
func TestCephFuseFlushMakesWritesDurable(t *testing.T) {
	path := newSubvolume(t, fmt.Sprintf("e2e-flush-%d", time.Now().UnixNano()%1e9))
	m := fuseMounter(t)
	target := mountTarget(t)
	c := ctx(t)
	if err := m.Mount(c, target, userSpec(path)); err != nil {
		t.Fatal(err)
	}
	pid := cephFusePid(target)
	control := writeWorkload(t, target, "control")
	killFuse(t, target, pid)
	control.release()
	lost := control.lost(t, path)
	if len(lost) == 0 {
		t.Fatal("control: every write reached RADOS without a flush, so the flush proves nothing")
	}
	t.Logf("control (no flush, ceph-fuse killed): lost %s", strings.Join(lost, "; "))

	// The dead mount is replaced by the next Mount.
	if err := m.Mount(c, target, userSpec(path)); err != nil {
		t.Fatalf("mount over the dead mount: %v", err)
	}
	pid = cephFusePid(target)
	w := writeWorkload(t, target, "flushed")
	start := time.Now()
	err := m.Flush(c, target)
	syscall.Kill(pid, syscall.SIGKILL) // at once: nothing ceph-fuse does after Flush returns may count
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("flush took %s", time.Since(start))
	killFuse(t, target, pid)
	w.release()
	if lost := w.lost(t, path); len(lost) != 0 {
		t.Fatalf("lost after Flush and a SIGKILL of ceph-fuse: %s", strings.Join(lost, "; "))
	}
	if err := m.Unmount(c, target); err != nil {
		t.Fatalf("unmount of the dead mount: %v", err)
	}
}

// syncBuffer is a bytes.Buffer safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// captureKlog sends klog's output, at -v=10, to a buffer until the test ends.
func captureKlog(t *testing.T) *syncBuffer {
	var fs flag.FlagSet
	klog.InitFlags(&fs)
	buf := &syncBuffer{}
	fs.Set("v", "10")
	fs.Set("logtostderr", "false")
	fs.Set("alsologtostderr", "false")
	fs.Set("stderrthreshold", "FATAL")
	klog.SetOutput(buf)
	t.Cleanup(func() {
		klog.Flush()
		fs.Set("v", "0")
		fs.Set("logtostderr", "true")
		klog.SetOutput(os.Stderr)
	})
	return buf
}

// keyExposures lists every place outside this process's memory where the key
// shows: a command line or environment of this test's children or of any
// ceph-fuse, a file on disk that a ceph-fuse holds open, a Ceph log.
func keyExposures(key string) []string {
	var out []string
	matches, _ := filepath.Glob("/proc/[0-9]*")
	self := strconv.Itoa(os.Getpid())
	for _, p := range matches {
		cmd, _ := os.ReadFile(p + "/cmdline")
		args := strings.Split(string(cmd), "\x00")
		status, _ := os.ReadFile(p + "/status")
		ours := strings.Contains(string(status), "\nPPid:\t"+self+"\n")
		fuse := filepath.Base(args[0]) == "ceph-fuse"
		if !ours && !fuse && !strings.Contains(string(cmd), key) {
			continue
		}
		if strings.Contains(string(cmd), key) {
			out = append(out, p+"/cmdline: "+strings.ReplaceAll(string(cmd), "\x00", " "))
		}
		if envb, _ := os.ReadFile(p + "/environ"); strings.Contains(string(envb), key) {
			out = append(out, p+"/environ")
		}
		if fuse {
			fds, _ := filepath.Glob(p + "/fd/*")
			for _, fd := range fds {
				l, _ := os.Readlink(fd)
				if !strings.HasPrefix(l, "/") || strings.HasPrefix(l, "/dev/") || strings.HasPrefix(l, "/memfd:") {
					continue // pipes, sockets, devices (reading /dev/fuse would steal a request), the key's memfd
				}
				if fi, err := os.Stat(fd); err != nil || !fi.Mode().IsRegular() {
					continue
				}
				if b, err := os.ReadFile(fd); err == nil && bytes.Contains(b, []byte(key)) {
					out = append(out, fd+" -> "+l)
				}
			}
		}
	}
	logs, _ := filepath.Glob("/var/log/ceph/*")
	for _, l := range logs {
		if b, _ := os.ReadFile(l); bytes.Contains(b, []byte(key)) {
			out = append(out, l)
		}
	}
	return out
}

// A ceph-fuse mount of a subvolume: read and write, idempotent Mount and
// Unmount, a read-only mount, bad options, and the key nowhere but in memory.
func TestCephFuseMountLifecycle(t *testing.T) {
	logs := captureKlog(t)
	key := env["ROOKZMQ_CEPH_CEPHFS_KEY"]
	path := newSubvolume(t, fmt.Sprintf("e2e-mnt-%d", time.Now().UnixNano()%1e9))
	m := fuseMounter(t)
	target := mountTarget(t)
	c := ctx(t)

	// Watch for the key while Mount runs (the ceph-fuse that daemonizes is short-lived).
	stop := make(chan struct{})
	seen := make(chan []string, 1)
	go func() {
		var all []string
		for {
			all = append(all, keyExposures(key)...)
			select {
			case <-stop:
				seen <- all
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	err := m.Mount(c, target, userSpec(path))
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	if got := append(<-seen, keyExposures(key)...); len(got) != 0 {
		t.Fatalf("the key shows in:\n%s", strings.Join(got, "\n"))
	}
	pid := cephFusePid(target)
	if pid == 0 {
		t.Fatal("no ceph-fuse process")
	}
	if sid, _ := unix.Getsid(pid); sid == mustSid(0) {
		t.Errorf("ceph-fuse %d runs in the driver's session %d", pid, sid)
	}
	if err := m.Healthy(c, target); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	if err := os.WriteFile(filepath.Join(target, "hello"), []byte("through ceph-fuse"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "hello")); err != nil || string(b) != "through ceph-fuse" {
		t.Fatalf("read back %q %v", b, err)
	}

	// Mount again: nothing new. Another subvolume or options at the same target: refused.
	if err := m.Mount(c, target, userSpec(path)); err != nil {
		t.Fatalf("second Mount: %v", err)
	}
	if now := cephFusePid(target); now != pid {
		t.Fatalf("second Mount replaced ceph-fuse %d by %d", pid, now)
	}
	other := userSpec(path + "x")
	if err := m.Mount(c, target, other); status.Code(err) != codes.AlreadyExists {
		t.Errorf("Mount of another path at the same target: %v, want AlreadyExists", err)
	}
	opts := userSpec(path)
	opts.Options = "noatime,debug"
	if err := m.Mount(c, filepath.Join(t.TempDir(), "x"), opts); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "debug") {
		t.Errorf("Mount with option debug: %v, want InvalidArgument naming it", err)
	}
	bad := userSpec(path)
	bad.Creds.Key = "AQCcmWRnAAAAABAAwDE6xZcKpcKfmxMC8gPS6A=="
	if err := m.Mount(c, filepath.Join(t.TempDir(), "x"), bad); status.Code(err) != codes.PermissionDenied || strings.Contains(err.Error(), bad.Creds.Key) {
		t.Errorf("Mount with a wrong key: %v, want PermissionDenied without the key", err)
	}

	// Unmount: the daemon exits (after writing back its cache), twice is fine.
	if err := m.Unmount(c, target); err != nil {
		t.Fatal(err)
	}
	if zombie(pid) == false {
		t.Errorf("ceph-fuse %d still runs after Unmount", pid)
	}
	if size, b := readBack(t, path+"/hello"); size != 17 || string(b) != "through ceph-fuse" {
		t.Errorf("after unmount another client reads %d bytes %q", size, b)
	}
	if err := m.Unmount(c, target); err != nil {
		t.Fatalf("second Unmount: %v", err)
	}
	if err := m.Healthy(c, target); !cephfs.IsBroken(err) {
		t.Errorf("Healthy after Unmount: %v, want broken", err)
	}

	// Read-only.
	ro := userSpec(path)
	ro.ReadOnly, ro.Options = true, "noatime"
	if err := m.Mount(c, target, ro); err != nil {
		t.Fatal(err)
	}
	if opts := mountOptions(t, target); !strings.Contains(","+opts+",", ",ro,") || !strings.Contains(opts, "noatime") {
		t.Errorf("read-only mount with noatime has options %q", opts)
	}
	if err := os.WriteFile(filepath.Join(target, "nope"), nil, 0o644); !os.IsPermission(err) && !isErrno(err, syscall.EROFS) {
		t.Errorf("write on a read-only mount: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "hello")); err != nil || string(b) != "through ceph-fuse" {
		t.Errorf("read-only mount reads %q %v", b, err)
	}
	if err := m.Flush(c, target); err != nil {
		t.Errorf("Flush of a read-only mount: %v", err)
	}
	if err := m.Unmount(c, target); err != nil {
		t.Fatal(err)
	}

	out := logs.String()
	if !strings.Contains(out, "ceph-fuse mounted") {
		t.Fatalf("klog capture saw no mount:\n%s", out)
	}
	if strings.Contains(out, key) || strings.Contains(out, bad.Creds.Key) {
		t.Fatal("a key is in the log")
	}
}

// mountOptions are the per-mount options of the mount at target.
func mountOptions(t *testing.T, target string) string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 5 && f[4] == target {
			return f[5]
		}
	}
	return ""
}

func mustSid(pid int) int {
	sid, _ := unix.Getsid(pid)
	return sid
}

func isErrno(err error, e syscall.Errno) bool {
	pe, ok := err.(*os.PathError)
	return ok && pe.Err == e
}

// TestMountHelper is the child process of TestCephFuseSurvivesDriverKill: a
// "driver" that mounts and waits to be killed.
func TestMountHelper(t *testing.T) {
	target := os.Getenv("ROOKZMQ_E2E_MOUNT_TARGET")
	if target == "" {
		t.Skip("runs only as the child process of TestCephFuseSurvivesDriverKill")
	}
	m, _ := cephfs.NewMounter(cephfs.MounterFuse)
	if err := m.Mount(context.Background(), target, userSpec(os.Getenv("ROOKZMQ_E2E_MOUNT_PATH"))); err != nil {
		fmt.Println("mount failed:", err)
		os.Exit(1)
	}
	fmt.Println("mounted")
	select {}
}

// A driver process SIGKILLed with its whole process group leaves its
// ceph-fuse mounts serving, and a new process tells them healthy; a ceph-fuse
// SIGKILLed shows as broken at the next Healthy, and Mount replaces it.
func TestCephFuseSurvivesDriverKill(t *testing.T) {
	path := newSubvolume(t, fmt.Sprintf("e2e-survive-%d", time.Now().UnixNano()%1e9))
	target := mountTarget(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestMountHelper$", "-test.v")
	cmd.Env = append(os.Environ(), "ROOKZMQ_E2E_MOUNT_TARGET="+target, "ROOKZMQ_E2E_MOUNT_PATH="+path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	for mounted := false; !mounted; {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("the helper exited before mounting")
			}
			mounted = l == "mounted"
		case <-time.After(2 * time.Minute):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			t.Fatal("the helper did not mount in 2 minutes")
		}
	}
	pid := cephFusePid(target)
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // the driver and its process group
	cmd.Wait()

	// This process is the restarted driver: a new mounter, no memory of the mount.
	m := fuseMounter(t)
	c := ctx(t)
	if err := m.Healthy(c, target); err != nil {
		t.Fatalf("after the driver's SIGKILL: Healthy %v (ceph-fuse %d alive: %v)", err, pid, !zombie(pid))
	}
	if err := writeSync(filepath.Join(target, "after-kill"), []byte("written after the driver died")); err != nil {
		t.Fatal(err)
	}
	if err := m.Mount(c, target, userSpec(path)); err != nil || cephFusePid(target) != pid {
		t.Fatalf("Mount by the restarted driver: %v (ceph-fuse %d, was %d)", err, cephFusePid(target), pid)
	}

	// The daemon dies: Healthy says broken (positive evidence), promptly.
	syscall.Kill(pid, syscall.SIGKILL)
	start := time.Now()
	for {
		err := m.Healthy(c, target)
		if cephfs.IsBroken(err) {
			t.Logf("broken after %s: %v", time.Since(start).Round(time.Millisecond), err)
			break
		}
		if err != nil {
			t.Fatalf("Healthy could not tell: %v", err)
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("Healthy still reports a SIGKILLed ceph-fuse's mount healthy after 10 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := m.Flush(c, target); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("Flush of a dead mount: %v, want FailedPrecondition", err)
	}
	// Without this the new mount below would wait for the dead client's MDS
	// session to time out (60 s) before it could read what that client wrote.
	evictSession(t, target, pid)
	// Mount replaces the dead mount (the data was fsynced, so it is there).
	if err := m.Mount(c, target, userSpec(path)); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "after-kill")); err != nil || string(b) != "written after the driver died" {
		t.Fatalf("after remount: %q %v", b, err)
	}
	if err := m.Healthy(c, target); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(c, target); err != nil {
		t.Fatal(err)
	}
	if err := m.Unmount(c, target); err != nil {
		t.Fatal(err)
	}
}

// A ceph-fuse whose client the cluster evicted (blocklisted) still runs, but
// its mount is lost: Healthy says so, and Mount replaces it.
func TestCephFuseEvictedIsBroken(t *testing.T) {
	path := newSubvolume(t, fmt.Sprintf("e2e-evicted-%d", time.Now().UnixNano()%1e9))
	m := fuseMounter(t)
	target := mountTarget(t)
	c := ctx(t)
	if err := m.Mount(c, target, userSpec(path)); err != nil {
		t.Fatal(err)
	}
	if err := writeSync(filepath.Join(target, "kept"), []byte("before the eviction")); err != nil {
		t.Fatal(err)
	}
	pid := cephFusePid(target)
	evictSession(t, target, pid)
	err := m.Healthy(c, target)
	if !cephfs.IsBroken(err) {
		t.Fatalf("Healthy of an evicted client's mount: %v, want broken", err)
	}
	t.Logf("evicted: %v (ceph-fuse %d alive: %v)", err, pid, !zombie(pid))
	if err := m.Mount(c, target, userSpec(path)); err != nil {
		t.Fatal(err)
	}
	if !zombie(pid) || cephFusePid(target) == 0 {
		t.Fatalf("the evicted ceph-fuse %d still runs, or no new one serves the mount", pid)
	}
	if b, err := os.ReadFile(filepath.Join(target, "kept")); err != nil || string(b) != "before the eviction" {
		t.Fatalf("after remount: %q %v", b, err)
	}
	if err := m.Unmount(c, target); err != nil {
		t.Fatal(err)
	}
}

// The kernel mounter is real code, but this node's kernel has no CephFS
// client: it says so at once (FailedPrecondition naming the reason), never hangs.
func TestCephKernelMounterFailsFast(t *testing.T) {
	fsList, _ := os.ReadFile("/proc/filesystems")
	if strings.Contains(string(fsList), "\tceph\n") {
		t.Skip("this kernel has the CephFS client: nothing to refuse")
	}
	m, err := cephfs.NewMounter(cephfs.MounterKernel)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = m.Available()
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "modprobe ceph") {
		t.Fatalf("Available: %v, want FailedPrecondition naming modprobe's answer", err)
	}
	target := mountTarget(t)
	err = m.Mount(ctx(t), target, userSpec("/volumes/csi/none"))
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("Mount: %v, want FailedPrecondition", err)
	}
	if strings.Contains(err.Error(), env["ROOKZMQ_CEPH_CEPHFS_KEY"]) {
		t.Fatal("the key is in the error")
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Fatalf("took %s to refuse", took)
	}
	t.Logf("refused in %s: %v", time.Since(start).Round(time.Millisecond), err)
	if err := m.Unmount(ctx(t), target); err != nil {
		t.Fatal(err)
	}
}
