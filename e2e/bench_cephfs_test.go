package e2e

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	fsadmin "github.com/ceph/go-ceph/cephfs/admin"
	"github.com/ceph/go-ceph/rados"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// BenchmarkCephFSControllerVsMgr measures CephFS CreateVolume/DeleteVolume
// through the driver beside raw `ceph fs subvolume create/rm` through the mgr
// volumes module (go-ceph cephfs/admin, what ceph-csi does per call), at 1 and
// 8 callers, in three interleaved rounds, with the same user. Our deletes
// return once the removal is promised; the purge that follows is timed
// separately (drain) and finishes before the next batch starts. The same
// driver also provisions with a user holding ceph-csi's caps, which goes
// through the mgr (the fallback path): what those caps cost.
func BenchmarkCephFSControllerVsMgr(b *testing.B) {
	const n, rounds = 60, 3
	d := startCephFSDriver(b, newDriverDir(b), nil, "-v=0")
	sec, csiSec := cephfsSecrets(b), cephCSISecrets(b)
	conn, err := rados.NewConnWithUser(sec["adminID"])
	if err == nil {
		conn.SetConfigOption("mon_host", env["ROOKZMQ_CEPH_MONITORS"])
		conn.SetConfigOption("key", sec["adminKey"])
		conn.SetConfigOption("admin_socket", "")
		err = conn.Connect()
	}
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Shutdown()
	mgr := fsadmin.NewFromConn(conn)
	fsName, group := env["ROOKZMQ_CEPH_FS_NAME"], env["ROOKZMQ_CEPH_SUBVOLUMEGROUP"]
	c := ctx(b)

	fmt.Printf("\n%-44s %10s %10s %10s   %s\n", "CephFS operation (60 per batch)", "ops/s", "p50", "p99", "vs the mgr")
	row := func(what string, l latencies, floor *latencies) {
		ratio := ""
		if floor != nil {
			ratio = fmt.Sprintf("%.1fx the mgr's rate", l.rate()/floor.rate())
		}
		fmt.Printf("%-44s %10.1f %10s %10s   %s\n", what, l.rate(), l.pct(0.5).Round(10*time.Microsecond), l.pct(0.99).Round(10*time.Microsecond), ratio)
	}
	for round := 1; round <= rounds; round++ {
		for _, callers := range []int{1, 8} {
			prefix := fmt.Sprintf("bench-%d-r%d-c%d-", time.Now().UnixNano()%1e9, round, callers)
			raw := func(i int) string { return fmt.Sprintf("%sraw-%d", prefix, i) }
			mgrCreate, err := timed(n, callers, func(i int) error {
				return mgr.CreateSubVolume(fsName, group, raw(i), &fsadmin.SubVolumeOptions{Size: 64 << 20})
			})
			if err != nil {
				b.Fatal(err)
			}
			ids := make([]string, n)
			create, err := timed(n, callers, func(i int) error {
				r, err := d.ctrl.CreateVolume(c, &csi.CreateVolumeRequest{Name: fmt.Sprintf("%s%d", prefix, i),
					CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)},
					Parameters: cephfsParams("volumeNamePrefix", prefix), Secrets: sec})
				ids[i] = r.GetVolume().GetVolumeId()
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
			csiPrefix := strings.Replace(prefix, "bench-", "benchcc-", 1)
			csiIDs := make([]string, n)
			var timeouts atomic.Int32
			csiCreate, err := timed(n, callers, func(i int) error {
				for try := 0; ; try++ {
					r, err := d.ctrl.CreateVolume(c, &csi.CreateVolumeRequest{Name: fmt.Sprintf("%s%d", csiPrefix, i),
						CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)},
						Parameters: cephfsParams("volumeNamePrefix", csiPrefix), Secrets: csiSec})
					// A mgr command that timed out (10 s) is retried, as
					// external-provisioner would; its time counts.
					if status.Code(err) == codes.DeadlineExceeded && try < 3 {
						timeouts.Add(1)
						continue
					}
					csiIDs[i] = r.GetVolume().GetVolumeId()
					return err
				}
			})
			if err != nil {
				b.Fatal(err)
			}
			mgrRemove, err := timed(n, callers, func(i int) error { return mgr.RemoveSubVolume(fsName, group, raw(i)) })
			if err != nil {
				b.Fatal(err)
			}
			del, err := timed(n, callers, func(i int) error {
				_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: ids[i], Secrets: sec})
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
			drain := drained(b, prefix, n)
			csiDel, err := timed(n, callers, func(i int) error {
				_, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: csiIDs[i], Secrets: csiSec})
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
			csiDrain := drained(b, csiPrefix, n)
			fmt.Printf("-- round %d, %d caller(s)\n", round, callers)
			row("mgr `fs subvolume create`", mgrCreate, nil)
			row("CreateVolume", create, &mgrCreate)
			row("CreateVolume, ceph-csi caps (through mgr)", csiCreate, &mgrCreate)
			if n := timeouts.Load(); n > 0 {
				fmt.Printf("%-44s %10d (the mgr did not answer within 10 s; retried)\n", "  calls that timed out", n)
			}
			row("mgr `fs subvolume rm`", mgrRemove, nil)
			row("DeleteVolume", del, &mgrRemove)
			fmt.Printf("%-44s %10s (%.0f volumes/s, after DeleteVolume returned)\n", "  background purge of those 60 finished in", drain.Round(time.Millisecond), float64(n)/(del.wall+drain).Seconds())
			row("DeleteVolume, ceph-csi caps (through mgr)", csiDel, &mgrRemove)
			fmt.Printf("%-44s %10s (%.0f volumes/s, `fs subvolume rm` one at a time)\n", "  background removal of those 60 finished in", csiDrain.Round(time.Millisecond), float64(n)/(csiDel.wall+csiDrain).Seconds())
		}
	}
	b.ReportMetric(0, "ns/op")
}

// drained waits until the journal holds no key naming prefix (the purger
// finished the n removals promised) and returns how long that took.
func drained(b *testing.B, prefix string, n int) time.Duration {
	start := time.Now()
	for len(cephfsJournal(b, prefix)) > 0 {
		if time.Since(start) > 5*time.Minute {
			b.Fatalf("purge of %d deleted volumes not done after 5 minutes", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}
