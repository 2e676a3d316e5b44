package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gocephfs "github.com/ceph/go-ceph/cephfs"
	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
)

// BenchmarkNodeStagePublish times what a pod start costs on the node:
// NodeStageVolume then NodePublishVolume through the driver, for a CephFS
// volume (ceph-fuse) beside an RBD volume (rbd-fuse, loop device, ext4; its
// first stage, with mkfs, is not counted), and the unpublish and unstage
// after; beside the floors measured in the same run: a libcephfs mount of the
// subvolume as the same user (MDS session and cephx, without FUSE) and a
// librbd open of the image.
func BenchmarkNodeStagePublish(b *testing.B) {
	const n = 10
	c := ctx(b)
	type row struct {
		what string
		l    *latencies
	}
	var rows []row
	cycle := func(d *driver, name string, stage *csi.NodeStageVolumeRequest, warm bool) {
		var st, pub, both, unpub, unst latencies
		target := mountTarget(b)
		rounds := n
		if warm {
			rounds++
		}
		for i := 0; i < rounds; i++ {
			start := time.Now()
			if _, err := d.node.NodeStageVolume(c, stage); err != nil {
				b.Fatal(err)
			}
			tStage := time.Since(start)
			if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: stage.VolumeId, StagingTargetPath: stage.StagingTargetPath,
				TargetPath: target, VolumeCapability: stage.VolumeCapability, VolumeContext: stage.VolumeContext}); err != nil {
				b.Fatal(err)
			}
			tBoth := time.Since(start)
			start = time.Now()
			if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: stage.VolumeId, TargetPath: target}); err != nil {
				b.Fatal(err)
			}
			tUnpub := time.Since(start)
			if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: stage.VolumeId, StagingTargetPath: stage.StagingTargetPath}); err != nil {
				b.Fatal(err)
			}
			if i == 0 && warm {
				continue
			}
			st.add(tStage)
			pub.add(tBoth - tStage)
			both.add(tBoth)
			unpub.add(tUnpub)
			unst.add(time.Since(start) - tUnpub)
		}
		rows = append(rows, row{name + " NodeStageVolume", &st}, row{name + " NodePublishVolume", &pub},
			row{name + " stage + publish", &both}, row{name + " NodeUnpublishVolume", &unpub}, row{name + " NodeUnstageVolume", &unst})
	}

	// CephFS, ceph-fuse.
	d := startCephFSNode(b, newDriverDir(b), nil, "-v=0")
	prefix := fmt.Sprintf("benchnode-%d-", time.Now().UnixNano()%1e9)
	r, err := d.ctrl.CreateVolume(c, cephfsCreateReq(b, prefix+"vol", prefix, 1<<30))
	if err != nil {
		b.Fatal(err)
	}
	vol := r.GetVolume()
	cycle(d, "ceph-fuse", &csi.NodeStageVolumeRequest{VolumeId: vol.GetVolumeId(), StagingTargetPath: filepath.Join(b.TempDir(), "s"),
		VolumeCapability: mountCap("", rwx), VolumeContext: vol.GetVolumeContext(), Secrets: cephfsUserSecrets()}, false)
	spec := userSpec(vol.GetVolumeContext()["subvolumePath"])
	var floorFS latencies
	for i := 0; i < n; i++ {
		start := time.Now()
		lm, err := gocephfs.CreateMountWithId(spec.Creds.ID)
		for k, v := range map[string]string{"mon_host": spec.Monitors[0], "key": spec.Creds.Key, "admin_socket": "", "client_fs": spec.FsName} {
			if err == nil {
				err = lm.SetConfigOption(k, v)
			}
		}
		if err == nil {
			err = lm.MountWithRoot(spec.Path)
		}
		if err != nil {
			b.Fatal(err)
		}
		floorFS.add(time.Since(start))
		lm.Unmount()
		lm.Release()
	}
	rows = append(rows, row{"libcephfs mount of the subvolume (floor)", &floorFS})
	d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId(), Secrets: cephfsSecrets(b)})

	// RBD, rbd-fuse.
	d = startDriver(b, newDriverDir(b), nil, "-v=0")
	prefix = fmt.Sprintf("benchnode-%d-", time.Now().UnixNano()%1e9)
	vc := mountCap("ext4", rwo)
	r, err = d.ctrl.CreateVolume(c, &csi.CreateVolumeRequest{Name: prefix + "vol", CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20},
		VolumeCapabilities: []*csi.VolumeCapability{vc}, Secrets: secrets(), Parameters: params("volumeNamePrefix", prefix)})
	if err != nil {
		b.Fatal(err)
	}
	vol = r.GetVolume()
	cycle(d, "rbd-fuse", &csi.NodeStageVolumeRequest{VolumeId: vol.GetVolumeId(), StagingTargetPath: filepath.Join(b.TempDir(), "s"),
		VolumeCapability: vc, VolumeContext: vol.GetVolumeContext(), Secrets: secrets()}, true)
	var floorRBD latencies
	names, err := rbd.GetImageNames(admin)
	if err != nil {
		b.Fatal(err)
	}
	var image string
	for _, nm := range names {
		if strings.HasPrefix(nm, prefix) {
			image = nm
		}
	}
	for i := 0; i < n; i++ {
		start := time.Now()
		img, err := rbd.OpenImage(admin, image, rbd.NoSnapshot)
		if err != nil {
			b.Fatal(err)
		}
		floorRBD.add(time.Since(start))
		img.Close()
	}
	rows = append(rows, row{"librbd open of the image (floor)", &floorRBD})
	d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId(), Secrets: secrets()})

	fmt.Printf("\n%-52s %10s %10s\n", fmt.Sprintf("Node stage and publish (%d each)", n), "p50", "p99")
	for _, r := range rows {
		fmt.Printf("%-52s %10s %10s\n", r.what, r.l.pct(0.5).Round(100*time.Microsecond), r.l.pct(0.99).Round(100*time.Microsecond))
	}
	b.ReportMetric(0, "ns/op")
}
