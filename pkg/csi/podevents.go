package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// PodEventsDriverName is the CSI driver name of the per-pod event volume.
const PodEventsDriverName = "events.rookzmq.io"

// Volume attributes of the per-pod event volume.
const (
	attrScope    = "scope"
	ctxEphemeral = "csi.storage.k8s.io/ephemeral"
)

// PodEvents serves the per-pod event endpoints: a CSI ephemeral inline volume
// whose NodePublishVolume binds events.sock and control.sock, scoped to the
// pod's namespace (or to the pod), into the pod's target directory.
//
// The sockets are bound in a short directory under Dir and that directory is
// bind-mounted at the target: kubelet's target paths are too long for a unix
// socket address (108 bytes), while the pod reaches them by a short path.
type PodEvents struct {
	csi.UnimplementedNodeServer
	NodeID string
	Bridge *zmqbridge.Bridge
	// Dir holds the per-pod socket directories and their records.
	Dir string
	// PodVolumes lists volume IDs already published to a pod (pod scope).
	PodVolumes func(podUID string) []string
	// MaxPerPod bounds one pod's endpoints (its events volumes); 0: 4.
	MaxPerPod int
	// Pods, if set, checks each pod against the API server before serving it.
	Pods PodVerifier

	mounts mount.Interface
	locks  KeyLocks
	mu     sync.Mutex
	byPod  map[string]map[string]bool // pod UID -> its endpoints' keys
}

// Flags that set the endpoint caps, named in the errors past them.
const (
	FlagMaxPodEndpoints = "--events-max-pod-endpoints"
	FlagMaxEndpoints    = "--events-max-endpoints"
)

// DefaultMaxPodEndpoints is PodEvents.MaxPerPod's default.
const DefaultMaxPodEndpoints = 4

// PodVerifier checks that a pod of that namespace, name and UID exists on
// this node.
type PodVerifier interface {
	VerifyPod(ctx context.Context, namespace, name, uid string) error
}

// podEndpoint is the on-disk record of one pod endpoint.
type podEndpoint struct {
	VolumeID, Target, Namespace, PodUID, Scope string
}

// Start prepares Dir and re-binds the endpoints of pods published before a
// restart (their bind mounts outlive the process).
func (p *PodEvents) Start() error {
	p.mounts = mount.New("")
	p.byPod = map[string]map[string]bool{}
	if err := os.MkdirAll(p.Dir, 0o700); err != nil {
		return err
	}
	recs, _ := filepath.Glob(filepath.Join(p.Dir, "*.json"))
	for _, path := range recs {
		var r podEndpoint
		b, err := os.ReadFile(path)
		if err != nil || json.Unmarshal(b, &r) != nil {
			continue
		}
		key := p.key(r.Target)
		if mnt, err := p.mounts.IsMountPoint(r.Target); err != nil || !mnt {
			p.forget(key) // unpublished while we were down
			continue
		}
		p.count(r.PodUID, key, true)
		if err := p.bind(key, r); err != nil {
			klog.ErrorS(err, "re-binding a pod's event endpoint", "target", r.Target)
		}
	}
	return nil
}

// count adds or removes one of a pod's endpoints.
func (p *PodEvents) count(podUID, key string, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		if p.byPod[podUID] == nil {
			p.byPod[podUID] = map[string]bool{}
		}
		p.byPod[podUID][key] = true
		return
	}
	delete(p.byPod[podUID], key)
	if len(p.byPod[podUID]) == 0 {
		delete(p.byPod, podUID)
	}
}

// reserve counts a new endpoint of a pod unless the pod has MaxPerPod.
func (p *PodEvents) reserve(podUID, key string) error {
	max := p.MaxPerPod
	if max <= 0 {
		max = DefaultMaxPodEndpoints
	}
	p.mu.Lock()
	n := len(p.byPod[podUID])
	p.mu.Unlock()
	if n >= max {
		return status.Errorf(codes.ResourceExhausted, "pod %s already has %d %s volumes, the most %s=%d allows", podUID, n, PodEventsDriverName, FlagMaxPodEndpoints, max)
	}
	p.count(podUID, key, true)
	return nil
}

