package rbd

import (
	"slices"
	"strings"
	"testing"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// testKey is a well-formed cephx key (not a real one).
const testKey = "AQBSdFhlAAAAABAAtZkGmFNzrBc9t6FGiTFU1w=="

// Tools get the image by --pool/--namespace/--image (values joined with '='),
// the key by memfd, and neither an admin socket nor a log file.
func TestToolArgs(t *testing.T) {
	spec := ImageSpec{Pool: "p", Namespace: "ns", Image: "img", Monitors: "127.0.0.1:6789",
		Creds: rcsi.Credentials{ID: "u", Key: testKey}, ReadOnly: true}
	for name, args := range map[string][]string{
		"rbd map (krbd)": newKRBD().mapArgs(spec),
		"rbd map (nbd)":  newNBD("").mapArgs(spec),
		"rbd-fuse":       fuseArgs(spec, "/mnt/x"),
	} {
		joined := strings.Join(args, " ")
		for _, want := range []string{"--admin-socket=", "--log-file=", rcsi.KeyFileArg, "--id=u", "--namespace=ns"} {
			if !slices.Contains(args, want) {
				t.Errorf("%s: %q lacks %s", name, joined, want)
			}
		}
		if strings.Contains(joined, testKey) {
			t.Errorf("%s: the key is on the command line", name)
		}
		for _, a := range args {
			if a == "p/ns/img" || a == "p/img" || a == "img" || a == "p" || a == "ns" {
				t.Errorf("%s: %q passes %q as a separate argument", name, joined, a)
			}
		}
	}
	if a := newKRBD().mapArgs(spec); !slices.Contains(a, "--pool=p") || !slices.Contains(a, "--image=img") || !slices.Contains(a, "--device-type=krbd") {
		t.Errorf("rbd map args %v", a)
	}
	if a := fuseArgs(spec, "/mnt/x"); !slices.Contains(a, "--poolname=p") || !slices.Contains(a, "--image=img") || a[len(a)-1] != "/mnt/x" {
		t.Errorf("rbd-fuse args %v", a)
	}
}

func TestFindMapped(t *testing.T) {
	spec := ImageSpec{Pool: "rbd", Image: "a"}
	list := `[{"id":"0","pool":"rbd","namespace":"","name":"b","snap":"-","device":"/dev/rbd0"},
		{"id":"1","pool":"rbd","namespace":"","name":"a","snap":"-","device":"/dev/rbd1"}]`
	if dev, err := findMapped([]byte(list), spec); dev != "/dev/rbd1" || err != nil {
		t.Fatalf("findMapped = %q %v", dev, err)
	}
	for _, out := range []string{"[]", "", "\n"} {
		if dev, err := findMapped([]byte(out), spec); dev != "" || err != nil {
			t.Fatalf("findMapped(%q) = %q %v, want not mapped", out, dev, err)
		}
	}
	for _, out := range []string{"rbd: error", "[{", "{}"} {
		if _, err := findMapped([]byte(out), spec); err == nil {
			t.Fatalf("findMapped(%q) = nil error: unparseable output read as not mapped", out)
		}
	}
}
