package cephfs

import (
	"strings"
	"testing"
)

func TestParseParamsDefaults(t *testing.T) {
	p, err := ParseParams(map[string]string{"clusterID": "c1", "fsName": "cephfs"})
	if err != nil {
		t.Fatal(err)
	}
	if p.NamePrefix != "csi-vol-" || p.Mounter != "" || p.Pool != "" {
		t.Fatalf("defaults: %+v", p)
	}
}

func TestParseParamsAll(t *testing.T) {
	p, err := ParseParams(map[string]string{
		"clusterID": "c1", "fsName": "myfs", "pool": "fast", "mounter": "fuse",
		"kernelMountOptions": "noatime,ms_mode=secure", "fuseMountOptions": "debug",
		"volumeNamePrefix": "k8s-", "ackIntervalSeconds": "30",
		"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "ns1", "csi.storage.k8s.io/pv/name": "pvc-1",
		"csi.storage.k8s.io/provisioner-secret-name": "x",
	})
	if err != nil {
		t.Fatal(err)
	}
	if p.FsName != "myfs" || p.Pool != "fast" || p.Mounter != MounterFuse || p.KernelMountOptions != "noatime,ms_mode=secure" ||
		p.FuseMountOptions != "debug" || p.NamePrefix != "k8s-" || p.PVCName != "data" || p.PVCNamespace != "ns1" || p.PVName != "pvc-1" || p.AckInterval != "30" {
		t.Fatalf("parsed %+v", p)
	}
}

func TestParseParamsRejects(t *testing.T) {
	base := func(k, v string) map[string]string {
		m := map[string]string{"clusterID": "c1", "fsName": "cephfs"}
		if v == "<delete>" {
			delete(m, k)
		} else {
			m[k] = v
		}
		return m
	}
	for _, c := range []struct {
		in   map[string]string
		want string
	}{
		{base("clusterID", "<delete>"), "clusterID is required"},
		{base("fsName", "<delete>"), "fsName is required"},
		{base("ackIntervalSeconds", "0"), "ackIntervalSeconds"},
		{base("ackIntervalSeconds", "x"), "ackIntervalSeconds"},
		{base("ackIntervalSeconds", "86401"), "ackIntervalSeconds"},
		{base("fsname", "x"), `unknown parameter "fsname"`},
		{base("imageFeatures", "layering"), `unknown parameter "imageFeatures"`},
		{base("mounter", "rbd-fuse"), `unknown mounter "rbd-fuse"`},
		{base("pool", "a/b"), "parameter pool"},
		{base("fsName", "a b"), "parameter fsName"},
		{base("volumeNamePrefix", "a/b"), "volumeNamePrefix"},
		{base("volumeNamePrefix", "_x"), "volumeNamePrefix"},
		{base("volumeNamePrefix", strings.Repeat("x", 33)), "volumeNamePrefix is 33 bytes"},
		{base("fuseMountOptions", "a b"), "fuseMountOptions"},
	} {
		_, err := ParseParams(c.in)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseParams(%v) = %v, want an error containing %q", c.in, err, c.want)
		}
	}
}

func FuzzParseParams(f *testing.F) {
	f.Add("clusterID", "c1", "fsName", "cephfs", "pool", "cephfs_data")
	f.Add("mounter", "fuse", "volumeNamePrefix", "k-", "x", "y")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2, k3, v3 string) {
		in := map[string]string{k1: v1, k2: v2, k3: v3}
		p, err := ParseParams(in)
		if err != nil {
			return
		}
		// Whatever parses names a cluster and file system, a known mounter and
		// a prefix that cannot escape the group directory.
		if p.ClusterID == "" || p.FsName == "" || strings.ContainsAny(p.FsName+p.Pool+p.NamePrefix, "/\x00") {
			t.Fatalf("ParseParams(%v) accepted %+v", in, p)
		}
		if m, err := ParseMounterName(p.Mounter); err != nil || m != p.Mounter {
			t.Fatalf("ParseParams(%v) gave mounter %q", in, p.Mounter)
		}
	})
}
