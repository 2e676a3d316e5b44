package e2e

import (
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A controller SIGKILLed in the middle of CreateVolume, restarted and retried,
// leaves no orphan image and no orphan journal entry; so does DeleteVolume.
func TestCrashDuringCreateAndDelete(t *testing.T) {
	dir := newDriverDir(t)
	prefix := uniquePrefix(t)
	for _, point := range []string{"create-after-reserve", "create-after-image"} {
		t.Run(point, func(t *testing.T) {
			name := prefix + point
			d := startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=" + point})
			if _, err := d.ctrl.CreateVolume(ctx(t), createReq(name, prefix, 64<<20)); err == nil {
				t.Fatal("CreateVolume succeeded through its crash point")
			}
			waitDead(t, d)
			d = startDriver(t, dir, nil)
			r, err := d.ctrl.CreateVolume(ctx(t), createReq(name, prefix, 64<<20))
			if err != nil {
				t.Fatalf("retry after crash: %v", err)
			}
			if n := len(journal(t, name)); n != 2 {
				t.Errorf("journal has %d keys for %s, want 2", n, name)
			}
			if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: secrets()}); err != nil {
				t.Fatal(err)
			}
			d.stop()
		})
	}
	// What each delete crash point must have left, so the test proves something.
	deleteLeft := map[string]func(t *testing.T, name string) string{
		"delete-before-image": func(t *testing.T, name string) string {
			if len(images(t, prefix+"del-")) == 0 {
				return "the image is gone before its crash point"
			}
			return ""
		},
		"delete-after-trash": func(t *testing.T, name string) string {
			if len(images(t, prefix+"del-")) != 0 || len(trashed(t, prefix+"del-")) == 0 || len(journal(t, name)) == 0 {
				return "the image is not (only) in the trash with its journal entry kept"
			}
			return ""
		},
		"delete-after-release": func(t *testing.T, name string) string {
			if len(journal(t, name)) != 0 || len(trashed(t, prefix+"del-")) == 0 || len(journal(t, prefix+"del-")) != 1 {
				return "the image is not in the trash with only its purge record in the journal"
			}
			return ""
		},
	}
	for _, point := range []string{"delete-before-image", "delete-after-trash", "delete-after-release"} {
		t.Run(point, func(t *testing.T) {
			d := startDriver(t, dir, nil)
			name := prefix + point
			r, err := d.ctrl.CreateVolume(ctx(t), createReq(name, prefix+"del-", 64<<20))
			if err != nil {
				t.Fatal(err)
			}
			d.stop()
			d = startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=" + point})
			id := r.GetVolume().GetVolumeId()
			_, err = d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()})
			if err == nil {
				t.Fatal("DeleteVolume succeeded through its crash point")
			}
			t.Logf("DeleteVolume through its crash point: %v", err)
			waitDead(t, d)
			if why := deleteLeft[point](t, name); why != "" {
				t.Fatalf("%s: the test proves nothing", why)
			}
			d = startDriver(t, dir, nil)
			if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()}); err != nil {
				t.Fatalf("retry after crash: %v", err)
			}
			d.stop()
			assertNoOrphans(t, prefix+"del-")
		})
	}
	// Crashes after the name is released: the CO may never retry (the second
	// one even told it the delete succeeded). The restarted driver finds the
	// purge in the journal the first time a call opens the pool.
	for _, point := range []string{"delete-after-release", "purge-after-task"} {
		t.Run(point+"-no-retry", func(t *testing.T) {
			d := startDriver(t, dir, nil)
			r, err := d.ctrl.CreateVolume(ctx(t), createReq(prefix+point+"-nr", prefix+"nr-", 64<<20))
			if err != nil {
				t.Fatal(err)
			}
			d.stop()
			d = startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=" + point})
			d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: secrets()})
			waitDead(t, d)
			if len(journal(t, prefix+"nr-")) != 1 {
				t.Fatalf("journal entries %v, want the purge record alone: the test proves nothing", journal(t, prefix+"nr-"))
			}
			d = startDriver(t, dir, nil)
			if _, err := d.ctrl.ValidateVolumeCapabilities(ctx(t), &csi.ValidateVolumeCapabilitiesRequest{VolumeId: r.GetVolume().GetVolumeId(),
				VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: secrets()}); status.Code(err) != codes.NotFound {
				t.Errorf("ValidateVolumeCapabilities of the deleted volume: %v, want NotFound", err)
			}
			assertNoOrphans(t, prefix+"nr-")
			d.stop()
		})
	}
	assertNoOrphans(t, prefix)
}

// A driver with a credentials directory resumes the purges a killed process
// left at start, with no call at all.
func TestPurgeResumedAtStart(t *testing.T) {
	dir := newDriverDir(t)
	creds := filepath.Join(dir, "creds", "c1")
	os.MkdirAll(creds, 0o700)
	os.WriteFile(filepath.Join(creds, "userID"), []byte(env["ROOKZMQ_CEPH_RBD_USER"]), 0o600)
	os.WriteFile(filepath.Join(creds, "userKey"), []byte(env["ROOKZMQ_CEPH_RBD_KEY"]), 0o600)
	prefix := uniquePrefix(t)
	d := startDriver(t, dir, []string{"ROOKZMQ_CRASH_AT=delete-after-release"}, "--credentials-dir", filepath.Join(dir, "creds"))
	r, err := d.ctrl.CreateVolume(ctx(t), createReq(prefix+"s", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: secrets()})
	waitDead(t, d)
	if len(journal(t, prefix)) != 1 || len(trashed(t, prefix)) != 1 {
		t.Fatalf("journal %v, trash %v: want the purge record and the trashed image", journal(t, prefix), trashed(t, prefix))
	}
	d = startDriver(t, dir, nil, "--credentials-dir", filepath.Join(dir, "creds"))
	assertNoOrphans(t, prefix)
	d.stop()
}

