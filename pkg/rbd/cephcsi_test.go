package rbd

import (
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const testUUID = "0b7a1c1e-1d2e-4f3a-9b8c-7d6e5f4a3b2c"

// Bad ceph-csi IDs get the codes of bad IDs of ours: InvalidArgument on the
// node, NotFound where the call asks about an existing volume.
func TestParseHandle(t *testing.T) {
	v, h, err := parseHandle("0001-0009-rook-ceph-0000000000000002-"+testUUID, false)
	if err != nil || h == nil || h.PoolID != 2 || h.UUID != testUUID || v.ClusterID != "rook-ceph" || v.Pool != "" {
		t.Fatalf("parseHandle of a ceph-csi ID = %+v, %+v, %v", v, h, err)
	}
	v, h, err = parseHandle("1-02-c1-03-rbd-00--img", false)
	if err != nil || h != nil || v.Pool != "rbd" || v.Name != "img" {
		t.Fatalf("parseHandle of our ID = %+v, %+v, %v", v, h, err)
	}
	for _, tc := range []struct {
		id       string
		notFound bool
		code     codes.Code
		msg      string
	}{
		{"0001-0009-rook-ceph-000000000000000G-" + testUUID, false, codes.InvalidArgument, "malformed pool ID"},
		{"0001-0009-rook-ceph-000000000000000G-" + testUUID, true, codes.NotFound, "malformed pool ID"},
		{"0001-0009-rook-ceph-0000000000000002-" + testUUID[:35], false, codes.InvalidArgument, "does not match"},
		{"0001-0009-rook/ceph-0000000000000002-" + testUUID, false, codes.InvalidArgument, "outside [A-Za-z0-9._-]"},
		{"", false, codes.InvalidArgument, "volume_id is required"},
		{"garbage", true, codes.NotFound, "garbage"},
	} {
		_, _, err := parseHandle(tc.id, tc.notFound)
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.msg) {
			t.Errorf("parseHandle(%q, %v) = %v, want %v naming %q", tc.id, tc.notFound, err, tc.code, tc.msg)
		}
	}
}

func TestDecodePoolID(t *testing.T) {
	if id, err := decodePoolID("000000000000002a"); err != nil || id != 42 {
		t.Fatalf("decodePoolID = %d, %v", id, err)
	}
	for _, s := range []string{"", "2a", "00000000000000zz", "8000000000000000", "00000000000000002a"} {
		if _, err := decodePoolID(s); err == nil {
			t.Errorf("decodePoolID(%q) accepted", s)
		}
	}
}

func TestCheckCephCSIInstance(t *testing.T) {
	if err := CheckCephCSIInstance("default"); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"", "a b", "a/b", "a\nb"} {
		if CheckCephCSIInstance(s) == nil {
			t.Errorf("CheckCephCSIInstance(%q) accepted", s)
		}
	}
}
