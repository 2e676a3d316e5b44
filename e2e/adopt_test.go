package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Volumes laid out as ceph-csi v3.12 lays them out (internal/journal/voljournal.go),
// written here through go-ceph, then served by rookzmq under their old handle.

const (
	adoptCluster   = "rook-ceph"    // ceph-csi clusterID without a RADOS namespace
	adoptClusterNS = "rook-ceph-ns" // and one with the namespace below
	adoptNamespace = "rookzmq-adopt"
)

// cephCSIVol is one volume as ceph-csi made it.
type cephCSIVol struct {
	handle, uuid, image, reqName, instance string
	io                                     *rados.IOContext // pool rbd, in the volume's namespace
	context                                map[string]string
}

var adminConnOnce struct {
	sync.Once
	conn *rados.Conn
	err  error
}

// adminIOContext opens pool rbd in a RADOS namespace as client.admin.
func adminIOContext(t *testing.T, namespace string) *rados.IOContext {
	t.Helper()
	c := &adminConnOnce
	c.Do(func() {
		c.conn, c.err = rados.NewConnWithUser("admin")
		if c.err == nil {
			c.conn.SetConfigOption("mon_host", env["ROOKZMQ_CEPH_MONITORS"])
			c.conn.SetConfigOption("key", env["ROOKZMQ_CEPH_ADMIN_KEY"])
			c.conn.SetConfigOption("admin_socket", "")
			c.err = c.conn.Connect()
		}
	})
	if c.err != nil {
		t.Fatal(c.err)
	}
	io, err := c.conn.OpenIOContext("rbd")
	if err != nil {
		t.Fatal(err)
	}
	io.SetNamespace(namespace)
	t.Cleanup(io.Destroy)
	return io
}

func rbdPoolID(t *testing.T) int64 {
	t.Helper()
	adminIOContext(t, "")
	id, err := adminConnOnce.conn.GetPoolByName("rbd")
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// adoptDriverDir is a driver directory whose clusters file lists the ceph-csi
// cluster IDs, as copied from ceph-csi's config.json.
func adoptDriverDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	mon := env["ROOKZMQ_CEPH_MONITORS"]
	cfg := fmt.Sprintf(`[{"clusterID":%q,"monitors":[%q]},{"clusterID":%q,"monitors":[%q],"rbd":{"radosNamespace":%q}}]`,
		adoptCluster, mon, adoptClusterNS, mon, adoptNamespace)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := rbd.NamespaceCreate(adminIOContext(t, ""), adoptNamespace); err != nil && !errors.Is(err, rbd.ErrExist) {
		t.Fatal(err)
	}
	return dir
}

// makeCephCSIVolume writes what ceph-csi's CreateVolume writes, in its order:
// the csi.volume.<uuid> object, the request name's key in csi.volumes.<instance>,
// the object's omap, the image csi-vol-<uuid>, its ID in the journal, and the
// image metadata. fs (if not "") is a filesystem image file copied into the image.
func makeCephCSIVolume(t *testing.T, clusterID, namespace, instance string, size uint64, fs string, extra map[string]string) *cephCSIVol {
	t.Helper()
	io := adminIOContext(t, namespace)
	v := &cephCSIVol{uuid: uuid.NewString(), reqName: "pvc-" + uuid.NewString(), instance: instance, io: io}
	v.image = "csi-vol-" + v.uuid
	v.handle = fmt.Sprintf("0001-%04x-%s-%016x-%s", len(clusterID), clusterID, rbdPoolID(t), v.uuid)
	oid := "csi.volume." + v.uuid
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { removeCephCSIVolume(v) }) // a failed test leaves nothing in the shared cluster
	must(io.Create(oid, rados.CreateExclusive))
	must(io.SetOmap("csi.volumes."+instance, map[string][]byte{"csi.volume." + v.reqName: []byte(v.uuid)}))
	omap := map[string][]byte{"csi.volname": []byte(v.reqName), "csi.imagename": []byte(v.image), "csi.volume.owner": []byte("team-a")}
	for k, val := range extra {
		omap[k] = []byte(val)
	}
	must(io.SetOmap(oid, omap))
	opts := rbd.NewRbdImageOptions()
	defer opts.Destroy()
	must(opts.SetUint64(rbd.ImageOptionFeatures, rbd.FeatureLayering))
	must(rbd.CreateImage(io, v.image, size, opts))
	img, err := rbd.OpenImage(io, v.image, rbd.NoSnapshot)
	must(err)
	defer img.Close()
	imageID, err := img.GetId()
	must(err)
	must(io.SetOmap(oid, map[string][]byte{"csi.imageid": []byte(imageID)}))
	for k, val := range map[string]string{"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "team-a",
		"csi.storage.k8s.io/pv/name": v.reqName, "csi.ceph.com/cluster/name": "prod"} {
		must(img.SetMetadata(k, val))
	}
	if fs != "" {
		copyIntoImage(t, img, fs)
	}
	// What ceph-csi's CreateVolume returned as the volume context.
	v.context = map[string]string{"clusterID": clusterID, "pool": "rbd", "journalPool": "rbd", "imageName": v.image,
		"imageFeatures": "layering", "mounter": "rbd-fuse", "storage.kubernetes.io/csiProvisionerIdentity": "1700000000000-1234-rbd.csi.ceph.com"}
	if namespace != "" {
		v.context["radosNamespace"] = namespace
	}
	return v
}

