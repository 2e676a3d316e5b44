package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// hungFuseMount mounts a FUSE filesystem whose server never answers: every
// stat of it blocks until the test ends (then the connection is aborted).
// The test process itself must never touch the path.
func hungFuseMount(t *testing.T) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "hung")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no /dev/fuse: %v", err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0", fd)
	if err := unix.Mount("rookzmq-hung", mnt, "fuse", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		unix.Close(fd)
		t.Fatalf("mounting a hung FUSE filesystem: %v", err)
	}
	// Runs before t.TempDir's removal (cleanups run last in, first out).
	t.Cleanup(func() {
		unix.Unmount(mnt, unix.MNT_DETACH)
		unix.Close(fd) // aborts the connection: blocked requests return ENOTCONN
	})
	return mnt
}

func threads(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			var n int
			fmt.Sscan(strings.TrimSpace(v), &n)
			return n
		}
	}
	t.Fatal("no Threads line")
	return 0
}

// parallel runs n calls of f on workers goroutines.
func parallel(n, workers int, f func()) {
	jobs := make(chan struct{})
	done := make(chan struct{})
	for w := 0; w < workers; w++ {
		go func() {
			for range jobs {
				f()
			}
			done <- struct{}{}
		}()
	}
	for i := 0; i < n; i++ {
		jobs <- struct{}{}
	}
	close(jobs)
	for w := 0; w < workers; w++ {
		<-done
	}
}

// NodeGetVolumeStats and NodeGetVolumeHealth on a mount that never answers:
// each call answers (Unavailable, or the caller's deadline), and 1,000 stats
// calls plus 200 health calls leave the driver's thread count flat: one probe
// per path at a time, none left behind per call.
func TestStatsOnHungMount(t *testing.T) {
	tools := fakeRBD(t)
	dir := newDriverDir(t)
	hung := hungFuseMount(t)
	id := "1-02-c1-03-rbd-00--e2e-hung-" + fmt.Sprint(time.Now().UnixNano()%1e9)
	image := id[strings.LastIndex(id, "--")+2:]
	writeKRBDRecord(t, dir, id, image, hung) // staged at the hung mount
	tools.set("mapped", fmt.Sprintf(`[{"id":"7","pool":"rbd","namespace":"","name":%q,"snap":"-","device":"/dev/rbd7"}]`, image))
	d := startDriver(t, dir, tools.env())
	pid := d.cmd.Process.Pid

	// One call waits out the probe timeout and answers Unavailable.
	start := time.Now()
	_, err := d.node.NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: hung})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("stats of a hung mount: %v, want Unavailable", err)
	}
	t.Logf("stats of a hung mount answered in %s: %v", time.Since(start).Round(time.Millisecond), err)
	h, err := d.node.NodeGetVolumeHealth(ctx(t), &csi.NodeGetVolumeHealthRequest{VolumeId: id})
	if err != nil {
		t.Fatalf("health of a volume staged at a hung mount: %v", err)
	}
	var reasons []string
	for _, e := range h.GetVolumeHealth().GetHealthStatuses() {
		reasons = append(reasons, e.GetReason())
	}
	if r := strings.Join(reasons, " "); !strings.Contains(r, "MountHung") || strings.Contains(r, "Lost") {
		t.Fatalf("health reasons %v, want MountHung and nothing lost", reasons)
	}
	short := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 200*time.Millisecond)
	}
	var answered, other int64
	var mu = make(chan struct{}, 1)
	count := func(err error) {
		mu <- struct{}{}
		switch status.Code(err) {
		// Aborted: the volume's lock stayed busy past the call's deadline
		// (the server can answer a moment before the client gives up).
		case codes.Unavailable, codes.DeadlineExceeded, codes.Aborted:
			answered++
		default:
			other++
		}
		<-mu
	}
	load := func(stats, health int) {
		parallel(stats, 50, func() {
			c, cancel := short()
			defer cancel()
			_, err := d.node.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: hung})
			count(err)
		})
		parallel(health, 20, func() {
			c, cancel := short()
			defer cancel()
			_, err := d.node.NodeGetVolumeHealth(c, &csi.NodeGetVolumeHealthRequest{VolumeId: id})
			if err == nil {
				err = status.Error(codes.Unavailable, "answered")
			}
			count(err)
		})
		time.Sleep(time.Second)
	}
	// A warm-up at the same concurrency lets the Go runtime grow its thread
	// pool to what 50 concurrent calls need; after that, calls must add none.
	load(100, 40)
	before := threads(t, pid)
	answered, other = 0, 0
	start = time.Now()
	load(1000, 200)
	after := threads(t, pid)
	t.Logf("1,000 stats + 200 health calls in %s: threads %d before, %d after; %d answered, %d other",
		time.Since(start).Round(time.Millisecond), before, after, answered, other)
	if other != 0 {
		t.Errorf("%d calls answered neither Unavailable, DeadlineExceeded nor Aborted", other)
	}
	// Per-call threads would add ~1,200; the runtime's pool moves by a few.
	if after > before+10 {
		t.Errorf("threads grew from %d to %d over 1,200 calls on a hung mount", before, after)
	}
}
