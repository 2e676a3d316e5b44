package csi

import (
	"fmt"
	"strconv"
	"strings"
)

// MaxVolumeIDLength is the longest volume ID the CSI spec lets a CO store.
const MaxVolumeIDLength = 128

const volumeIDVersion = "1"

// VolumeID names a volume without a Ceph round trip: the cluster (an entry of the
// clusters file), the pool (or CephFS file system), the RADOS namespace (or
// subvolume group) and the image (or subvolume) name. See docs/volume-id.md.
type VolumeID struct {
	ClusterID string
	Pool      string
	Namespace string
	Name      string
}

// String encodes the ID as 1-<len>-<cluster>-<len>-<pool>-<len>-<namespace>-<name>,
// each length two lowercase hex digits. The encoding never fails; use Validate
// to check the result fits the CSI limits.
func (v VolumeID) String() string {
	var b strings.Builder
	b.WriteString(volumeIDVersion)
	for _, f := range []string{v.ClusterID, v.Pool, v.Namespace} {
		fmt.Fprintf(&b, "-%02x-%s", len(f), f)
	}
	b.WriteString("-")
	b.WriteString(v.Name)
	return b.String()
}

// Validate checks that every field is usable and that the encoded ID fits.
func (v VolumeID) Validate() error {
	for _, f := range []struct{ what, val string }{
		{"cluster ID", v.ClusterID}, {"pool", v.Pool}, {"name", v.Name},
	} {
		if f.val == "" {
			return fmt.Errorf("volume ID: empty %s", f.what)
		}
	}
	for _, f := range []struct{ what, val string }{
		{"cluster ID", v.ClusterID}, {"pool", v.Pool}, {"namespace", v.Namespace}, {"name", v.Name},
	} {
		if len(f.val) > 0xff {
			return fmt.Errorf("volume ID: %s longer than 255 bytes", f.what)
		}
		if err := CheckName(f.what, f.val); err != nil {
			return fmt.Errorf("volume ID: %w", err)
		}
	}
	if n := len(v.String()); n > MaxVolumeIDLength {
		return fmt.Errorf("volume ID would be %d bytes, over the CSI limit of %d: shorten the clusterID, pool or volumeNamePrefix", n, MaxVolumeIDLength)
	}
	return nil
}

// ParseVolumeID decodes an ID made by VolumeID.String and validates it.
func ParseVolumeID(s string) (VolumeID, error) {
	if s == "" {
		return VolumeID{}, fmt.Errorf("empty volume ID")
	}
	if len(s) > MaxVolumeIDLength {
		return VolumeID{}, fmt.Errorf("volume ID is %d bytes, over the limit of %d", len(s), MaxVolumeIDLength)
	}
	rest, ok := strings.CutPrefix(s, volumeIDVersion+"-")
	if !ok {
		return VolumeID{}, fmt.Errorf("volume ID %q: unknown format (want version %s)", s, volumeIDVersion)
	}
	var fields [3]string
	for i := range fields {
		if len(rest) < 3 || rest[2] != '-' {
			return VolumeID{}, fmt.Errorf("volume ID %q: malformed length at field %d", s, i+1)
		}
		n, err := strconv.ParseUint(rest[:2], 16, 8)
		if err != nil || strings.ToLower(rest[:2]) != rest[:2] {
			return VolumeID{}, fmt.Errorf("volume ID %q: malformed length %q", s, rest[:2])
		}
		rest = rest[3:]
		if uint64(len(rest)) < n+1 || rest[n] != '-' {
			return VolumeID{}, fmt.Errorf("volume ID %q: field %d is shorter than its length", s, i+1)
		}
		fields[i], rest = rest[:n], rest[n+1:]
	}
	v := VolumeID{ClusterID: fields[0], Pool: fields[1], Namespace: fields[2], Name: rest}
	if err := v.Validate(); err != nil {
		return VolumeID{}, fmt.Errorf("volume ID %q: %w", s, err)
	}
	return v, nil
}
