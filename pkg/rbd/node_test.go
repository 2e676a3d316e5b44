package rbd

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// testKey is a well-formed cephx key (not a real one).
const testKey = "AQBSdFhlAAAAABAAtZkGmFNzrBc9t6FGiTFU1w=="

// Concurrent probes of one path share one run; callers that give up leave
// no goroutine behind; the next probe after the first returns runs anew.
func TestProberOneFlightPerKey(t *testing.T) {
	var p prober
	release := make(chan struct{})
	var runs atomic.Int32
	hang := func() (any, error) {
		runs.Add(1)
		<-release
		return "done", nil
	}
	base := runtime.NumGoroutine()
	var wg sync.WaitGroup
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.do(context.Background(), "k", 20*time.Millisecond, hang); err != errHung {
				t.Errorf("probe of a hung path: %v, want errHung", err)
			}
		}()
	}
	wg.Wait()
	if runs.Load() != 1 || p.inflight() != 1 {
		t.Fatalf("200 probes of one hung key ran %d times, %d in flight; want 1 and 1", runs.Load(), p.inflight())
	}
	// The callers' goroutines are on their way out once wg.Wait returns.
	for i := 0; runtime.NumGoroutine() > base+1; i++ {
		if i > 200 {
			t.Fatalf("%d goroutines after 200 timed-out probes, %d before: want at most one more", runtime.NumGoroutine(), base)
		}
		time.Sleep(10 * time.Millisecond)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.do(ctx, "k", time.Minute, hang); err != context.Canceled {
		t.Fatalf("probe with a cancelled context: %v", err)
	}
	close(release)
	for p.inflight() != 0 {
		time.Sleep(time.Millisecond)
	}
	v, err := p.do(context.Background(), "k", time.Second, func() (any, error) { return "fresh", nil })
	if err != nil || v != "fresh" || runs.Load() != 1 {
		t.Fatalf("probe after the hung one returned: %v %v (runs %d)", v, err, runs.Load())
	}
}

func TestMountOptionsReadOnlyLast(t *testing.T) {
	for _, c := range []struct {
		flags []string
		ro    bool
		want  []string
	}{
		{[]string{"rw", "noatime"}, true, []string{"noatime", "ro"}},
		{[]string{"noatime", "rw"}, true, []string{"noatime", "ro"}},
		{nil, true, []string{"ro"}},
		{[]string{"rw", "noatime"}, false, []string{"rw", "noatime"}},
	} {
		got := mountOptions(c.flags, c.ro)
		if !slices.Equal(got, c.want) {
			t.Errorf("mountOptions(%v, %v) = %v, want %v", c.flags, c.ro, got, c.want)
		}
	}
}

// Tools get the image by --pool/--namespace/--image (values joined with '='),
// the key by memfd, and neither an admin socket nor a log file.
func TestToolArgs(t *testing.T) {
	spec := ImageSpec{Pool: "p", Namespace: "ns", Image: "img", Monitors: "127.0.0.1:6789",
		Creds: rcsi.Credentials{ID: "u", Key: testKey}, ReadOnly: true}
	for name, args := range map[string][]string{
		"rbd map (krbd)": newKRBD().mapArgs(spec),
		"rbd map (nbd)":  newNBD("").mapArgs(spec),
		"rbd-fuse":       fuseArgs(spec, "/mnt/x"),
	} {
		joined := strings.Join(args, " ")
		for _, want := range []string{"--admin-socket=", "--log-file=", rcsi.KeyFileArg, "--id=u", "--namespace=ns"} {
			if !slices.Contains(args, want) {
				t.Errorf("%s: %q lacks %s", name, joined, want)
			}
		}
		if strings.Contains(joined, testKey) {
			t.Errorf("%s: the key is on the command line", name)
		}
		for _, a := range args {
			if a == "p/ns/img" || a == "p/img" || a == "img" || a == "p" || a == "ns" {
				t.Errorf("%s: %q passes %q as a separate argument", name, joined, a)
			}
		}
	}
	if a := newKRBD().mapArgs(spec); !slices.Contains(a, "--pool=p") || !slices.Contains(a, "--image=img") || !slices.Contains(a, "--device-type=krbd") {
		t.Errorf("rbd map args %v", a)
	}
	if a := fuseArgs(spec, "/mnt/x"); !slices.Contains(a, "--poolname=p") || !slices.Contains(a, "--image=img") || a[len(a)-1] != "/mnt/x" {
		t.Errorf("rbd-fuse args %v", a)
	}
}

