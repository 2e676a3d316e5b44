package csi

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestClustersReloadAndUnknown(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.json")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(`[{"clusterID":"c1","monitors":["127.0.0.1:6789"],"rbd":{"radosNamespace":"ns"},"cephFS":{"subvolumeGroup":"csi"}}]`)
	c, err := NewClusters(path)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := c.Get("c1")
	if err != nil || cc.RBD.RadosNamespace != "ns" || cc.CephFS.SubvolumeGroup != "csi" || cc.MonHost() != "127.0.0.1:6789" {
		t.Fatalf("Get(c1) = %+v, %v", cc, err)
	}
	if _, err := c.Get("c2"); !errors.Is(err, ErrUnknownCluster) {
		t.Fatalf("Get(c2) error = %v, want ErrUnknownCluster", err)
	}
	write(`[{"clusterID":"c2","monitors":["10.0.0.1:6789","10.0.0.2:6789"]}]`)
	later := time.Now().Add(time.Second)
	os.Chtimes(path, later, later)
	if cc, err := c.Get("c2"); err != nil || cc.MonHost() != "10.0.0.1:6789,10.0.0.2:6789" {
		t.Fatalf("after edit Get(c2) = %+v, %v", cc, err)
	}
}

func TestParseClustersRejects(t *testing.T) {
	for _, s := range []string{
		`{}`, `[{"monitors":["a"]}]`, `[{"clusterID":"c"}]`,
		`[{"clusterID":"c","monitors":["a"]},{"clusterID":"c","monitors":["b"]}]`,
		`[{"clusterID":"c","monitors":["a b"]}]`,
	} {
		if _, err := ParseClusters([]byte(s)); err == nil {
			t.Errorf("ParseClusters(%s) succeeded", s)
		}
	}
}
