package csi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// NodeGetVolumeStats reports bytes and inodes (or a block device's size)
// within ProbeTimeout; a hung mount is Unavailable, not a hung call.
// Concurrent calls for one path share one probe, so a hung mount holds one
// blocked thread however often it is asked about. NodeGetVolumeHealth says why.
func (n *Node[A]) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if err := Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	path := req.GetVolumePath()
	if err := Required("volume_path", path); err != nil {
		return nil, err
	}
	var resp *csi.NodeGetVolumeStatsResponse
	var err error
	if u, ok := n.stager.(UsageReporter); ok {
		resp, err = boundedUsage(ctx, path, u)
	} else {
		resp, err = boundedStats(ctx, path)
	}
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, status.Errorf(codes.NotFound, "volume path %s does not exist", path)
	case errors.Is(err, ErrHung):
		return nil, hungError("reading stats of", path)
	case err != nil:
		return nil, status.Errorf(Code(err), "reading stats of %s: %v", path, err)
	}
	return resp, nil
}

// boundedStats runs volumeStats as a shared probe of path.
func boundedStats(ctx context.Context, path string) (*csi.NodeGetVolumeStatsResponse, error) {
	v, err := probes.do(ctx, "stats\x00"+path, ProbeTimeout, func() (any, error) { return volumeStats(path) })
	if err != nil {
		return nil, err
	}
	return v.(*csi.NodeGetVolumeStatsResponse), nil
}

// boundedUsage runs a driver's Usage as a shared probe of path.
func boundedUsage(ctx context.Context, path string, u UsageReporter) (*csi.NodeGetVolumeStatsResponse, error) {
	v, err := probes.do(ctx, "usage\x00"+path, ProbeTimeout, func() (any, error) {
		usage, err := u.Usage(path)
		return &csi.NodeGetVolumeStatsResponse{Usage: usage}, err
	})
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
		size, err := DeviceSize(path)
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

// DeviceSize is a block device's size in bytes.
func DeviceSize(dev string) (int64, error) {
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
func (n *Node[A]) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	if err := Required("volume_id", req.GetVolumeId()); err != nil {
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
	switch err := n.stager.Check(ctx, rec); {
	case IsGone(err):
		bad("MappingLost", "%v", err)
	case errors.Is(err, ErrCorruptRecord):
		return nil, status.Error(codes.Internal, err.Error())
	case err != nil:
		bad("MappingUnchecked", "cannot tell whether the mapping works: %v", err)
	}
	paths := []string{req.GetVolumePublishPath()}
	if !rec.Block {
		paths = append(paths, rec.StagingPath)
		if notMnt, err := IsLikelyNotMountPoint(ctx, n.mounts, rec.StagingPath); err == nil && notMnt {
			bad("StagingMountLost", "staging mount %s is gone", rec.StagingPath)
		} else if err != nil {
			bad("StagingMountUnchecked", "cannot tell whether %s is mounted: %v", rec.StagingPath, err)
		}
	}
	for _, p := range paths {
		if p == "" {
			continue
		}
		if _, err := boundedStats(ctx, p); errors.Is(err, ErrHung) {
			bad("MountHung", "%s did not answer within %s", p, ProbeTimeout)
		} else if err != nil {
			bad("MountUnreadable", "%s: %v", p, err)
		}
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: health}, nil
}

// NodeExpandVolume has the driver make the node see the grown volume (and
// grow its filesystem online), and emits expand when the size changed.
func (n *Node[A]) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	if err := Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if err := Required("volume_path", req.GetVolumePath()); err != nil {
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
	size, err := n.stager.Expand(ctx, rec, req.GetCapacityRange().GetRequiredBytes())
	if err != nil {
		return nil, err
	}
	klog.InfoS("volume expanded on node", "volumeID", req.GetVolumeId(), "bytes", size, "duration", time.Since(start))
	if size != rec.Size { // a repeated call that changed nothing emits nothing
		rec.Size = size
		if err := n.emit(ctx, EventExpand, rec, rec.Context); err != nil {
			return nil, err
		}
		if err := n.state.save(rec); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}

// NodeGetInfo returns the node ID.
func (n *Node[A]) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: n.nodeID}, nil
}

// NodeGetCapabilities lists what this node service does.
func (n *Node[A]) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range n.caps {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}
