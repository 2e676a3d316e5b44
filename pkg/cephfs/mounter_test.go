package cephfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

const testKey = "AQBnOkhnAAAAABAAq9qXGm1IJw6Y8Q9V5pBCDA=="

func testSpec() MountSpec {
	return MountSpec{Monitors: []string{"10.0.0.1:6789", "10.0.0.2"}, FsName: "cephfs",
		Path: "/volumes/csi/sv/0f6f4b58-6f2c-4b3a-8f0e-1f2e3d4c5b6a", Creds: rcsi.Credentials{ID: "csi-cephfs", Key: testKey}}
}

func TestParseFuseOptions(t *testing.T) {
	for _, c := range []struct {
		in   string
		ro   bool
		want []string
		bad  string // part of the error
	}{
		{in: "", want: nil},
		{in: "", ro: true, want: []string{"ro"}},
		{in: "noatime,max_read=131072", want: []string{"noatime", "max_read=131072"}},
		{in: "noatime", ro: true, want: []string{"noatime", "ro"}},
		{in: "debug", bad: `"debug" is not supported`}, // implies foreground: Mount would never return
		{in: "keyring=/tmp/k", bad: `"keyring" is not supported`},
		{in: "conf=/etc/x", bad: `"conf" is not supported`},
		{in: "noatime,-c", bad: `"-c" is not supported`},
		{in: "fsname=x", bad: `"fsname" is not supported`},
		{in: "max_read=1,x", bad: `"x" is not supported`},
		{in: "max_read=/etc/ceph", bad: "needs a number"},
		{in: "max_read", bad: "needs a number"},
		{in: "noatime=1", bad: "takes no value"},
		{in: "noatime,", bad: "empty option"},
		{in: "rw", ro: true, bad: "read-only"},
	} {
		got, err := parseFuseOptions(c.in, c.ro)
		if c.bad != "" {
			if rcsi.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), c.bad) ||
				!strings.Contains(err.Error(), ParamFuseMountOptions) {
				t.Errorf("%q: %v, want InvalidArgument naming %s and %s", c.in, err, ParamFuseMountOptions, c.bad)
			}
			continue
		}
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("%q ro=%v: %q %v, want %q", c.in, c.ro, got, err, c.want)
		}
	}
}

func TestFuseArgs(t *testing.T) {
	spec := testSpec()
	args := fuseArgs(spec, "/stage/x", []string{"noatime", "ro"})
	joined := strings.Join(args, " ")
	if strings.Contains(joined, testKey) {
		t.Fatal("the key is on the command line")
	}
	if args[len(args)-1] != "/stage/x" {
		t.Errorf("the target is not last: %q", args)
	}
	for _, want := range []string{"--id=csi-cephfs", keyFileArg, "--mon-host=10.0.0.1:6789,10.0.0.2",
		"--client_fs=cephfs", "--client_mountpoint=" + spec.Path, "--admin-socket=", "--log-file=", "--no-mon-config"} {
		if !slices.Contains(args, want) {
			t.Errorf("%q missing from %q", want, args)
		}
	}
	// Every value is joined to its option: the only separate values are -o's and the target.
	for i, a := range args[:len(args)-1] {
		if !strings.HasPrefix(a, "-") && args[i-1] != "-o" {
			t.Errorf("argument %q stands alone", a)
		}
	}
	if i := slices.Index(args, "-o"); i < 0 || args[i+1] != "noatime,ro" {
		t.Errorf("-o noatime,ro missing: %q", args)
	}
	running := append([]string{"ceph-fuse"}, args...)
	if !sameFuseMount(running, args) {
		t.Error("the same command line does not match")
	}
	other := fuseArgs(MountSpec{Monitors: spec.Monitors, FsName: "cephfs", Path: "/volumes/csi/other", Creds: spec.Creds}, "/stage/x", nil)
	if sameFuseMount(running, other) {
		t.Error("another subvolume's command line matches")
	}
}