// removeCephCSIVolume removes whatever is left of v, ignoring errors.
func removeCephCSIVolume(v *cephCSIVol) {
	rbd.RemoveImage(v.io, v.image)
	v.io.RmOmapKeys("csi.volumes."+v.instance, []string{"csi.volume." + v.reqName})
	v.io.Delete("csi.volume." + v.uuid)
	trash, _ := rbd.GetTrashList(v.io)
	for _, e := range trash {
		if e.Name == v.image {
			rbd.TrashRemove(v.io, e.Id, true)
		}
	}
}

// copyIntoImage writes the non-zero 64 KiB blocks of file into the image.
func copyIntoImage(t *testing.T, img *rbd.Image, file string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	zero := make([]byte, 64<<10)
	for off := 0; off < len(b); off += len(zero) {
		blk := b[off:min(off+len(zero), len(b))]
		if bytes.Equal(blk, zero[:len(blk)]) {
			continue
		}
		if _, err := img.WriteAt(blk, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
}

// ext4With makes an ext4 filesystem image of size bytes holding files.
func ext4With(t *testing.T, size int64, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.MkdirAll(src, 0o755)
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(src, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	file := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(file, size); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", src, file).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	return file
}

// cephCSILeftovers lists what is left of a ceph-csi volume: its image (in the
// pool or the trash), its request name's key, its journal object. A deleted
// image is purged from the trash after DeleteVolume answered (by the mgr):
// an entry there is waited for, up to a minute, before it counts.
func cephCSILeftovers(t *testing.T, v *cephCSIVol) []string {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		left := cephCSILeftoversNow(t, v, true)
		if !slices.ContainsFunc(left, func(l string) bool { return strings.HasPrefix(l, "trashed image ") }) || time.Now().After(deadline) {
			return left
		}
	}
}

// cephCSILeftoversNow is cephCSILeftovers without waiting; withTrash false
// leaves trash entries out.
func cephCSILeftoversNow(t *testing.T, v *cephCSIVol, withTrash bool) []string {
	t.Helper()
	var out []string
	names, err := rbd.GetImageNames(v.io)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if n == v.image {
			out = append(out, "image "+n)
		}
	}
	trash, err := rbd.GetTrashList(v.io)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range trash {
		if e.Name == v.image && withTrash {
			out = append(out, "trashed image "+e.Id)
		}
	}
	if _, ok := omapKey(t, v.io, "csi.volumes."+v.instance, "csi.volume."+v.reqName); ok {
		out = append(out, "key csi.volume."+v.reqName+" of csi.volumes."+v.instance)
	}
	if _, err := v.io.Stat("csi.volume." + v.uuid); err == nil {
		out = append(out, "object csi.volume."+v.uuid)
	} else if !errors.Is(err, rados.ErrNotFound) {
		t.Fatal(err)
	}
	return out
}

// A ceph-csi volume (ext4 with a file on it) is staged and published by our
// node through rbd-fuse, read, written, measured, expanded online and deleted
// by our controller; nothing of it is left, and a neighbour's journal key stays.
func TestAdoptCephCSIVolume(t *testing.T) {
	for _, tc := range []struct {
		name, cluster, namespace, instance string
	}{
		{"pool", adoptCluster, "", "default"},
		{"namespace and instance", adoptClusterNS, adoptNamespace, "storage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := adoptDriverDir(t)
			var flags []string
			if tc.instance != "default" {
				flags = append(flags, "--cephcsi-instance-id", tc.instance)
			}
			d := startDriver(t, dir, nil, flags...)
			c := ctx(t)
			fs := ext4With(t, 64<<20, map[string]string{"hello.txt": "written under ceph-csi"})
			v := makeCephCSIVolume(t, tc.cluster, tc.namespace, tc.instance, 64<<20, fs, nil)
			neighbour := "csi.volume.pvc-neighbour-" + v.uuid
			if err := v.io.SetOmap("csi.volumes."+tc.instance, map[string][]byte{neighbour: []byte(uuid.NewString())}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { v.io.RmOmapKeys("csi.volumes."+tc.instance, []string{neighbour}) })

			staging, target := filepath.Join(t.TempDir(), "staging"), filepath.Join(t.TempDir(), "pod", "mount")
			vc := mountCap("ext4", rwo)
			if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: v.handle, StagingTargetPath: staging,
				VolumeCapability: vc, VolumeContext: v.context, Secrets: secrets()}); err != nil {
				t.Fatalf("stage: %v\n%s", err, tail(d.log, 10))
			}
			if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: v.handle, StagingTargetPath: staging,
				TargetPath: target, VolumeCapability: vc, VolumeContext: v.context}); err != nil {
				t.Fatalf("publish: %v", err)
			}
			if b, err := os.ReadFile(filepath.Join(target, "hello.txt")); err != nil || string(b) != "written under ceph-csi" {
				t.Fatalf("the file ceph-csi's volume held: %q, %v", b, err)
			}
			if err := writeSync(filepath.Join(target, "after.txt"), bytes.Repeat([]byte("y"), 1<<20)); err != nil {
				t.Fatal(err)
			}
			st, err := d.node.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.handle, VolumePath: target})
			if err != nil || st.GetUsage()[0].GetUsed() < 1<<20 || st.GetUsage()[0].GetTotal() > 64<<20 {
				t.Fatalf("stats: %v %v", st, err)
			}
			r, err := d.ctrl.ControllerExpandVolume(c, &csi.ControllerExpandVolumeRequest{VolumeId: v.handle,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, Secrets: secrets()})
			if err != nil || r.GetCapacityBytes() != 128<<20 || !r.GetNodeExpansionRequired() {
				t.Fatalf("controller expand: %v %v", r, err)
			}
			if size := imageSizeIn(t, v.io, v.image); size != 128<<20 {
				t.Fatalf("image is %d bytes after expand, want %d", size, 128<<20)
			}
			ne, err := d.node.NodeExpandVolume(c, &csi.NodeExpandVolumeRequest{VolumeId: v.handle, VolumePath: target,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}})
			if hasCapSysResource() {
				if err != nil || ne.GetCapacityBytes() < 128<<20 {
					t.Fatalf("node expand: %v %v", ne, err)
				}
				st, err := d.node.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.handle, VolumePath: target})
				if err != nil || st.GetUsage()[0].GetTotal() <= 64<<20 {
					t.Fatalf("stats after growth: %v %v", st, err)
				}
			} else if status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("node expand without CAP_SYS_RESOURCE: %v", err)
			}
			if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: v.handle, Secrets: secrets()}); status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("delete of a staged volume: %v, want FailedPrecondition", err)
			}
			if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.handle, TargetPath: target}); err != nil {
				t.Fatal(err)
			}
			if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: v.handle, StagingTargetPath: staging}); err != nil {
				t.Fatal(err)
			}
			if after := readImageIn(t, v.io, v.image, 64<<20); !bytes.Contains(after, []byte("written under ceph-csi")) {
				t.Error("the old file's data is not in the image any more")
			}
			if left := cephCSILeftovers(t, v); len(left) != 3 {
				t.Fatalf("before delete: %v, want image, key and object", left)
			}
			deleteEventually(t, d, v.handle)
			if left := cephCSILeftovers(t, v); len(left) != 0 {
				t.Fatalf("left after delete: %v", left)
			}
			if _, ok := omapKey(t, v.io, "csi.volumes."+tc.instance, neighbour); !ok {
				t.Fatal("the neighbour's journal key went too")
			}
			if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: v.handle, Secrets: secrets()}); err != nil {
				t.Fatalf("second delete: %v", err)
			}
			if left := nodeLeftovers(dir); len(left) != 0 {
				t.Fatalf("left on the node:\n%s", strings.Join(left, "\n"))
			}
		})
	}
}

