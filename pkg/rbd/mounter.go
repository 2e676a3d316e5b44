package rbd

import (
	"context"
	"fmt"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Mounter names (ceph-csi's values; "rbd" and "" mean krbd).
const (
	MounterKRBD    = "krbd"
	MounterNBD     = "rbd-nbd"
	MounterFuse    = "rbd-fuse"
	mounterCephCSI = "rbd"
)

// ParseMounterName normalises a mounter parameter value.
func ParseMounterName(s string) (string, error) {
	switch s {
	case "", mounterCephCSI, MounterKRBD:
		return MounterKRBD, nil
	case MounterNBD, MounterFuse:
		return s, nil
	}
	return "", fmt.Errorf("unknown mounter %q (krbd, rbd-nbd or rbd-fuse)", s)
}

// ImageSpec says which image to map and how to reach it.
type ImageSpec struct {
	Pool, Namespace, Image string
	Monitors               string // mon_host form
	Creds                  rcsi.Credentials
	ReadOnly               bool
}

// Mapping is what a Mounter made: a block device and what it needs to undo it.
// It is stored in the stage record, so it must survive a driver restart.
type Mapping struct {
	Mounter string `json:"mounter"`
	Device  string `json:"device"`
	// The image, so kernel mappings are found by image, never by a device
	// path that may belong to another image by now.
	Pool      string `json:"pool,omitempty"`
	Namespace string `json:"namespace,omitempty"`
	Image     string `json:"image,omitempty"`
	// FuseDir is where rbd-fuse exposes the image (rbd-fuse only).
	FuseDir string `json:"fuseDir,omitempty"`
	// Pid is the userspace process serving the device (rbd-fuse only).
	Pid int `json:"pid,omitempty"`
}

// Mounter attaches RBD images to this node as block devices.
type Mounter interface {
	// Name is the mounter's parameter value.
	Name() string
	// Available says why the mounter cannot work on this node, or nil.
	Available() error
	// Map attaches the image; workDir is a private directory for this volume's stage.
	Map(ctx context.Context, spec ImageSpec, workDir string) (Mapping, error)
	// Unmap detaches what Map made; it succeeds if that is already gone, and
	// fails (never succeeds) when it cannot tell.
	Unmap(ctx context.Context, m Mapping) error
	// Refresh makes the device pick up a grown image of at least minSize bytes
	// (0: whatever size the image has now).
	Refresh(ctx context.Context, m Mapping, minSize int64) error
	// Check returns nil for a working mapping, an rcsi.Gone error on positive
	// evidence that it is lost, and any other error when it cannot tell.
	Check(ctx context.Context, m Mapping) error
}