// podUIDFromTarget is the pod UID in kubelet's target path
// (.../pods/<uid>/volumes/...), or "".
func podUIDFromTarget(target string) string {
	parts := strings.Split(filepath.Clean(target), "/")
	for i := len(parts) - 3; i >= 0; i-- {
		if parts[i] == "pods" && parts[i+2] == "volumes" {
			return parts[i+1]
		}
	}
	return ""
}

func (p *PodEvents) key(target string) string {
	sum := sha256.Sum256([]byte(target))
	return hex.EncodeToString(sum[:6])
}

// bind makes the pod's socket directory and binds its endpoint there.
func (p *PodEvents) bind(key string, r podEndpoint) error {
	dir := filepath.Join(p.Dir, key)
	if err := rootOnlyDir(dir); err != nil {
		return err
	}
	scope := zmqbridge.Scope{Namespace: r.Namespace}
	if r.Scope == "pod" {
		scope.PodUID = r.PodUID
		if p.PodVolumes != nil {
			scope.Volumes = p.PodVolumes(r.PodUID)
		}
	}
	return p.Bridge.AddEndpoint(key, zmqbridge.Endpoint{
		Events: "ipc://" + filepath.Join(dir, "events.sock"), Control: "ipc://" + filepath.Join(dir, "control.sock"),
		Mode: 0o666, Scope: scope, SendHWM: 1000, Guard: true,
	})
}

// rootOnlyDir makes dir a directory that only root may write and anyone
// may search (the pod's user, whoever it is, must reach the sockets). Its
// mode is set through a descriptor opened without following symlinks.
func rootOnlyDir(dir string) error {
	if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
		return err
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Fchown(fd, 0, 0); err != nil {
		return fmt.Errorf("owning %s: %w", dir, err)
	}
	return unix.Fchmod(fd, 0o755)
}