func TestCheckSpecAndTarget(t *testing.T) {
	for _, tgt := range []string{"", "rel/path", "/a/../b", "/a/b/", "/", "/a b", "/a\nb"} {
		if err := checkTarget(tgt); rcsi.Code(err) != codes.InvalidArgument {
			t.Errorf("target %q: %v", tgt, err)
		}
	}
	if err := checkTarget("/var/lib/kubelet/plugins/x/globalmount"); err != nil {
		t.Error(err)
	}
	if err := checkSpec(testSpec()); err != nil {
		t.Fatal(err)
	}
	for name, mod := range map[string]func(*MountSpec){
		"no monitors":     func(s *MountSpec) { s.Monitors = nil },
		"monitor comma":   func(s *MountSpec) { s.Monitors = []string{"a,b"} },
		"no fs":           func(s *MountSpec) { s.FsName = "" },
		"fs slash":        func(s *MountSpec) { s.FsName = "a/b" },
		"relative path":   func(s *MountSpec) { s.Path = "volumes/x" },
		"unclean path":    func(s *MountSpec) { s.Path = "/volumes/../x" },
		"path comma":      func(s *MountSpec) { s.Path = "/volumes/x,secret=y" },
		"no key":          func(s *MountSpec) { s.Creds.Key = "" },
		"user with comma": func(s *MountSpec) { s.Creds.ID = "a,secret=b" },
		"key with comma":  func(s *MountSpec) { s.Creds.Key = testKey + ",ms_mode=crc" },
	} {
		s := testSpec()
		mod(&s)
		err := checkSpec(s)
		if rcsi.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
		if err != nil && strings.Contains(err.Error(), testKey) {
			t.Errorf("%s: the key is in the error", name)
		}
	}
}

func TestKernelOptions(t *testing.T) {
	o, err := parseKernelOptions("noatime,rsize=1048576,nocrc,fsc,ms_mode=secure", true)
	if err != nil {
		t.Fatal(err)
	}
	if o.flags != unix.MS_NOATIME|unix.MS_RDONLY {
		t.Errorf("flags %#x", o.flags)
	}
	spec := testSpec()
	data := o.mountData(spec)
	want := "name=csi-cephfs,secret=" + testKey + ",mds_namespace=cephfs,rsize=1048576,nocrc,fsc,ms_mode=secure,mount_timeout=30"
	if data != want {
		t.Errorf("data %q, want %q", data, want)
	}
	if o, _ := parseKernelOptions("mount_timeout=5", false); !slices.Equal(o.data, []string{"mount_timeout=5"}) {
		t.Errorf("a given mount_timeout is replaced: %q", o.data)
	}
	for in, bad := range map[string]string{
		"secret=AQB":            "set by the driver",
		"secretfile=/etc/k":     "set by the driver",
		"name=admin":            "set by the driver",
		"mds_namespace=other":   "set by the driver",
		"rsize=1,bogus":         `"bogus" is not supported`,
		"snapdirname=a/../b":    "bad value",
		"rsize":                 "needs a value",
		"nocrc=1":               "bad value",
		"rw":                    "read-only",
		"noatime,,rsize=4096":   "empty option",
		"recover_session=clean": "",
	} {
		_, err := parseKernelOptions(in, in == "rw")
		if bad == "" {
			if err != nil {
				t.Errorf("%q: %v", in, err)
			}
			continue
		}
		if rcsi.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), bad) {
			t.Errorf("%q: %v, want InvalidArgument with %q", in, err, bad)
		}
	}
}

func TestKernelSource(t *testing.T) {
	src, err := kernelSource(context.Background(), []string{"10.0.0.1:6789", "v1:10.0.0.2:6790", "10.0.0.3", "[fd00::1]:6789"}, "/volumes/csi/a/b")
	if err != nil {
		t.Fatal(err)
	}
	if want := "10.0.0.1:6789,10.0.0.2:6790,10.0.0.3:6789,[fd00::1]:6789:/volumes/csi/a/b"; src != want {
		t.Errorf("%q, want %q", src, want)
	}
}

