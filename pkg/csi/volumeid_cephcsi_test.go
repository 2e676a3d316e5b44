package csi

import (
	"strings"
	"testing"
)

const cephCSIUUID = "0b7a1c1e-1d2e-4f3a-9b8c-7d6e5f4a3b2c"

func TestCephCSIVolumeIDParse(t *testing.T) {
	for _, tc := range []struct {
		id   string
		want CephCSIVolumeID
	}{
		{"0001-0009-rook-ceph-0000000000000002-" + cephCSIUUID, CephCSIVolumeID{ClusterID: "rook-ceph", PoolID: 2, UUID: cephCSIUUID}},
		// ceph-csi's usual cluster ID: the Ceph fsid.
		{"0001-0024-5f003ccf-a29a-476b-9b46-97f8b0e60cc9-00000000000000ff-" + cephCSIUUID,
			CephCSIVolumeID{ClusterID: "5f003ccf-a29a-476b-9b46-97f8b0e60cc9", PoolID: 255, UUID: cephCSIUUID}},
		{"0001-0001-c-7fffffffffffffff-" + cephCSIUUID, CephCSIVolumeID{ClusterID: "c", PoolID: 1<<63 - 1, UUID: cephCSIUUID}},
	} {
		got, err := ParseCephCSIVolumeID(tc.id)
		if err != nil {
			t.Fatalf("ParseCephCSIVolumeID(%q): %v", tc.id, err)
		}
		if got != tc.want {
			t.Errorf("ParseCephCSIVolumeID(%q) = %+v, want %+v", tc.id, got, tc.want)
		}
		if s := got.String(); s != tc.id {
			t.Errorf("%+v encodes as %q, want %q", got, s, tc.id)
		}
		if !LooksLikeCephCSIVolumeID(tc.id) {
			t.Errorf("LooksLikeCephCSIVolumeID(%q) = false", tc.id)
		}
	}
}

// Every malformed ID is refused with a message naming what is wrong.
func TestCephCSIVolumeIDRejects(t *testing.T) {
	good := "0001-0009-rook-ceph-0000000000000002-" + cephCSIUUID
	for _, tc := range []struct{ id, msg string }{
		{"", "unknown encoding version"},
		{"1-02-c1-03-rbd-00--img", "unknown encoding version"},
		{"0002" + good[4:], "unknown encoding version"},
		{"0001-0009-rook-ceph", "shorter than"},
		{"0001-000A-rook-ceph-0000000000000002-" + cephCSIUUID, "malformed cluster ID length"},
		{"0001-00x9-rook-ceph-0000000000000002-" + cephCSIUUID, "malformed cluster ID length"},
		{"0001-0009_rook-ceph-0000000000000002-" + cephCSIUUID, "malformed cluster ID length"},
		{"0001-0008-rook-ceph-0000000000000002-" + cephCSIUUID, "does not match"},
		{"0001-000a-rook-ceph-0000000000000002-" + cephCSIUUID, "does not match"},
		{"0001-ffff-rook-ceph-0000000000000002-" + cephCSIUUID, "does not match"},
		{"0001-0009-rook/ceph-0000000000000002-" + cephCSIUUID, `has '/'`},
		{"0001-0009--ook-ceph-0000000000000002-" + cephCSIUUID, "starts with '-'"},
		{"0001-0009-rook ceph-0000000000000002-" + cephCSIUUID, `has ' '`},
		{"0001-0000--0000000000000002-" + cephCSIUUID + "-", "does not match"},
		{"0001-0000-" + "-0000000000000002-" + cephCSIUUID, "empty cluster ID"},
		{"0001-0009-rook-ceph_0000000000000002-" + cephCSIUUID, "missing '-' around the pool ID"},
		{"0001-0009-rook-ceph-0000000000000002_" + cephCSIUUID, "missing '-' around the pool ID"},
		{"0001-0009-rook-ceph-000000000000000G-" + cephCSIUUID, "malformed pool ID"},
		{"0001-0009-rook-ceph-000000000000000A-" + cephCSIUUID, "malformed pool ID"},
		{"0001-0009-rook-ceph-8000000000000000-" + cephCSIUUID, "malformed pool ID"},
		{"0001-0009-rook-ceph-ffffffffffffffff-" + cephCSIUUID, "malformed pool ID"},
		{"0001-0009-rook-ceph-0000000000000002-" + strings.ToUpper(cephCSIUUID), "malformed UUID"},
		{"0001-0009-rook-ceph-0000000000000002-" + strings.ReplaceAll(cephCSIUUID, "-", "x"), "malformed UUID"},
		{"0001-0009-rook-ceph-0000000000000002-0b7a1c1e-1d2e-4f3a-9b8c-7d6e5f4a3b2/", "malformed UUID"},
		{good + "x", "does not match"},
		{"0001-0041-" + strings.Repeat("c", 65) + "-0000000000000002-" + cephCSIUUID, "over the limit"},
	} {
		v, err := ParseCephCSIVolumeID(tc.id)
		if err == nil {
			t.Errorf("ParseCephCSIVolumeID(%q) = %+v, want an error", tc.id, v)
			continue
		}
		if !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("ParseCephCSIVolumeID(%q) = %v, want a message containing %q", tc.id, err, tc.msg)
		}
	}
}

// The two formats never overlap: nothing of ours looks like ceph-csi's.
func TestCephCSIAndOwnIDsDisjoint(t *testing.T) {
	own := VolumeID{ClusterID: "0001", Pool: "rbd", Name: "img"}.String()
	if LooksLikeCephCSIVolumeID(own) {
		t.Fatalf("our ID %q looks like ceph-csi's", own)
	}
	if _, err := ParseVolumeID("0001-0009-rook-ceph-0000000000000002-" + cephCSIUUID); err == nil {
		t.Fatal("a ceph-csi ID decodes as ours")
	}
}

func FuzzParseCephCSIVolumeID(f *testing.F) {
	f.Add("0001-0009-rook-ceph-0000000000000002-" + cephCSIUUID)
	f.Add("0001-0000--0000000000000000-" + cephCSIUUID)
	f.Add("0001-ffff-")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseCephCSIVolumeID(s)
		if err != nil {
			if !strings.Contains(err.Error(), "ceph-csi volume ID") {
				t.Fatalf("error %q does not say what it was parsing", err)
			}
			return
		}
		// Whatever decodes must re-encode to exactly the same string.
		if got := v.String(); got != s {
			t.Fatalf("ParseCephCSIVolumeID(%q) re-encodes as %q", s, got)
		}
		if v.PoolID < 0 || CheckCephCSIName("cluster ID", v.ClusterID) != nil || !isLowerUUID(v.UUID) {
			t.Fatalf("ParseCephCSIVolumeID(%q) accepted %+v", s, v)
		}
	})
}
