package csi

import (
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestSize(t *testing.T) {
	for _, c := range []struct {
		req, lim, want int64
		code           codes.Code
	}{
		{0, 0, GiB, codes.OK},
		{1, 0, MiB, codes.OK},
		{MiB + 1, 0, 2 * MiB, codes.OK},
		{0, 10 * MiB, 10 * MiB, codes.OK},
		{5 * MiB, 5 * MiB, 5 * MiB, codes.OK},
		{-1, 0, 0, codes.InvalidArgument},
		{0, -1, 0, codes.InvalidArgument},
		{10 * MiB, 5 * MiB, 0, codes.InvalidArgument},
		{MiB + 1, MiB + 2, 0, codes.OutOfRange},
	} {
		got, err := Size(&csi.CapacityRange{RequiredBytes: c.req, LimitBytes: c.lim}, GiB, MiB)
		if status.Code(err) != c.code || (err == nil && got != c.want) {
			t.Errorf("Size(%d, %d) = %d, %v; want %d, %v", c.req, c.lim, got, err, c.want, c.code)
		}
	}
}

func TestCapabilities(t *testing.T) {
	ok := func(*csi.VolumeCapability) string { return "" }
	mount := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if err := Capabilities([]*csi.VolumeCapability{mount}, ok); err != nil {
		t.Fatal(err)
	}
	for name, caps := range map[string][]*csi.VolumeCapability{
		"empty":        nil,
		"nil entry":    {nil},
		"no mode":      {{AccessType: mount.AccessType}},
		"no type":      {{AccessMode: mount.AccessMode}},
		"mode UNKNOWN": {{AccessType: mount.AccessType, AccessMode: &csi.VolumeCapability_AccessMode{}}},
	} {
		if err := Capabilities(caps, ok); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
	if err := Capabilities([]*csi.VolumeCapability{mount}, func(*csi.VolumeCapability) string { return "nope" }); status.Code(err) != codes.InvalidArgument {
		t.Errorf("check rejected: %v", err)
	}
}

func TestCredentialsNeverShowKey(t *testing.T) {
	c, err := CredentialsFromSecrets(map[string]string{"userID": "client.csi", "userKey": "AQAA8VNlAAAAABAA6Oqqywpz1H7d5jMJlw+a0Q=="}, "userID", "userKey")
	if err != nil || c.ID != "csi" {
		t.Fatalf("%+v %v", c, err)
	}
	if s := c.String(); s != "client.csi (key redacted)" {
		t.Fatalf("String() = %q", s)
	}
	for _, secrets := range []map[string]string{{}, {"userID": "a"}, {"userKey": "k"}, {"userID": "a b", "userKey": "AQAA8VNlAAAAABAA6Oqqywpz1H7d5jMJlw+a0Q=="},
		{"userID": "a", "userKey": "AQBmYWtlZmFrZWZha2VmYWtlZmFrZWZha2U9PQ=="}, {"userID": "a", "userKey": "!!!"}} {
		if _, err := CredentialsFromSecrets(secrets, "userID", "userKey"); err == nil {
			t.Errorf("%v accepted", secrets)
		}
	}
	_, err = CredentialsFromSecrets(map[string]string{"userID": "a", "userKey": "bad key"}, "userID", "userKey")
	if err == nil || strings.Contains(err.Error(), "bad key") {
		t.Errorf("error %v leaks the key", err)
	}
}
