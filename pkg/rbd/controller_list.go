package rbd

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"

	"github.com/ceph/go-ceph/rados"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// GetCapacity reports the space a new image in the pool can use (Ceph's
// max_avail for the pool). Without clusterID and pool parameters the capacity
// is unknown and reported as 0.
func (c *Controller) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	params := req.GetParameters()
	clusterID, pool := params[ParamClusterID], params[ParamPool]
	if clusterID == "" || pool == "" {
		return &csi.GetCapacityResponse{}, nil
	}
	if _, err := ParseParams(params); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	for _, vc := range req.GetVolumeCapabilities() {
		if err := rcsi.Capability(vc, checkCapability); err != nil {
			return &csi.GetCapacityResponse{}, nil // no capacity for what cannot be made
		}
	}
	var avail int64
	err := c.bounded(ctx, clusterID, func(ctx context.Context) error {
		lease, cluster, err := c.knownConn(ctx, clusterID)
		if err != nil {
			return err
		}
		defer lease.Release()
		avail, err = poolAvailable(lease.Conn(), pool)
		if err != nil {
			return (&target{cluster: cluster, lease: lease}).status(err, "reading free space of pool %q", pool)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &csi.GetCapacityResponse{AvailableCapacity: avail}, nil
}

func poolAvailable(conn *rados.Conn, pool string) (int64, error) {
	out, _, err := conn.MonCommand([]byte(`{"prefix":"df","format":"json"}`))
	if err != nil {
		return 0, err
	}
	var df struct {
		Pools []struct {
			Name  string `json:"name"`
			Stats struct {
				MaxAvail int64 `json:"max_avail"`
			} `json:"stats"`
		} `json:"pools"`
	}
	if err := json.Unmarshal(out, &df); err != nil {
		return 0, fmt.Errorf("decoding df: %w", err)
	}
	for _, p := range df.Pools {
		if p.Name == pool {
			return p.Stats.MaxAvail, nil
		}
	}
	return 0, status.Errorf(codes.NotFound, "pool %q does not exist", pool)
}

// knownConn leases the connection to a cluster with its known credentials
// (see KnownCredentials); FailedPrecondition if there are none.
func (c *Controller) knownConn(ctx context.Context, clusterID string) (*rcsi.Lease, rcsi.ClusterConfig, error) {
	cluster, err := c.Clusters.Get(clusterID)
	if err != nil {
		return nil, cluster, status.Error(codes.InvalidArgument, err.Error())
	}
	creds, ok := c.Known.For(clusterID)
	if !ok {
		return nil, cluster, status.Errorf(codes.FailedPrecondition, "no credentials known for cluster %q yet: mount its secret under the credentials directory", clusterID)
	}
	lease, err := c.Conns.Acquire(ctx, cluster, creds)
	if err != nil {
		return nil, cluster, cephStatus(err, "connecting to cluster %q", clusterID)
	}
	return lease, cluster, nil
}

// ListVolumes pages through the volumes in the journals of every pool of every
// cluster with known credentials, in volume ID order. The token is the last
// volume ID of the previous page, so deletions between pages skip nothing.
func (c *Controller) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "max_entries is negative (%d)", req.GetMaxEntries())
	}
	ids, err := c.allVolumes(ctx)
	if err != nil {
		return nil, err
	}
	start := 0
	if tok := req.GetStartingToken(); tok != "" {
		if _, err := rcsi.ParseVolumeID(tok); err != nil {
			return nil, status.Errorf(codes.Aborted, "starting_token %q is not one this driver issued", tok)
		}
		start = sort.Search(len(ids), func(i int) bool { return ids[i] > tok })
	}
	end := len(ids)
	if m := int(req.GetMaxEntries()); m > 0 && start+m < end {
		end = start + m
	}
	resp := &csi.ListVolumesResponse{}
	for _, id := range ids[start:end] {
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: &csi.Volume{VolumeId: id}})
	}
	if end < len(ids) {
		resp.NextToken = ids[end-1]
	}
	return resp, nil
}

func (c *Controller) allVolumes(ctx context.Context) ([]string, error) {
	var ids []string
	for _, clusterID := range c.Clusters.IDs() {
		var more []string
		err := c.bounded(ctx, clusterID, func(ctx context.Context) (err error) {
			more, err = c.clusterVolumes(ctx, clusterID)
			return err
		})
		if status.Code(err) == codes.FailedPrecondition {
			klog.InfoS("ListVolumes: skipping cluster with no known credentials", "cluster", clusterID)
			continue
		} else if err != nil {
			return nil, err
		}
		ids = append(ids, more...)
	}
	sort.Strings(ids)
	return ids, nil
}

func (c *Controller) clusterVolumes(ctx context.Context, clusterID string) ([]string, error) {
	lease, cluster, err := c.knownConn(ctx, clusterID)
	if err != nil {
		return nil, err
	}
	defer lease.Release()
	t := &target{cluster: cluster, lease: lease}
	pools, err := lease.Conn().ListPools()
	if err != nil {
		return nil, t.status(err, "listing pools of cluster %q", clusterID)
	}
	var ids []string
	for _, pool := range pools {
		io, err := lease.IOContext(pool, cluster.RBD.RadosNamespace)
		if err != nil {
			continue // a pool these credentials may not read is not ours
		}
		images, err := NewJournal(io).Images("", 0)
		if err != nil {
			if rcsi.Code(err) == codes.PermissionDenied {
				continue
			}
			return nil, t.status(err, "listing volumes in pool %q", pool)
		}
		for _, img := range images {
			ids = append(ids, rcsi.VolumeID{ClusterID: clusterID, Pool: pool, Namespace: cluster.RBD.RadosNamespace, Name: img}.String())
		}
	}
	return ids, nil
}
