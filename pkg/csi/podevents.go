package csi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"

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

	mounts mount.Interface
	locks  KeyLocks
}

// podEndpoint is the on-disk record of one pod endpoint.
type podEndpoint struct {
	VolumeID, Target, Namespace, PodUID, Scope string
}

// Start prepares Dir and re-binds the endpoints of pods published before a
// restart (their bind mounts outlive the process).
func (p *PodEvents) Start() error {
	p.mounts = mount.New("")
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
		if err := p.bind(key, r); err != nil {
			klog.ErrorS(err, "re-binding a pod's event endpoint", "target", r.Target)
		}
	}
	return nil
}

func (p *PodEvents) key(target string) string {
	sum := sha256.Sum256([]byte(target))
	return hex.EncodeToString(sum[:6])
}

func (p *PodEvents) bind(key string, r podEndpoint) error {
	dir := filepath.Join(p.Dir, key)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	os.Chmod(dir, 0o755) // the pod's user, whoever it is, must reach the sockets
	scope := zmqbridge.Scope{Namespace: r.Namespace}
	if r.Scope == "pod" {
		scope.PodUID = r.PodUID
		if p.PodVolumes != nil {
			scope.Volumes = p.PodVolumes(r.PodUID)
		}
	}
	return p.Bridge.AddEndpoint(key, zmqbridge.Endpoint{
		Events: "ipc://" + filepath.Join(dir, "events.sock"), Control: "ipc://" + filepath.Join(dir, "control.sock"),
		Mode: 0o666, Scope: scope,
	})
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
	if req.GetVolumeCapability().GetMount() == nil {
		return nil, status.Error(codes.InvalidArgument, "volume_capability must be a mount volume")
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
	case r.Namespace == "" || r.PodUID == "":
		return nil, status.Errorf(codes.InvalidArgument, "pod namespace and UID missing: the CSIDriver %s needs podInfoOnMount: true", PodEventsDriverName)
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
	if err := os.MkdirAll(target, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "creating target %s: %v", target, err)
	}
	b, _ := json.Marshal(r)
	if err := os.WriteFile(filepath.Join(p.Dir, key+".json"), b, 0o600); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := p.bind(key, r); err != nil {
		p.forget(key)
		return nil, status.Errorf(codes.Internal, "binding the pod's event sockets: %v", err)
	}
	if err := p.mounts.Mount(filepath.Join(p.Dir, key), target, "", []string{"bind"}); err != nil {
		p.Bridge.RemoveEndpoint(key)
		p.forget(key)
		return nil, status.Errorf(codes.Internal, "mounting the event sockets at %s: %v", target, err)
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
	p.forget(key)
	return &csi.NodeUnpublishVolumeResponse{}, nil
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
