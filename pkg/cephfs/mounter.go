package cephfs

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// MountSpec says which subvolume to mount and how.
type MountSpec struct {
	// Monitors are the cluster's monitor addresses (the clusters file's).
	Monitors []string
	FsName   string
	// Path is the subvolume's path in the file system (as `ceph fs
	// subvolume getpath` prints it); it becomes the mount's root.
	Path  string
	Creds rcsi.Credentials
	// Options are the StorageClass's fuseMountOptions or kernelMountOptions
	// (comma-separated), checked by the mounter.
	Options  string
	ReadOnly bool
}

// Mounter mounts CephFS subvolumes on this node. Every method is safe to call
// concurrently and again after a failure or a restart of the driver: the
// state it works from is the node's mount table and processes, never memory.
type Mounter interface {
	// Name is the mounter's parameter value (MounterFuse or MounterKernel).
	Name() string
	// Available says why the mounter cannot work on this node (a
	// FailedPrecondition status), or nil.
	Available() error
	// Mount mounts spec at target; a target that already has a working mount
	// of the same subvolume is left as it is, a dead one is replaced.
	Mount(ctx context.Context, target string, spec MountSpec) error
	// Unmount undoes Mount; it succeeds when nothing is mounted at target and
	// refuses (FailedPrecondition) to unmount what another mounter made.
	Unmount(ctx context.Context, target string) error
	// Flush returns once every write through target that completed before
	// the call is durable in RADOS.
	Flush(ctx context.Context, target string) error
	// Healthy checks the mount at target within a bounded time: nil when it
	// answers, an error for which IsBroken is true on positive evidence that
	// it is lost (not mounted, "Transport endpoint is not connected", the
	// client was evicted), any other error when it cannot tell.
	Healthy(ctx context.Context, target string) error
}

// NewMounter returns the mounter named by a mounter parameter ("" is fuse,
// the one that works without a kernel module).
func NewMounter(name string) (Mounter, error) {
	switch name {
	case "", MounterFuse:
		return &fuseMounter{}, nil
	case MounterKernel:
		return &kernelMounter{}, nil
	}
	return nil, status.Errorf(codes.InvalidArgument, "unknown mounter %q (kernel or fuse)", name)
}

// ErrNotMounted is wrapped by Flush's error when nothing is mounted at the target.
var ErrNotMounted = errors.New("not mounted")

// brokenError is positive evidence that a mount is lost (an rcsi.Gone, as the
// node skeleton's Stager.Check answers it), FailedPrecondition for rcsi.Code.
type brokenError struct{ gone error }

func (e *brokenError) Error() string { return e.gone.Error() }
func (e *brokenError) Unwrap() error { return e.gone }

// GRPCStatus makes a broken mount FailedPrecondition for rcsi.Code.
func (e *brokenError) GRPCStatus() *status.Status {
	return status.New(codes.FailedPrecondition, e.gone.Error())
}

func broken(format string, args ...any) error {
	return &brokenError{rcsi.Gone(format, args...)}
}

// IsBroken tells Healthy's positive evidence of a lost mount from a failed
// check; it is rcsi.IsGone.
func IsBroken(err error) bool { return rcsi.IsGone(err) }

// codedError is an error with a gRPC code whose text is just its message, so
// that wrapping it reads well and rcsi.Code still finds the code.
type codedError struct {
	code codes.Code
	msg  string
	err  error // what it wraps, if anything
}

func (e *codedError) Error() string { return e.msg }
func (e *codedError) Unwrap() error { return e.err }

// GRPCStatus gives the error's code to status.FromError and rcsi.Code.
func (e *codedError) GRPCStatus() *status.Status { return status.New(e.code, e.msg) }

func coded(code codes.Code, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return &codedError{code: code, msg: err.Error(), err: errors.Unwrap(err)}
}

// checkTarget accepts an absolute, clean path without whitespace (the mount
// table escapes whitespace, and the path is matched against it).
func checkTarget(target string) error {
	switch {
	case target == "":
		return coded(codes.InvalidArgument, "mount target path is empty")
	case !filepath.IsAbs(target) || filepath.Clean(target) != target || target == "/":
		return coded(codes.InvalidArgument, "mount target %q is not a clean absolute path", target)
	case strings.ContainsAny(target, " \t\n\r\\\x00"):
		return coded(codes.InvalidArgument, "mount target %q contains whitespace or a backslash", target)
	}
	return nil
}

// checkSpec validates what every mounter needs.
func checkSpec(spec MountSpec) error {
	if len(spec.Monitors) == 0 {
		return coded(codes.InvalidArgument, "no monitor addresses")
	}
	for _, m := range spec.Monitors {
		if m == "" || strings.ContainsAny(m, " \t\n\r,\x00") {
			return coded(codes.InvalidArgument, "bad monitor address %q", m)
		}
	}
	if spec.FsName == "" {
		return coded(codes.InvalidArgument, "no file system name")
	}
	if err := checkName(ParamFsName, spec.FsName); err != nil {
		return coded(codes.InvalidArgument, "%v", err)
	}
	p := spec.Path
	if !strings.HasPrefix(p, "/") || filepath.Clean(p) != p || strings.ContainsAny(p, ",\n\r\x00") {
		return coded(codes.InvalidArgument, "subvolume path %q is not a clean absolute path", p)
	}
	if spec.Creds.ID == "" || spec.Creds.Key == "" {
		return coded(codes.InvalidArgument, "mount credentials are missing")
	}
	if strings.ContainsAny(spec.Creds.ID, " \t\n\r=,[]\x00") {
		return coded(codes.InvalidArgument, "%q is not a valid cephx user name", spec.Creds.ID)
	}
	// The key goes into mount data and key files: base64 only (never
	// quoted, so never part of a message).
	if strings.Trim(spec.Creds.Key, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=") != "" {
		return coded(codes.InvalidArgument, "the key of %s is not base64", spec.Creds.ID)
	}
	return nil
}