// SIGKILL at random moments of CreateVolume: every retry completes and
// nothing is orphaned.
func TestRandomKills(t *testing.T) {
	dir := newDriverDir(t)
	prefix := uniquePrefix(t)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for i := 0; i < 6; i++ {
		name := prefix + "r" + string(rune('a'+i))
		d := startDriver(t, dir, nil)
		delay := time.Duration(rng.Intn(40)) * time.Millisecond
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); d.ctrl.CreateVolume(ctx(t), createReq(name, prefix, 64<<20)) }()
		time.Sleep(delay)
		d.kill()
		wg.Wait()
		d = startDriver(t, dir, nil)
		r, err := d.ctrl.CreateVolume(ctx(t), createReq(name, prefix, 64<<20))
		if err != nil {
			t.Fatalf("create retry after kill at %s: %v", delay, err)
		}
		// Deletes are killed at their crash points (TestCrashDuringCreateAndDelete),
		// not at random: a SIGKILL inside librbd's remove can leave the dead
		// client's watch recorded on the image header by the OSD, and Pacific
		// was seen to keep it indefinitely (docs/design.md).
		deleteEventually(t, d, r.GetVolume().GetVolumeId())
		d.stop()
	}
	assertNoOrphans(t, prefix)
}

func waitDead(t *testing.T, d *driver) {
	deadline := time.Now().Add(10 * time.Second)
	for d.alive() {
		if time.Now().After(deadline) {
			t.Fatal("driver still alive after its crash point")
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.conn.Close()
}

// No secret appears in any log line, error message or command line, at -v=10.
func TestSecretsNeverShown(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil, "-v=10")
	realKey := env["ROOKZMQ_CEPH_RBD_KEY"]
	fakeKey := "AQAA8VNlAAAAABAA6Oqqywpz1H7d5jMJlw+a0Q==" // well formed, wrong
	badKey := "AQBmYWtlZmFrZWZha2VmYWtlZmFrZWZha2U9PQ=="  // not a cephx key

	// Watch every process's command line while the driver works.
	stop := make(chan struct{})
	seen := make(chan string, 1)
	go func() {
		for {
			select {
			case <-stop:
				close(seen)
				return
			default:
			}
			procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
			for _, p := range procs {
				b, _ := os.ReadFile(p)
				if s := string(b); strings.Contains(s, realKey) || strings.Contains(s, fakeKey) || strings.Contains(s, badKey) {
					select {
					case seen <- strings.ReplaceAll(s, "\x00", " "):
					default:
					}
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	prefix := uniquePrefix(t)
	s := createStagePublish(t, d, prefix, 64<<20, mountCap("", rwo))
	unpublishUnstageDelete(t, d, s)
	var errs []string
	bad := createReq(prefix+"bad", prefix, 64<<20)
	bad.Secrets = map[string]string{"userID": env["ROOKZMQ_CEPH_RBD_USER"], "userKey": fakeKey}
	if _, err := d.ctrl.CreateVolume(ctx(t), bad); err == nil {
		t.Error("CreateVolume with a wrong key succeeded")
	} else {
		errs = append(errs, err.Error())
	}
	for _, k := range []string{badKey, "not a key"} {
		bad.Secrets["userKey"] = k
		if _, err := d.ctrl.CreateVolume(ctx(t), bad); status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateVolume with a malformed key: %v, want InvalidArgument", err)
		} else {
			errs = append(errs, err.Error())
		}
	}
	st := &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: t.TempDir(), VolumeCapability: mountCap("", rwo),
		Secrets: map[string]string{"userID": env["ROOKZMQ_CEPH_RBD_USER"], "userKey": fakeKey}}
	for _, k := range []string{fakeKey, badKey} {
		st.Secrets["userKey"] = k
		if _, err := d.node.NodeStageVolume(ctx(t), st); err == nil {
			t.Errorf("NodeStageVolume with a wrong key succeeded")
		} else {
			errs = append(errs, err.Error())
		}
	}
	close(stop)
	if cmd, ok := <-seen; ok {
		t.Errorf("a key appeared on a command line: %s", cmd)
	}
	d.stop()
	logs, _ := os.ReadFile(d.log)
	if len(logs) < 1000 {
		t.Fatalf("the -v=10 log is suspiciously short (%d bytes)", len(logs))
	}
	for _, k := range []string{realKey, fakeKey, badKey, "not a key"} {
		for _, l := range strings.Split(string(logs), "\n") {
			if strings.Contains(l, k) {
				t.Errorf("key %.6s... appears in the driver log: %.300s", k, strings.ReplaceAll(l, k, "<KEY>"))
			}
		}
		for _, e := range errs {
			if strings.Contains(e, k) {
				t.Errorf("key %.6s... appears in an error: %s", k, e)
			}
		}
	}
	if keys, _ := filepath.Glob(filepath.Join(dir, "state", "keys", "*")); len(keys) != 0 {
		t.Errorf("key files left behind: %v", keys)
	}
}
