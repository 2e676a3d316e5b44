package rbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// NodeGetVolumeStats reports bytes and inodes (or a block device's size)
// within probeTimeout; a hung mount is Unavailable, not a hung call.
// Concurrent calls for one path share one probe, so a hung mount holds one
// blocked thread however often it is asked about. NodeGetVolumeHealth says why.
func (n *Node) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	path := req.GetVolumePath()
	if err := rcsi.Required("volume_path", path); err != nil {
		return nil, err
	}
	resp, err := boundedStats(ctx, path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, status.Errorf(codes.NotFound, "volume path %s does not exist", path)
	case errors.Is(err, errHung):
		return nil, hungError("reading stats of", path)
	case err != nil:
		return nil, status.Errorf(rcsi.Code(err), "reading stats of %s: %v", path, err)
	}
	return resp, nil
}

// boundedStats runs volumeStats as a shared probe of path.
func boundedStats(ctx context.Context, path string) (*csi.NodeGetVolumeStatsResponse, error) {
	v, err := probes.do(ctx, "stats\x00"+path, probeTimeout, func() (any, error) { return volumeStats(path) })
	if err != nil {
		return nil, err
	}
	return v.(*csi.NodeGetVolumeStatsResponse), nil
}

func volumeStats(path string) (*csi.NodeGetVolumeStatsResponse, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode()&os.ModeDevice != 0 {
		size, err := deviceSize(path)
		if err != nil {
			return nil, err
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size}}}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, err
	}
	bs := int64(st.Bsize)
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs, Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}}, nil
}

func deviceSize(dev string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// Seeking to the end of a block device gives its size.
	return f.Seek(0, io.SeekEnd)
}

// NodeGetVolumeHealth reports a dead mapping, a lost or hung mount as
// INACCESSIBLE (CSI 1.13's successor of VolumeCondition); an empty list is healthy.
func (n *Node) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	rec, err := n.state.load(req.GetVolumeId())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if rec == nil || !rec.Staged {
		return nil, errNotStaged(req.GetVolumeId())
	}
	health := &csi.VolumeHealth{VolumeId: req.GetVolumeId()}
	bad := func(reason, format string, args ...any) {
		health.HealthStatuses = append(health.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: reason, Message: fmt.Sprintf(format, args...)})
	}
	m := n.mounters[rec.Mounter]
	if m == nil {
		return nil, status.Errorf(codes.Internal, "stage record of volume %s names an unknown mounter %q", rec.VolumeID, rec.Mounter)
	}
	if err := m.Check(ctx, rec.Mapping); rcsi.IsGone(err) {
		bad("MappingLost", "%v", err)
	} else if err != nil {
		bad("MappingUnchecked", "cannot tell whether the mapping works: %v", err)
	}
	paths := []string{req.GetVolumePublishPath()}
	if !rec.Block {
		paths = append(paths, rec.StagingPath)
		if notMnt, err := isLikelyNotMountPoint(ctx, n.mounts, rec.StagingPath); err == nil && notMnt {
			bad("StagingMountLost", "staging mount %s is gone", rec.StagingPath)
		} else if err != nil {
			bad("StagingMountUnchecked", "cannot tell whether %s is mounted: %v", rec.StagingPath, err)
		}
	}
	for _, p := range paths {
		if p == "" {
			continue
		}
		if _, err := boundedStats(ctx, p); errors.Is(err, errHung) {
			bad("MountHung", "%s did not answer within %s", p, probeTimeout)
		} else if err != nil {
			bad("MountUnreadable", "%s: %v", p, err)
		}
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: health}, nil
}

// NodeExpandVolume makes the device see the grown image and grows the filesystem online.
func (n *Node) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if err := rcsi.Required("volume_path", req.GetVolumePath()); err != nil {
		return nil, err
	}
	rec, unlock, err := n.begin(ctx, req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec == nil || !rec.Staged {
		return nil, errNotStaged(req.GetVolumeId())
	}
	if _, err := os.Stat(req.GetVolumePath()); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume path %s: %v", req.GetVolumePath(), err)
	}
	start := time.Now()
	if err := n.mounters[rec.Mounter].Refresh(ctx, rec.Mapping, req.GetCapacityRange().GetRequiredBytes()); err != nil {
		return nil, status.Errorf(codes.Internal, "refreshing device size: %v", err)
	}
	if !rec.Block {
		if _, err := mount.NewResizeFs(n.mounts.Exec).Resize(rec.Device, rec.StagingPath); err != nil {
			if rec.FsType == "ext4" && strings.Contains(err.Error(), "Permission denied to resize") {
				// ext4's online resize ioctl demands CAP_SYS_RESOURCE.
				return nil, status.Errorf(codes.FailedPrecondition,
					"growing ext4 on %s online needs CAP_SYS_RESOURCE, which this node plugin lacks (run it privileged): %v", rec.Device, err)
			}
			return nil, status.Errorf(codes.Internal, "growing %s filesystem on %s: %v", rec.FsType, rec.Device, err)
		}
	}
	size, err := deviceSize(rec.Device)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading size of %s: %v", rec.Device, err)
	}
	klog.InfoS("volume expanded on node", "volumeID", req.GetVolumeId(), "bytes", size, "duration", time.Since(start))
	if size != rec.Size { // a repeated call that changed nothing emits nothing
		rec.Size = size
		if err := n.emit(ctx, rcsi.EventExpand, rec, rec.Context); err != nil {
			return nil, err
		}
		if err := n.state.save(rec); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

// NodeGetInfo returns the node ID.
func (n *Node) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: n.nodeID}, nil
}

// NodeGetCapabilities lists what this node service does.
func (n *Node) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}
