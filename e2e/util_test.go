package e2e

import (
	"os"
	"testing"

	"github.com/ceph/go-ceph/rbd"
)

func imageMetadata(t *testing.T, name string) map[string]string {
	t.Helper()
	img, err := rbd.OpenImageReadOnly(admin, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	m, err := img.ListMetadata()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// kernelModule reports whether a kernel module's sysfs directory exists.
func kernelModule(name string) bool {
	_, err := os.Stat("/sys/module/" + name)
	return err == nil
}

// readImage reads n bytes at off from an image through librbd.
func readImage(t *testing.T, name string, off int64, n int) []byte {
	t.Helper()
	img, err := rbd.OpenImageReadOnly(admin, name, rbd.NoSnapshot)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, n)
	if _, err := img.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	return buf
}
