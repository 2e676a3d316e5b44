package rbd

import (
	"strings"
	"testing"

	"github.com/ceph/go-ceph/rbd"
)

func TestParseParamsDefaults(t *testing.T) {
	p, err := ParseParams(map[string]string{"clusterID": "c1", "pool": "rbd"})
	if err != nil {
		t.Fatal(err)
	}
	if p.FsType != "ext4" || p.NamePrefix != "csi-vol-" || p.Features != rbd.FeatureLayering || p.Mounter != "" {
		t.Fatalf("defaults: %+v", p)
	}
}

func TestParseParamsAll(t *testing.T) {
	p, err := ParseParams(map[string]string{
		"clusterID": "c1", "pool": "replicapool", "imageFeatures": "layering,exclusive-lock,object-map,fast-diff",
		"mounter": "rbd", "csi.storage.k8s.io/fstype": "xfs", "volumeNamePrefix": "k8s-",
		"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "ns1", "csi.storage.k8s.io/pv/name": "pvc-1",
		"csi.storage.k8s.io/provisioner-secret-name": "x", // external-provisioner's own keys pass
		"imageFormat": "2", "encrypted": "false", // ceph-csi defaults pass
	})
	if err != nil {
		t.Fatal(err)
	}
	want := rbd.FeatureLayering | rbd.FeatureExclusiveLock | rbd.FeatureObjectMap | rbd.FeatureFastDiff
	if p.Pool != "replicapool" || p.Features != want || p.Mounter != MounterKRBD || p.FsType != "xfs" ||
		p.NamePrefix != "k8s-" || p.PVCName != "data" || p.PVCNamespace != "ns1" || p.PVName != "pvc-1" {
		t.Fatalf("parsed %+v", p)
	}
}

func TestParseParamsRejects(t *testing.T) {
	base := func(k, v string) map[string]string {
		m := map[string]string{"clusterID": "c1", "pool": "rbd"}
		if v == "<delete>" {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	for _, c := range []struct {
		in   map[string]string
		want string // must appear in the message
	}{
		{base("clusterID", "<delete>"), "clusterID is required"},
		{base("pool", "<delete>"), "pool is required"},
		{base("pol", "rbd"), `unknown parameter "pol"`},
		{base("imageFeatures", "layering,bogus"), `unknown image feature "bogus"`},
		{base("imageFeatures", "layering,object-map"), "object-map needs exclusive-lock"},
		{base("mounter", "nfs"), `unknown mounter "nfs"`},
		{base("csi.storage.k8s.io/fstype", "btrfs"), `"btrfs" is not supported`},
		{base("encrypted", "true"), "encrypted"},
		{base("thickProvision", "true"), "thickProvision"},
		{base("volumeNamePrefix", "a/b"), "volumeNamePrefix"},
	} {
		_, err := ParseParams(c.in)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseParams(%v) = %v, want an error containing %q", c.in, err, c.want)
		}
	}
}

func FuzzParseParams(f *testing.F) {
	f.Add("clusterID", "c1", "pool", "rbd", "imageFeatures", "layering")
	f.Add("mounter", "rbd-fuse", "csi.storage.k8s.io/fstype", "xfs", "x", "y")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2, k3, v3 string) {
		in := map[string]string{k1: v1, k2: v2, k3: v3}
		p, err := ParseParams(in)
		if err != nil {
			return
		}
		// Whatever parses names a cluster and pool, a known filesystem and a known mounter.
		if p.ClusterID == "" || p.Pool == "" || CheckFsType(p.FsType) != nil {
			t.Fatalf("ParseParams(%v) accepted %+v", in, p)
		}
		if p.Mounter != "" {
			if _, err := ParseMounterName(p.Mounter); err != nil {
				t.Fatalf("ParseParams(%v) gave mounter %q", in, p.Mounter)
			}
		}
	})
}