// A raw block ceph-csi volume: the pod sees the bytes ceph-csi's user wrote.
func TestAdoptCephCSIBlockVolume(t *testing.T) {
	dir := adoptDriverDir(t)
	d := startDriver(t, dir, nil)
	c := ctx(t)
	v := makeCephCSIVolume(t, adoptCluster, "", "default", 32<<20, "", nil)
	writeImageIn(t, v.io, v.image, []byte("raw block data"))
	staging, target := filepath.Join(t.TempDir(), "staging"), filepath.Join(t.TempDir(), "pod", "dev")
	vc := blockCap(rwo)
	if _, err := d.node.NodeStageVolume(c, &csi.NodeStageVolumeRequest{VolumeId: v.handle, StagingTargetPath: staging,
		VolumeCapability: vc, VolumeContext: v.context, Secrets: secrets()}); err != nil {
		t.Fatalf("stage: %v\n%s", err, tail(d.log, 10))
	}
	if _, err := d.node.NodePublishVolume(c, &csi.NodePublishVolumeRequest{VolumeId: v.handle, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: vc, VolumeContext: v.context}); err != nil {
		t.Fatalf("publish: %v", err)
	}
	f, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 14)
	_, err = f.ReadAt(buf, 0)
	f.Close()
	if err != nil || string(buf) != "raw block data" {
		t.Fatalf("device start: %q %v", buf, err)
	}
	st, err := d.node.NodeGetVolumeStats(c, &csi.NodeGetVolumeStatsRequest{VolumeId: v.handle, VolumePath: target})
	if err != nil || st.GetUsage()[0].GetTotal() != 32<<20 {
		t.Fatalf("block stats: %v %v", st, err)
	}
	if _, err := d.node.NodeUnpublishVolume(c, &csi.NodeUnpublishVolumeRequest{VolumeId: v.handle, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.node.NodeUnstageVolume(c, &csi.NodeUnstageVolumeRequest{VolumeId: v.handle, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	deleteEventually(t, d, v.handle)
	if left := cephCSILeftovers(t, v); len(left) != 0 {
		t.Fatalf("left after delete: %v", left)
	}
}

// omapKey reads one key of an object's omap; a missing object has no keys.
func omapKey(t *testing.T, io *rados.IOContext, oid, key string) (string, bool) {
	t.Helper()
	vals, err := io.GetOmapValues(oid, "", key, 100)
	if errors.Is(err, rados.ErrNotFound) {
		return "", false
	} else if err != nil {
		t.Fatal(err)
	}
	v, ok := vals[key]
	return string(v), ok
}

func imageSizeIn(t *testing.T, io *rados.IOContext, name string) uint64 {
	t.Helper()
	img, err := rbd.OpenImageReadOnly(io, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	size, err := img.GetSize()
	if err != nil {
		t.Fatal(err)
	}
	return size
}

func writeImageIn(t *testing.T, io *rados.IOContext, name string, b []byte) {
	t.Helper()
	img, err := rbd.OpenImage(io, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
}

// readImageIn reads the first n bytes of an image.
func readImageIn(t *testing.T, io *rados.IOContext, name string, n int) []byte {
	t.Helper()
	img, err := rbd.OpenImageReadOnly(io, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, n)
	if _, err := img.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	return buf
}

// Topology-constrained provisioning: ceph-csi keeps the request name in the
// StorageClass pool's csi.volumes.<instance> (as <image pool ID>/<UUID>) and
// the image with its csi.volume.<UUID> object (csi.journalpool set) in
// another pool. Delete removes the key from the journal pool. (client.admin:
// the restricted user's caps cover only pool rbd.)
func TestAdoptCephCSIJournalPool(t *testing.T) {
	const journalPool = "rookzmq-adopt-journal"
	adminIOContext(t, "")
	conn := adminConnOnce.conn
	for _, cmd := range []string{
		`{"prefix":"osd pool create","pool":"` + journalPool + `","pg_num":1,"pgp_num":1}`,
		`{"prefix":"osd pool application enable","pool":"` + journalPool + `","app":"rbd"}`,
	} {
		if _, info, err := conn.MonCommand([]byte(cmd)); err != nil {
			t.Fatalf("%s: %v %s", cmd, err, info)
		}
	}
	jio, err := conn.OpenIOContext(journalPool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(jio.Destroy)
	journalID, err := conn.GetPoolByName(journalPool)
	if err != nil {
		t.Fatal(err)
	}
	d := startDriver(t, adoptDriverDir(t), nil)
	v := makeCephCSIVolume(t, adoptCluster, "", "default", 16<<20, "", nil)
	key := "csi.volume." + v.reqName
	t.Cleanup(func() { jio.RmOmapKeys("csi.volumes.default", []string{key}) })
	if err := v.io.RmOmapKeys("csi.volumes.default", []string{key}); err != nil {
		t.Fatal(err)
	}
	if err := jio.SetOmap("csi.volumes.default", map[string][]byte{key: []byte(fmt.Sprintf("%016x/%s", rbdPoolID(t), v.uuid))}); err != nil {
		t.Fatal(err)
	}
	if err := v.io.SetOmap("csi.volume."+v.uuid, map[string][]byte{"csi.journalpool": []byte(fmt.Sprintf("%016x", journalID))}); err != nil {
		t.Fatal(err)
	}
	adminSecrets := map[string]string{"userID": "admin", "userKey": env["ROOKZMQ_CEPH_ADMIN_KEY"]}
	if _, err := d.ctrl.DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.handle, Secrets: adminSecrets}); err != nil {
		t.Fatal(err)
	}
	if left := cephCSILeftovers(t, v); len(left) != 0 {
		t.Fatalf("left in the image pool: %v", left)
	}
	if _, ok := omapKey(t, jio, "csi.volumes.default", key); ok {
		t.Fatalf("key %s left in the journal pool", key)
	}
}