func TestFuseErrorCode(t *testing.T) {
	for line, want := range map[string]codes.Code{
		"ceph-fuse[1]: ceph mount failed with (1) Operation not permitted":   codes.PermissionDenied,
		"ceph-fuse[1]: ceph mount failed with (2) No such file or directory": codes.NotFound,
		"ceph-fuse[1]: ceph mount failed with (110) Connection timed out":    codes.Unavailable,
		"fuse: bad mount point": codes.Internal,
	} {
		if got := fuseErrorCode(line); got != want {
			t.Errorf("%q: %v, want %v", line, got, want)
		}
	}
}

// The flush walk visits every regular file and directory once, and nothing
// through a symbolic link, however the tree is laid out.
func TestSyncTreeWalk(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	for _, f := range []string{"a", "d1/b", "d1/d2/c", "d1/d2/d3/d", "e/f"} {
		p := filepath.Join(root, f)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(f), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(outside, "secret"), []byte("x"), 0o600)
	os.Mkdir(filepath.Join(root, "empty"), 0o755)
	// Links to outside the tree, to a file and to a directory; a FIFO
	// (opening it for reading without O_NONBLOCK would hang); a socket.
	os.Symlink(outside, filepath.Join(root, "d1", "out"))
	os.Symlink(filepath.Join(outside, "secret"), filepath.Join(root, "lnk"))
	if err := unix.Mkfifo(filepath.Join(root, "d1", "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 600; i++ { // more entries than one read batch
		os.WriteFile(filepath.Join(root, "e", "g"+string(rune('a'+i%26))+strings.Repeat("x", i/26)), nil, 0o600)
	}
	st, err := syncTree(context.Background(), root)
	if err != nil {
		t.Fatal(err)
	}
	if st.files != 5+600 || st.dirs != 6 { // root, d1, d2, d3, e, empty
		t.Errorf("walked %d files and %d directories, want 605 and 6", st.files, st.dirs)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := syncTree(ctx, root); rcsi.Code(err) != codes.DeadlineExceeded {
		t.Errorf("a cancelled walk: %v", err)
	}
}

// A tree deeper than maxFlushDepth is refused, not half flushed.
func TestSyncTreeTooDeep(t *testing.T) {
	root := t.TempDir()
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < maxFlushDepth+1; i++ { // relative to the last one: deeper than PATH_MAX
		if err := unix.Mkdirat(fd, "d", 0o755); err != nil {
			t.Fatal(err)
		}
		next, err := unix.Openat(fd, "d", unix.O_RDONLY|unix.O_DIRECTORY, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd = next
	}
	unix.Close(fd)
	_, err = syncTree(context.Background(), root)
	if rcsi.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "deeper") {
		t.Errorf("%v, want FailedPrecondition saying the tree is too deep", err)
	}
}

func TestNotMounted(t *testing.T) {
	dir := t.TempDir()
	for _, m := range []Mounter{&fuseMounter{}, &kernelMounter{}} {
		err := m.Flush(context.Background(), dir)
		if rcsi.Code(err) != codes.FailedPrecondition || !errors.Is(err, ErrNotMounted) {
			t.Errorf("%s: Flush of an unmounted directory: %v", m.Name(), err)
		}
		// The node skeleton reads a broken mount as rcsi.Gone (a stale stage).
		if err := m.Healthy(context.Background(), dir); !rcsi.IsGone(err) || !IsBroken(err) || rcsi.Code(err) != codes.FailedPrecondition {
			t.Errorf("%s: Healthy of an unmounted directory: %v", m.Name(), err)
		}
		if err := m.Unmount(context.Background(), dir); err != nil {
			t.Errorf("%s: Unmount of an unmounted directory: %v", m.Name(), err)
		}
	}
	if _, err := NewMounter("nfs"); rcsi.Code(err) != codes.InvalidArgument {
		t.Errorf("unknown mounter: %v", err)
	}
}
