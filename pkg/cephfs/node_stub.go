package cephfs

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// NodeStub stands in for the CephFS Node service until it is built: it tells
// who asks that this node stages and publishes nothing, and refuses every
// volume operation with Unimplemented and the reason.
type NodeStub struct {
	csi.UnimplementedNodeServer
	NodeID string
}

const notYet = "the CephFS Node service is not implemented yet: volumes of this driver cannot be staged or published"

// NodeGetInfo returns the node ID.
func (n *NodeStub) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: n.NodeID}, nil
}

// NodeGetCapabilities lists none.
func (n *NodeStub) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

// NodeStageVolume is not implemented yet.
func (n *NodeStub) NodeStageVolume(context.Context, *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	return nil, status.Error(codes.Unimplemented, notYet)
}

// NodePublishVolume is not implemented yet.
func (n *NodeStub) NodePublishVolume(context.Context, *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	return nil, status.Error(codes.Unimplemented, notYet)
}

// NodeUnpublishVolume succeeds: this stub never publishes, so nothing is left to undo.
func (n *NodeStub) NodeUnpublishVolume(_ context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if err := rcsi.Required("target_path", req.GetTargetPath()); err != nil {
		return nil, err
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeUnstageVolume succeeds: this stub never stages, so nothing is left to undo.
func (n *NodeStub) NodeUnstageVolume(_ context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	if err := rcsi.Required("volume_id", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if err := rcsi.Required("staging_target_path", req.GetStagingTargetPath()); err != nil {
		return nil, err
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}
