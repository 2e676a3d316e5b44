package rbd

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/ceph/go-ceph/rbd"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// StorageClass parameter and volume context keys (ceph-csi's names).
const (
	ParamClusterID     = "clusterID"
	ParamPool          = "pool"
	ParamImageFeatures = "imageFeatures"
	ParamMounter       = "mounter"
	ParamFsType        = "csi.storage.k8s.io/fstype"
	ParamNamePrefix    = "volumeNamePrefix"
	// ParamAckInterval makes the node flush staged volumes of the class and
	// publish an ack event every so many seconds.
	ParamAckInterval = rcsi.KeyAckInterval

	ParamPVCName      = rcsi.KeyPVCName
	ParamPVCNamespace = rcsi.KeyPVCNamespace
	ParamPVName       = rcsi.KeyPVName

	ctxImageName      = "imageName"
	ctxRadosNamespace = "radosNamespace"
	// ctxFsType is the StorageClass filesystem, used when the capability names none.
	ctxFsType = rcsi.KeyFsType

	// The prefix that external-provisioner owns; its keys are always accepted.
	provisionerPrefix = "csi.storage.k8s.io/"
)

// Defaults for absent parameters.
const (
	DefaultFsType     = "ext4"
	DefaultNamePrefix = "csi-vol-"
	DefaultFeatures   = "layering"
)

// ceph-csi parameters not implemented yet: accepted only with ceph-csi's default.
var cephCSIDefaults = map[string]string{
	"imageFormat":              "2",
	"dataPool":                 "",
	"thickProvision":           "false",
	"encrypted":                "false",
	"mapOptions":               "",
	"unmapOptions":             "",
	"tryOtherMounters":         "false",
	"topologyConstrainedPools": "",
	"mkfsOptions":              "",
	"stripeUnit":               "",
	"stripeCount":              "",
	"objectSize":               "",
	"cephLogStrategy":          "remove",
}

var featureBits = map[string]uint64{
	rbd.FeatureNameLayering:      rbd.FeatureLayering,
	rbd.FeatureNameExclusiveLock: rbd.FeatureExclusiveLock,
	rbd.FeatureNameObjectMap:     rbd.FeatureObjectMap,
	rbd.FeatureNameFastDiff:      rbd.FeatureFastDiff,
	rbd.FeatureNameDeepFlatten:   rbd.FeatureDeepFlatten,
	rbd.FeatureNameJournaling:    rbd.FeatureJournaling,
}

// Params are a CreateVolume request's parsed parameters.
type Params struct {
	ClusterID  string
	Pool       string
	Features   uint64
	Mounter    string // "" means the node's default
	FsType     string
	NamePrefix string
	// AckInterval is ackIntervalSeconds, as given ("" = none).
	AckInterval string
	// Kubernetes names passed by external-provisioner --extra-create-metadata.
	PVCName, PVCNamespace, PVName string
}

// ParseParams checks every parameter: an unknown key is an error naming it, so a
// typo never silently gives a different volume.
func ParseParams(in map[string]string) (Params, error) {
	p := Params{FsType: DefaultFsType, NamePrefix: DefaultNamePrefix}
	features := DefaultFeatures
	keys := make([]string, 0, len(in))
	for k := range in {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := in[k]
		switch k {
		case ParamClusterID:
			p.ClusterID = v
		case ParamPool:
			p.Pool = v
		case ParamImageFeatures:
			features = v
		case ParamMounter:
			m, err := ParseMounterName(v)
			if err != nil {
				return p, fmt.Errorf("parameter %s: %w", k, err)
			}
			p.Mounter = m
		case ParamFsType:
			if v != "" {
				p.FsType = v
			}
		case ParamNamePrefix:
			p.NamePrefix = v
		case ParamAckInterval:
			if n, err := strconv.Atoi(v); err != nil || n < 1 || n > 86400 {
				return p, fmt.Errorf("parameter %s=%q: want whole seconds from 1 to 86400", k, v)
			}
			p.AckInterval = v
		case ParamPVCName:
			p.PVCName = v
		case ParamPVCNamespace:
			p.PVCNamespace = v
		case ParamPVName:
			p.PVName = v
		default:
			if def, known := cephCSIDefaults[k]; known {
				if v != def {
					return p, fmt.Errorf("parameter %s=%q is not supported yet (only ceph-csi's default %q is)", k, v, def)
				}
				continue
			}
			if strings.HasPrefix(k, provisionerPrefix) {
				continue
			}
			return p, fmt.Errorf("unknown parameter %q", k)
		}
	}
	if p.ClusterID == "" {
		return p, fmt.Errorf("parameter %s is required", ParamClusterID)
	}
	if p.Pool == "" {
		return p, fmt.Errorf("parameter %s is required", ParamPool)
	}
	if err := CheckFsType(p.FsType); err != nil {
		return p, fmt.Errorf("parameter %s: %w", ParamFsType, err)
	}
	if strings.ContainsAny(p.NamePrefix, "/@ \t\n") {
		return p, fmt.Errorf("parameter %s=%q may not contain '/', '@' or spaces", ParamNamePrefix, p.NamePrefix)
	}
	var err error
	if p.Features, err = ParseFeatures(features); err != nil {
		return p, fmt.Errorf("parameter %s: %w", ParamImageFeatures, err)
	}
	return p, nil
}

// ParseFeatures turns a comma-separated feature list into image feature bits,
// checking the dependencies librbd enforces.
func ParseFeatures(s string) (uint64, error) {
	var bits uint64
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		b, ok := featureBits[name]
		if !ok {
			return 0, fmt.Errorf("unknown image feature %q", name)
		}
		bits |= b
	}
	need := []struct {
		f, dep uint64
		fn, dn string
	}{
		{rbd.FeatureObjectMap, rbd.FeatureExclusiveLock, "object-map", "exclusive-lock"},
		{rbd.FeatureFastDiff, rbd.FeatureObjectMap, "fast-diff", "object-map"},
		{rbd.FeatureJournaling, rbd.FeatureExclusiveLock, "journaling", "exclusive-lock"},
	}
	for _, n := range need {
		if bits&n.f != 0 && bits&n.dep == 0 {
			return 0, fmt.Errorf("image feature %s needs %s", n.fn, n.dn)
		}
	}
	return bits, nil
}

// CheckFsType accepts the filesystems the node can make and grow.
func CheckFsType(fs string) error {
	switch fs {
	case "ext4", "xfs":
		return nil
	}
	return fmt.Errorf("filesystem %q is not supported (ext4 or xfs)", fs)
}
