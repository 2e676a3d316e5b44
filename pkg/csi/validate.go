package csi

import (
	"fmt"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Units for sizes.
const (
	MiB int64 = 1 << 20
	GiB int64 = 1 << 30
)

// Required returns InvalidArgument naming field when value is empty.
func Required(field, value string) error {
	if value == "" {
		return status.Errorf(codes.InvalidArgument, "%s is required", field)
	}
	return nil
}

// VolumeIDArg decodes a request's volume ID; empty or malformed IDs are
// InvalidArgument unless notFound is set, when a malformed ID is NotFound
// (it cannot name an existing volume).
func VolumeIDArg(id string, notFound bool) (VolumeID, error) {
	if id == "" {
		return VolumeID{}, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	v, err := ParseVolumeID(id)
	if err != nil {
		if notFound {
			return v, status.Errorf(codes.NotFound, "no volume %q: %v", id, err)
		}
		return v, status.Errorf(codes.InvalidArgument, "%v", err)
	}
	return v, nil
}

// Size picks a volume size from a capacity range: required_bytes rounded up to a
// multiple of step, or def when the range is empty. Negative or inverted ranges
// are InvalidArgument; a range that the rounding cannot satisfy is OutOfRange.
func Size(r *csi.CapacityRange, def, step int64) (int64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	switch {
	case req < 0:
		return 0, status.Errorf(codes.InvalidArgument, "capacity_range.required_bytes is negative (%d)", req)
	case lim < 0:
		return 0, status.Errorf(codes.InvalidArgument, "capacity_range.limit_bytes is negative (%d)", lim)
	case lim > 0 && req > lim:
		return 0, status.Errorf(codes.InvalidArgument, "capacity_range.limit_bytes (%d) is less than required_bytes (%d)", lim, req)
	}
	size := req
	if size == 0 {
		size = def
		if lim > 0 && lim < def {
			size = lim
		}
	}
	if rem := size % step; rem != 0 {
		size += step - rem
	}
	if lim > 0 && size > lim {
		return 0, status.Errorf(codes.OutOfRange, "no size that is a multiple of %d bytes fits capacity range [%d, %d]", step, req, lim)
	}
	return size, nil
}

// CapabilityCheck returns a reason a capability is unsupported, or "".
type CapabilityCheck func(*csi.VolumeCapability) string

// Capabilities checks that caps is non-empty and that each is well formed and
// passes check; otherwise InvalidArgument names the first problem.
func Capabilities(caps []*csi.VolumeCapability, check CapabilityCheck) error {
	if len(caps) == 0 {
		return status.Error(codes.InvalidArgument, "volume_capabilities are required")
	}
	for i, c := range caps {
		if reason := capabilityProblem(c, check); reason != "" {
			return status.Errorf(codes.InvalidArgument, "volume_capabilities[%d]: %s", i, reason)
		}
	}
	return nil
}

// Capability checks a single capability like Capabilities.
func Capability(c *csi.VolumeCapability, check CapabilityCheck) error {
	if c == nil {
		return status.Error(codes.InvalidArgument, "volume_capability is required")
	}
	if reason := capabilityProblem(c, check); reason != "" {
		return status.Errorf(codes.InvalidArgument, "volume_capability: %s", reason)
	}
	return nil
}

func capabilityProblem(c *csi.VolumeCapability, check CapabilityCheck) string {
	switch {
	case c == nil:
		return "empty capability"
	case c.GetAccessMode() == nil:
		return "access_mode is required"
	case c.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_UNKNOWN:
		return "access_mode is UNKNOWN"
	case c.GetBlock() == nil && c.GetMount() == nil:
		return "access_type (block or mount) is required"
	}
	return check(c)
}

// ModeName is the access mode's name, for messages.
func ModeName(c *csi.VolumeCapability) string {
	return fmt.Sprint(c.GetAccessMode().GetMode())
}

// CheckName refuses a cluster ID, pool, RADOS namespace or image name that is
// not made of [A-Za-z0-9._-] or that starts with '-': such names reach Ceph
// tools' command lines, where a leading '-' would be read as an option.
func CheckName(what, val string) error {
	if strings.HasPrefix(val, "-") {
		return fmt.Errorf("%s %q starts with '-'", what, val)
	}
	for _, r := range val {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '_', r == '-':
		default:
			return fmt.Errorf("%s %q has %q, outside [A-Za-z0-9._-]", what, val, r)
		}
	}
	return nil
}
