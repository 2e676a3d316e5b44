package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gocephfs "github.com/ceph/go-ceph/cephfs"
	"github.com/container-storage-interface/spec/lib/go/csi"
)

// BenchmarkCephFuseMount times pkg/cephfs's ceph-fuse Mount and Unmount of a
// subvolume, beside the floor (a libcephfs mount of the same path as the same
// user: the MDS session and cephx, without FUSE) and beside an rbd-fuse
// NodeStageVolume/NodeUnstageVolume of an ext4 volume through the driver.
// Then Flush of a mount holding 1000 clean files, and of one with 5 MiB
// written and not yet synced.
func BenchmarkCephFuseMount(b *testing.B) {
	const n = 10
	c := ctx(b)
	path := newSubvolume(b, fmt.Sprintf("bench-mnt-%d", time.Now().UnixNano()%1e9))
	m := fuseMounter(b)
	spec := userSpec(path)
	target := mountTarget(b)

	var mnt, unmnt, floor latencies
	for i := 0; i < n; i++ {
		start := time.Now()
		if err := m.Mount(c, target, spec); err != nil {
			b.Fatal(err)
		}
		mnt.add(time.Since(start))
		start = time.Now()
		if err := m.Unmount(c, target); err != nil {
			b.Fatal(err)
		}
		unmnt.add(time.Since(start))

		start = time.Now()
		lm, err := gocephfs.CreateMountWithId(spec.Creds.ID)
		if err == nil {
			for k, v := range map[string]string{"mon_host": spec.Monitors[0], "key": spec.Creds.Key, "admin_socket": "", "client_fs": spec.FsName} {
				if err == nil {
					err = lm.SetConfigOption(k, v)
				}
			}
		}
		if err == nil {
			err = lm.MountWithRoot(path)
		}
		if err != nil {
			b.Fatal(err)
		}
		floor.add(time.Since(start))
		lm.Unmount()
		lm.Release()
	}

	// rbd-fuse stage through the driver (the first stage, with mkfs, is not counted).
	d := startDriver(b, newDriverDir(b), nil, "-v=0")
	prefix := fmt.Sprintf("benchstage-%d-", time.Now().UnixNano()%1e9)
	vc := mountCap("ext4", rwo)
	r, err := d.ctrl.CreateVolume(c, &csi.CreateVolumeRequest{Name: prefix + "vol", CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Secrets: secrets(), Parameters: params("volumeNamePrefix", prefix)})
	if err != nil {
		b.Fatal(err)
	}
	id := r.GetVolume().GetVolumeId()
	staging := b.TempDir()
	var stage, unstage latencies
	for i := 0; i <= n; i++ {
		start := time.Now()
		if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc,
			VolumeContext: r.GetVolume().GetVolumeContext(), Secrets: secrets()}); err != nil {
			b.Fatal(err)
		}
		took := time.Since(start)
		start = time.Now()
		if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			b.Fatal(err)
		}
		if i > 0 {
			stage.add(took)
			unstage.add(time.Since(start))
		}
	}
	d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()})

	// Flush: a tree of clean files (the walk's cost), then 5 MiB dirty.
	if err := m.Mount(c, target, spec); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 1000; i++ {
		p := filepath.Join(target, fmt.Sprintf("d%02d", i%20), fmt.Sprintf("f%04d", i))
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(p), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	m.Flush(c, target)
	var clean, dirty latencies
	data := []byte(strings.Repeat("x", 5<<20))
	for i := 0; i < n; i++ {
		start := time.Now()
		if err := m.Flush(c, target); err != nil {
			b.Fatal(err)
		}
		clean.add(time.Since(start))
		if err := os.WriteFile(filepath.Join(target, "dirty"), data, 0o644); err != nil {
			b.Fatal(err)
		}
		start = time.Now()
		if err := m.Flush(c, target); err != nil {
			b.Fatal(err)
		}
		dirty.add(time.Since(start))
	}
	if err := m.Unmount(c, target); err != nil {
		b.Fatal(err)
	}

	fmt.Printf("\n%-52s %10s %10s\n", fmt.Sprintf("CephFS mount (%d each)", n), "p50", "p99")
	for _, row := range []struct {
		what string
		l    latencies
	}{
		{"libcephfs mount of the subvolume (floor)", floor},
		{"ceph-fuse Mount (pkg/cephfs)", mnt},
		{"ceph-fuse Unmount (daemon exited)", unmnt},
		{"rbd-fuse NodeStageVolume, ext4 (driver)", stage},
		{"rbd-fuse NodeUnstageVolume (driver)", unstage},
		{"Flush, 1000 clean files in 21 directories", clean},
		{"Flush, same + 5 MiB written, not synced", dirty},
	} {
		fmt.Printf("%-52s %10s %10s\n", row.what, row.l.pct(0.5).Round(100*time.Microsecond), row.l.pct(0.99).Round(100*time.Microsecond))
	}
	b.ReportMetric(0, "ns/op")
}

func (l *latencies) add(d time.Duration) {
	l.n++
	l.wall += d
	l.each = append(l.each, d)
}
