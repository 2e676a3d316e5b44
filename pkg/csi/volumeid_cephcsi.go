package csi

import (
	"fmt"
	"strconv"
	"strings"
)

// cephCSIVersion is the only encoding version ceph-csi has ever written.
const cephCSIVersion = "0001"

// cephCSIMinLength is the length of a ceph-csi ID with an empty cluster ID:
// version, cluster ID length, pool ID and UUID, each followed or preceded by '-'.
const cephCSIMinLength = 4 + 1 + 4 + 1 + 1 + 16 + 1 + 36

// CephCSIVolumeID is a volume ID made by ceph-csi's RBD driver:
// 0001-<cluster ID length>-<cluster ID>-<pool ID>-<UUID>, lengths and pool ID
// in lowercase hex. The UUID names the volume's journal object
// csi.volume.<UUID>. See docs/migrating-from-ceph-csi.md.
type CephCSIVolumeID struct {
	ClusterID string
	PoolID    int64
	UUID      string
}

// String encodes the ID as ceph-csi does.
func (v CephCSIVolumeID) String() string {
	return fmt.Sprintf("%s-%04x-%s-%016x-%s", cephCSIVersion, len(v.ClusterID), v.ClusterID, uint64(v.PoolID), v.UUID)
}

// LooksLikeCephCSIVolumeID says whether s is meant as a ceph-csi ID (it starts
// with ceph-csi's version field); ParseCephCSIVolumeID says whether it is one.
func LooksLikeCephCSIVolumeID(s string) bool {
	return strings.HasPrefix(s, cephCSIVersion+"-")
}

// ParseCephCSIVolumeID decodes a ceph-csi RBD volume ID strictly: only what
// ceph-csi writes is accepted, so a decoded ID re-encodes to exactly s.
func ParseCephCSIVolumeID(s string) (CephCSIVolumeID, error) {
	var v CephCSIVolumeID
	fail := func(format string, args ...any) (CephCSIVolumeID, error) {
		return CephCSIVolumeID{}, fmt.Errorf("ceph-csi volume ID %q: %s", s, fmt.Sprintf(format, args...))
	}
	if len(s) > MaxVolumeIDLength {
		return CephCSIVolumeID{}, fmt.Errorf("ceph-csi volume ID is %d bytes, over the limit of %d", len(s), MaxVolumeIDLength)
	}
	if !LooksLikeCephCSIVolumeID(s) {
		return fail("unknown encoding version (want %s)", cephCSIVersion)
	}
	if len(s) < cephCSIMinLength {
		return fail("%d bytes, shorter than the %d of the fixed fields", len(s), cephCSIMinLength)
	}
	rest := s[len(cephCSIVersion)+1:]
	n, err := lowerHex(rest[:4], 16)
	if err != nil || rest[4] != '-' {
		return fail("malformed cluster ID length %q (want 4 lowercase hex digits and '-')", rest[:5])
	}
	rest = rest[5:]
	// What must follow the cluster ID: '-', pool ID, '-', UUID.
	if uint64(len(rest)) != n+1+16+1+36 {
		return fail("cluster ID length %d does not match the ID's length", n)
	}
	v.ClusterID, rest = rest[:n], rest[n:]
	if err := CheckCephCSIName("cluster ID", v.ClusterID); err != nil {
		return fail("%v", err)
	}
	if rest[0] != '-' || rest[17] != '-' {
		return fail("missing '-' around the pool ID")
	}
	pool, err := lowerHex(rest[1:17], 63)
	if err != nil {
		return fail("malformed pool ID %q (want 16 lowercase hex digits below 8000000000000000)", rest[1:17])
	}
	v.PoolID = int64(pool)
	v.UUID = rest[18:]
	if !isLowerUUID(v.UUID) {
		return fail("malformed UUID %q (want 8-4-4-4-12 lowercase hex digits)", v.UUID)
	}
	return v, nil
}

// lowerHex parses lowercase hex digits into a number below 1<<bits.
func lowerHex(s string, bits int) (uint64, error) {
	if strings.ToLower(s) != s || strings.ContainsAny(s, "+-_xX") {
		return 0, fmt.Errorf("not lowercase hex: %q", s)
	}
	return strconv.ParseUint(s, 16, bits)
}

func isLowerUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// CheckCephCSIName accepts what ceph-csi writes in IDs and journals and what is
// safe on a tool's command line: [A-Za-z0-9._-], not empty, no leading '-'.
func CheckCephCSIName(what, s string) error {
	if s == "" {
		return fmt.Errorf("empty %s", what)
	}
	return CheckName(what, s)
}
