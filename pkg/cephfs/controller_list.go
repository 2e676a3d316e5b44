package cephfs

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

// GetCapacity reports the space a new subvolume can use: Ceph's max_avail for
// the class's data pool (the file system's first one if it names none).
// Without clusterID and fsName parameters the capacity is unknown: 0.
func (c *Controller) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	params := req.GetParameters()
	if params[ParamClusterID] == "" || params[ParamFsName] == "" {
		return &csi.GetCapacityResponse{}, nil
	}
	p, err := ParseParams(params)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	for _, vc := range req.GetVolumeCapabilities() {
		if err := rcsi.Capability(vc, checkCapability); err != nil {
			return &csi.GetCapacityResponse{}, nil // no capacity for what cannot be made
		}
	}
	lease, _, _, err := c.knownConn(ctx, p.ClusterID)
	if err != nil {
		return nil, err
	}
	defer lease.Release()
	conn := lease.Conn()
	fs, err := c.fileSystem(conn, p.ClusterID, p.FsName)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "parameter %s: %s", ParamFsName, status.Convert(err).Message())
	}
	pool := fs.DataPools[0]
	if p.Pool != "" {
		if !contains(fs.DataPools, p.Pool) {
			return nil, status.Errorf(codes.InvalidArgument, "parameter %s: %q is not a data pool of file system %q", ParamPool, p.Pool, p.FsName)
		}
		pool = p.Pool
	}
	avail, err := poolAvailable(conn, pool)
	if err != nil {
		return nil, cephStatus(err, "reading free space of pool %q", pool)
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

// knownConn leases a connection to a cluster with its known credentials;
// FailedPrecondition if there are none. The caller releases the lease.
func (c *Controller) knownConn(ctx context.Context, clusterID string) (*rcsi.Lease, rcsi.ClusterConfig, rcsi.Credentials, error) {
	cluster, err := c.Clusters.Get(clusterID)
	if err != nil {
		return nil, cluster, rcsi.Credentials{}, status.Error(codes.InvalidArgument, err.Error())
	}
	creds, ok := c.Known.For(clusterID)
	if !ok {
		return nil, cluster, creds, status.Errorf(codes.FailedPrecondition, "no credentials known for cluster %q yet: mount its secret under the credentials directory", clusterID)
	}
	lease, err := c.Conns.Acquire(ctx, cluster, creds)
	if err != nil {
		return nil, cluster, creds, cephStatus(err, "connecting to cluster %q", clusterID)
	}
	return lease, cluster, creds, nil
}

// ListVolumes lists the volumes of every file system of every cluster with
// known credentials, in volume ID order. The token is the last volume ID of
// the previous page, so deletions between pages skip nothing.
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
		lease, cluster, _, err := c.knownConn(ctx, clusterID)
		if status.Code(err) == codes.FailedPrecondition {
			klog.InfoS("ListVolumes: skipping cluster with no known credentials", "cluster", clusterID)
			continue
		} else if err != nil {
			return nil, err
		}
		got, err := c.clusterVolumes(lease, cluster)
		lease.Release()
		if err != nil {
			return nil, err
		}
		ids = append(ids, got...)
	}
	sort.Strings(ids)
	return ids, nil
}

// clusterVolumes lists the volumes of every file system of one cluster.
func (c *Controller) clusterVolumes(lease *rcsi.Lease, cluster rcsi.ClusterConfig) ([]string, error) {
	all, err := fileSystems(lease.Conn())
	if err != nil {
		return nil, cephStatus(err, "listing file systems of cluster %q", cluster.ClusterID)
	}
	group := cluster.CephFS.SubvolumeGroup
	if group == "" {
		group = DefaultSubvolumeGroup
	}
	var ids []string
	for _, fs := range all {
		io, err := lease.IOContext(fs.MetadataPool, JournalNamespace)
		if err != nil {
			continue // a pool these credentials may not read is not ours
		}
		names, err := NewJournal(io, group).Subvolumes()
		if err != nil {
			if rcsi.Code(err) == codes.PermissionDenied {
				continue
			}
			return nil, cephStatus(err, "listing volumes of file system %q", fs.Name)
		}
		for _, n := range names {
			ids = append(ids, rcsi.VolumeID{ClusterID: cluster.ClusterID, Pool: fs.Name, Namespace: group, Name: n}.String())
		}
	}
	return ids, nil
}
