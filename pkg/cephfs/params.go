package cephfs

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// StorageClass parameter and volume context keys (ceph-csi's names).
const (
	ParamClusterID          = "clusterID"
	ParamFsName             = "fsName"
	ParamPool               = "pool"
	ParamMounter            = "mounter"
	ParamKernelMountOptions = "kernelMountOptions"
	ParamFuseMountOptions   = "fuseMountOptions"
	ParamNamePrefix         = "volumeNamePrefix"
	// ParamAckInterval makes the node flush staged volumes of the class and
	// publish an ack event every so many seconds (as for RBD).
	ParamAckInterval = rcsi.KeyAckInterval

	ParamPVCName      = rcsi.KeyPVCName
	ParamPVCNamespace = rcsi.KeyPVCNamespace
	ParamPVName       = rcsi.KeyPVName

	// Volume context keys the node reads besides the parameters.
	ctxSubvolumeName  = "subvolumeName"
	ctxSubvolumePath  = "subvolumePath"
	ctxSubvolumeGroup = "subvolumeGroup"

	// The prefix that external-provisioner owns; its keys are always accepted.
	provisionerPrefix = "csi.storage.k8s.io/"
)

// Mounter names (ceph-csi's values).
const (
	MounterKernel = "kernel"
	MounterFuse   = "fuse"
)

// DefaultNamePrefix prefixes subvolume names when volumeNamePrefix is absent (ceph-csi's).
const DefaultNamePrefix = "csi-vol-"

// maxNamePrefix keeps volume IDs under the CSI limit of 128 bytes with room
// for the cluster ID, file system and group names (a UUID takes 36).
const maxNamePrefix = 32

// Params are a CreateVolume request's parsed parameters.
type Params struct {
	ClusterID string
	FsName    string
	// Pool is the data pool of the subvolume ("" = the file system's default).
	Pool string
	// Mounter is "" (the node's default), MounterKernel or MounterFuse.
	Mounter                              string
	KernelMountOptions, FuseMountOptions string
	NamePrefix                           string
	// AckInterval is ackIntervalSeconds, as given ("" = none).
	AckInterval string
	// Kubernetes names passed by external-provisioner --extra-create-metadata.
	PVCName, PVCNamespace, PVName string
}

// ParseParams checks every parameter: an unknown key is an error naming it, so a
// typo never silently gives a different volume.
func ParseParams(in map[string]string) (Params, error) {
	p := Params{NamePrefix: DefaultNamePrefix}
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
		case ParamFsName:
			p.FsName = v
		case ParamPool:
			p.Pool = v
		case ParamMounter:
			m, err := ParseMounterName(v)
			if err != nil {
				return p, fmt.Errorf("parameter %s: %w", k, err)
			}
			p.Mounter = m
		case ParamKernelMountOptions:
			p.KernelMountOptions = v
		case ParamFuseMountOptions:
			p.FuseMountOptions = v
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
			if strings.HasPrefix(k, provisionerPrefix) {
				continue
			}
			return p, fmt.Errorf("unknown parameter %q", k)
		}
	}
	switch {
	case p.ClusterID == "":
		return p, fmt.Errorf("parameter %s is required", ParamClusterID)
	case p.FsName == "":
		return p, fmt.Errorf("parameter %s is required", ParamFsName)
	}
	if err := checkName(ParamFsName, p.FsName); err != nil {
		return p, err
	}
	if p.Pool != "" {
		if err := checkName(ParamPool, p.Pool); err != nil {
			return p, err
		}
	}
	if strings.ContainsAny(p.NamePrefix, "/@ \t\n\x00") || strings.HasPrefix(p.NamePrefix, "_") ||
		strings.HasPrefix(p.NamePrefix, ".") {
		return p, fmt.Errorf("parameter %s=%q may not contain '/', '@' or spaces, nor start with '_' or '.'", ParamNamePrefix, p.NamePrefix)
	}
	if len(p.NamePrefix) > maxNamePrefix {
		return p, fmt.Errorf("parameter %s is %d bytes, over the limit of %d", ParamNamePrefix, len(p.NamePrefix), maxNamePrefix)
	}
	for _, o := range []struct{ k, v string }{{ParamKernelMountOptions, p.KernelMountOptions}, {ParamFuseMountOptions, p.FuseMountOptions}} {
		if strings.ContainsAny(o.v, " \t\n\x00") {
			return p, fmt.Errorf("parameter %s may not contain whitespace (comma-separated options)", o.k)
		}
	}
	return p, nil
}

// checkName accepts a Ceph pool or file system name.
func checkName(param, v string) error {
	if len(v) > 255 || strings.ContainsAny(v, "/@ \t\n\x00") {
		return fmt.Errorf("parameter %s=%q is not a valid name", param, v)
	}
	return nil
}

// ParseMounterName normalises a mounter parameter value.
func ParseMounterName(s string) (string, error) {
	switch s {
	case "":
		return "", nil
	case MounterKernel, MounterFuse:
		return s, nil
	}
	return "", fmt.Errorf("unknown mounter %q (kernel or fuse)", s)
}