func TestFindMapped(t *testing.T) {
	spec := ImageSpec{Pool: "rbd", Image: "a"}
	list := `[{"id":"0","pool":"rbd","namespace":"","name":"b","snap":"-","device":"/dev/rbd0"},
		{"id":"1","pool":"rbd","namespace":"","name":"a","snap":"-","device":"/dev/rbd1"}]`
	if dev, err := findMapped([]byte(list), spec); dev != "/dev/rbd1" || err != nil {
		t.Fatalf("findMapped = %q %v", dev, err)
	}
	for _, out := range []string{"[]", "", "\n"} {
		if dev, err := findMapped([]byte(out), spec); dev != "" || err != nil {
			t.Fatalf("findMapped(%q) = %q %v, want not mapped", out, dev, err)
		}
	}
	for _, out := range []string{"rbd: error", "[{", "{}"} {
		if _, err := findMapped([]byte(out), spec); err == nil {
			t.Fatalf("findMapped(%q) = nil error: unparseable output read as not mapped", out)
		}
	}
}

// Saving a stage record fsyncs its directory after the rename; removing it
// fsyncs the directory after the unlink (seen with strace on a child).
func TestStateStoreSyncsDirectory(t *testing.T) {
	if dir := os.Getenv("ROOKZMQ_STATE_CHILD"); dir != "" {
		s := stateStore{dir: dir}
		if err := s.save(&stageRecord{VolumeID: "v"}); err != nil {
			t.Fatal(err)
		}
		if err := s.remove("v"); err != nil {
			t.Fatal(err)
		}
		return
	}
	if _, err := exec.LookPath("strace"); err != nil {
		t.Skip("strace is not installed")
	}
	dir := t.TempDir()
	trace := filepath.Join(dir, "trace")
	cmd := exec.Command("strace", "-f", "-qq", "-o", trace, "-e", "trace=openat,rename,renameat,renameat2,unlink,unlinkat,fsync",
		os.Args[0], "-test.run", "^TestStateStoreSyncsDirectory$")
	cmd.Env = append(os.Environ(), "ROOKZMQ_STATE_CHILD="+filepath.Join(dir, "state"))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	b, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	volumes := filepath.Join(dir, "state", "volumes")
	// Calls in order, with directory fds resolved from their openat.
	fds := map[string]string{}
	var events []string
	openRe := regexp.MustCompile(`openat\(AT_FDCWD, "([^"]+)", [^)]*\) = (\d+)`)
	for _, l := range strings.Split(string(b), "\n") {
		switch {
		case openRe.MatchString(l):
			m := openRe.FindStringSubmatch(l)
			fds[m[2]] = m[1]
		case strings.Contains(l, "rename") && strings.Contains(l, volumes) && !strings.Contains(l, "= -1"):
			events = append(events, "rename")
		case strings.Contains(l, "unlink") && strings.Contains(l, ".json") && strings.Contains(l, volumes) && !strings.Contains(l, "= -1"):
			events = append(events, "unlink")
		case strings.Contains(l, "fsync("):
			if fd := strings.SplitN(l[strings.Index(l, "fsync(")+6:], ")", 2)[0]; fds[fd] == volumes {
				events = append(events, "fsync-dir")
			}
		}
	}
	got := strings.Join(events, " ")
	if !regexp.MustCompile(`rename fsync-dir.*unlink fsync-dir`).MatchString(got) {
		t.Fatalf("stage record calls %q, want the directory fsynced after the rename and after the unlink\n%s", got, b)
	}
}