// NodePublishVolume binds the pod's endpoints and mounts them at the target.
func (p *PodEvents) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	if err := Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target := req.GetTargetPath()
	if err := Required("target_path", target); err != nil {
		return nil, err
	}
	mnt := req.GetVolumeCapability().GetMount()
	if mnt == nil {
		return nil, status.Error(codes.InvalidArgument, "volume_capability must be a mount volume")
	}
	if mnt.GetFsType() != "" || mnt.GetVolumeMountGroup() != "" {
		return nil, status.Errorf(codes.InvalidArgument, "%s volumes take no fsType or volume_mount_group (fsType %q, volume_mount_group %q): its CSIDriver needs fsGroupPolicy: None",
			PodEventsDriverName, mnt.GetFsType(), mnt.GetVolumeMountGroup())
	}
	vc := req.GetVolumeContext()
	r := podEndpoint{VolumeID: req.GetVolumeId(), Target: target, Namespace: vc[KeyPodNamespace], PodUID: vc[KeyPodUID], Scope: vc[attrScope]}
	for k := range vc {
		if k != attrScope && !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return nil, status.Errorf(codes.InvalidArgument, "unknown volume attribute %q (only %q)", k, attrScope)
		}
	}
	switch {
	case vc[ctxEphemeral] != "true":
		return nil, status.Errorf(codes.InvalidArgument, "%s volumes are CSI ephemeral inline volumes only", PodEventsDriverName)
	case r.Namespace == "" || r.PodUID == "" || vc[KeyPodName] == "":
		return nil, status.Errorf(codes.InvalidArgument, "pod name, namespace or UID missing from the volume context (%s, %s, %s): the CSIDriver %s needs podInfoOnMount: true",
			KeyPodName, KeyPodNamespace, KeyPodUID, PodEventsDriverName)
	case podUIDFromTarget(target) != r.PodUID:
		return nil, status.Errorf(codes.InvalidArgument, "pod UID %q is not the one in the target path %s (kubelet's .../pods/<uid>/volumes/...)", r.PodUID, target)
	case r.Scope == "":
		r.Scope = "namespace"
	case r.Scope != "namespace" && r.Scope != "pod":
		return nil, status.Errorf(codes.InvalidArgument, "volume attribute scope=%q: want namespace or pod", r.Scope)
	}
	key := p.key(target)
	unlock, err := p.locks.Lock(ctx, key)
	if err != nil {
		return nil, status.Error(codes.Aborted, "an operation on this target is in progress")
	}
	defer unlock()
	// IsMountPoint reads the mount table: a bind mount from the same
	// filesystem has the same device number as its parent.
	if mnt, err := p.mounts.IsMountPoint(target); err == nil && mnt {
		return &csi.NodePublishVolumeResponse{}, nil // already published
	}
	if p.Pods != nil {
		if err := p.Pods.VerifyPod(ctx, r.Namespace, vc[KeyPodName], r.PodUID); err != nil {
			return nil, err
		}
	}
	if err := p.reserve(r.PodUID, key); err != nil {
		return nil, err
	}
	fail := func(err error) (*csi.NodePublishVolumeResponse, error) {
		p.count(r.PodUID, key, false)
		return nil, err
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return fail(status.Errorf(codes.Internal, "creating target %s: %v", target, err))
	}
	b, _ := json.Marshal(r)
	if err := os.WriteFile(filepath.Join(p.Dir, key+".json"), b, 0o600); err != nil {
		return fail(status.Error(codes.Internal, err.Error()))
	}
	if err := p.bind(key, r); err != nil {
		p.forget(key)
		if errors.Is(err, zmqbridge.ErrTooManyEndpoints) {
			return fail(status.Errorf(codes.ResourceExhausted, "this node serves the most %s volumes %s allows: %v", PodEventsDriverName, FlagMaxEndpoints, err))
		}
		return fail(status.Errorf(codes.Internal, "binding the pod's event sockets: %v", err))
	}
	// Read-only: the pod connects to the sockets (a connect needs no write
	// to the mount) but cannot create, remove or replace anything there.
	if err := p.mounts.Mount(filepath.Join(p.Dir, key), target, "", []string{"bind", "ro"}); err != nil {
		p.Bridge.RemoveEndpoint(key)
		p.forget(key)
		return fail(status.Errorf(codes.Internal, "mounting the event sockets at %s: %v", target, err))
	}
	klog.InfoS("pod event endpoint published", "pod", r.Namespace+"/"+r.PodUID, "scope", r.Scope, "target", target)
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target and closes the pod's endpoints.
func (p *PodEvents) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if err := Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	target := req.GetTargetPath()
	if err := Required("target_path", target); err != nil {
		return nil, err
	}
	key := p.key(target)
	unlock, err := p.locks.Lock(ctx, key)
	if err != nil {
		return nil, status.Error(codes.Aborted, "an operation on this target is in progress")
	}
	defer unlock()
	if err := mount.CleanupMountPoint(target, p.mounts, true); err != nil {
		// Only sockets live there: a lazy unmount loses nothing if someone on
		// the host still holds the directory open.
		if uerr := unix.Unmount(target, unix.MNT_DETACH); uerr != nil {
			return nil, status.Errorf(codes.Internal, "unmounting %s: %v", target, err)
		}
		os.Remove(target)
	}
	p.Bridge.RemoveEndpoint(key)
	p.forgetCount(key)
	p.forget(key)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// forgetCount removes an endpoint from its pod's count.
func (p *PodEvents) forgetCount(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for uid, keys := range p.byPod {
		if keys[key] {
			delete(keys, key)
			if len(keys) == 0 {
				delete(p.byPod, uid)
			}
		}
	}
}

// forget removes an endpoint's directory and record.
func (p *PodEvents) forget(key string) {
	os.RemoveAll(filepath.Join(p.Dir, key))
	os.Remove(filepath.Join(p.Dir, key+".json"))
}

// NodeGetInfo returns the node ID.
func (p *PodEvents) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: p.NodeID}, nil
}

// NodeGetCapabilities: ephemeral volumes need none.
func (p *PodEvents) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}
