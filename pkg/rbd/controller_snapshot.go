package rbd

// CreateSnapshot, DeleteSnapshot and ListSnapshots. See image_snap.go for
// what a snapshot is in the pool, journal_snap.go for its journal record.

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// VolumeSnapshotClass parameters.
const (
	// ParamSnapshotNamePrefix prefixes the names of snapshot images
	// (ceph-csi's name; default DefaultSnapshotNamePrefix).
	ParamSnapshotNamePrefix   = "snapshotNamePrefix"
	DefaultSnapshotNamePrefix = "csi-snap-"
)

// snapshotPrefix checks a CreateSnapshot request's parameters: clusterID and
// pool, if given, must be the source volume's (the snapshot lives beside
// it); it returns the name prefix of the snapshot image.
func snapshotPrefix(params map[string]string, src rcsi.VolumeID) (string, error) {
	prefix := DefaultSnapshotNamePrefix
	var bad []string
	for k, v := range params {
		switch {
		case k == ParamSnapshotNamePrefix:
			if err := rcsi.CheckName("parameter "+k, v); err != nil || v == "" {
				return "", fmt.Errorf("parameter %s %q: want [A-Za-z0-9._-], not starting with '-'", k, v)
			}
			prefix = v
		case k == ParamClusterID && v != src.ClusterID, k == ParamPool && v != src.Pool:
			return "", fmt.Errorf("parameter %s %q: a snapshot is made in its source volume's cluster and pool (%s/%s)", k, v, src.ClusterID, src.Pool)
		case k == ParamClusterID, k == ParamPool, strings.HasPrefix(k, provisionerPrefix):
		default:
			bad = append(bad, k)
		}
	}
	if len(bad) > 0 {
		sort.Strings(bad)
		return "", fmt.Errorf("unknown parameters %s (known: %s, %s, %s)", strings.Join(bad, ", "), ParamClusterID, ParamPool, ParamSnapshotNamePrefix)
	}
	return prefix, nil
}

// CreateSnapshot makes a snapshot image of the source volume, or returns the
// one the journal holds for the request name.
func (c *Controller) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := rcsi.Required("name", req.GetName()); err != nil {
		return nil, err
	}
	if strings.Contains(req.GetName(), "\n") {
		return nil, status.Errorf(codes.InvalidArgument, "name %q has a newline", req.GetName())
	}
	if err := rcsi.Required("source_volume_id", req.GetSourceVolumeId()); err != nil {
		return nil, err
	}
	src, cephID, err := parseHandle(req.GetSourceVolumeId(), true)
	if err != nil {
		return nil, err
	}
	var resp *csi.CreateSnapshotResponse
	err = c.bounded(ctx, src.ClusterID, func(ctx context.Context) error {
		src, t, err := c.openVolume(ctx, src, cephID, req.GetSecrets())
		if err != nil {
			return err
		}
		defer t.release()
		prefix, err := snapshotPrefix(req.GetParameters(), src)
		if err != nil {
			return status.Error(codes.InvalidArgument, err.Error())
		}
		unlock, err := c.locks.Lock(ctx, "snap\x00"+src.ClusterID+"\x00"+src.Pool+"\x00"+req.GetName())
		if err != nil {
			return status.Errorf(codes.Aborted, "an operation on snapshot name %q is already in progress", req.GetName())
		}
		defer unlock()
		resp, err = c.createSnapshot(ctx, t, src, req.GetSourceVolumeId(), req.GetName(), prefix)
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp, nil
}

func (c *Controller) createSnapshot(ctx context.Context, t *target, src rcsi.VolumeID, sourceID, name, prefix string) (*csi.CreateSnapshotResponse, error) {
	start := time.Now()
	j := t.journal()
	image, err := j.SnapshotImage(name)
	if err != nil {
		return nil, t.status(err, "reading the journal")
	}
	if image == "" {
		if _, err := imageSize(t.io, src.Name); err != nil {
			return nil, t.status(err, "source volume %s", sourceID)
		}
		image = prefix + uuid.NewString()
		id := rcsi.VolumeID{ClusterID: src.ClusterID, Pool: src.Pool, Namespace: src.Namespace, Name: image}
		if err := id.Validate(); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "snapshot ID: %v", err)
		}
		image, _, err = j.LookupOrReserveSnapshot(ctx, name, image, sourceID)
		if errors.Is(err, ErrReserveBusy) {
			return nil, status.Errorf(codes.Aborted, "reserving snapshot name %q: %v", name, err)
		} else if err != nil {
			return nil, t.status(err, "reserving snapshot name %q", name)
		}
		rcsi.CrashPoint("snapshot-after-reserve")
	}
	rec, ok, err := j.Snapshot(image)
	if err != nil {
		return nil, t.status(err, "reading the journal")
	}
	if !ok {
		return nil, status.Errorf(codes.Internal, "journal: snapshot name %q names image %s, which has no snapshot record", name, image)
	}
	if rec.Source != sourceID {
		return nil, status.Errorf(codes.AlreadyExists, "snapshot name %q is in use by a snapshot of volume %s", name, rec.Source)
	}
	id := rcsi.VolumeID{ClusterID: src.ClusterID, Pool: src.Pool, Namespace: src.Namespace, Name: image}
	if !rec.Ready {
		if err := cloneOfImage(t.io, src.Name, t.io, image, rbd.FeatureLayering|rbd.FeatureDeepFlatten); err != nil {
			if errors.Is(err, rbd.ErrNotFound) {
				// The source went since the reservation: nothing was
				// made, so the name's reservation goes too.
				if _, serr := imageSize(t.io, image); errors.Is(serr, rbd.ErrNotFound) {
					if rerr := j.ReleaseSnapshot(name, image, ""); rerr != nil {
						return nil, t.status(rerr, "releasing snapshot name %q", name)
					}
				}
				return nil, status.Errorf(codes.NotFound, "source volume %s is gone", sourceID)
			}
			return nil, t.status(err, "snapshot %s of volume %s", image, sourceID)
		}
		rcsi.CrashPoint("snapshot-after-clone")
		if err := createSnap(t.io, image, image); err != nil {
			return nil, t.status(err, "snapshot %s", image)
		}
		c.flattenIfDeep(t, image)
		size, created, err := snapInfo(t.io, image, image)
		if err != nil {
			return nil, t.status(err, "reading snapshot %s", image)
		}
		rec.Ready, rec.Size, rec.Created = true, int64(size), created
		if err := j.SnapshotMade(image, rec); err != nil {
			return nil, t.status(err, "recording snapshot %s", image)
		}
		klog.V(3).InfoS("snapshot made", "name", name, "snapshotID", id.String(), "source", sourceID, "bytes", size, "duration", time.Since(start))
	}
	return &csi.CreateSnapshotResponse{Snapshot: snapshotOf(id.String(), rec)}, nil
}

func snapshotOf(id string, rec snapRecord) *csi.Snapshot {
	return &csi.Snapshot{SnapshotId: id, SourceVolumeId: rec.Source, SizeBytes: rec.Size,
		CreationTime: timestamppb.New(rec.Created), ReadyToUse: true}
}

// DeleteSnapshot removes the snapshot image's snapshot (into the trash
// namespace while volumes made from it depend on it), moves the image to the
// trash and releases its journal record; the purge follows as for volumes.
// An ID that names no snapshot (gone, or a volume's) answers OK.
func (c *Controller) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if err := rcsi.Required("snapshot_id", req.GetSnapshotId()); err != nil {
		return nil, err
	}
	id, err := rcsi.ParseVolumeID(req.GetSnapshotId())
	if err != nil {
		klog.Warningf("DeleteSnapshot: snapshot ID %q is not one of rookzmq's, so no such snapshot exists: answering OK: %v", req.GetSnapshotId(), err)
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if err := c.deleteIn(ctx, id, req.GetSecrets(), "snapid\x00"+req.GetSnapshotId(), "snapshot", c.deleteSnapshot); err != nil {
		return nil, err
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (c *Controller) deleteSnapshot(t *target, image string) error {
	j := t.journal()
	rec, ok, err := j.Snapshot(image)
	if err != nil {
		return t.status(err, "reading the journal")
	}
	if !ok {
		klog.V(3).InfoS("DeleteSnapshot: no snapshot record: already deleted, or not a snapshot", "image", image)
		return nil
	}
	if err := removeSnap(t.io, image, image); err != nil {
		return t.status(err, "snapshot %s", image)
	}
	rcsi.CrashPoint("snapshot-delete-after-snap")
	trashID, err := c.trash(t, image)
	if err != nil {
		return err
	}
	if err := j.ReleaseSnapshot(rec.Name, image, trashID); err != nil {
		return t.status(err, "releasing snapshot name %q", rec.Name)
	}
	if trashID != "" {
		c.purgeLater(t, image, trashID)
	}
	klog.V(3).InfoS("snapshot deleted", "image", image, "name", rec.Name, "trashID", trashID)
	return nil
}

// ListSnapshots pages through the snapshots in the journals of every pool of
// every cluster (with the request's credentials, or the known ones), in
// snapshot ID order; the token is the last ID of the previous page.
func (c *Controller) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "max_entries is negative (%d)", req.GetMaxEntries())
	}
	var only *rcsi.VolumeID
	if sid := req.GetSnapshotId(); sid != "" {
		id, err := rcsi.ParseVolumeID(sid)
		if err != nil {
			return &csi.ListSnapshotsResponse{}, nil // no snapshot has this ID
		}
		only = &id
	}
	var all []*csi.Snapshot
	for _, clusterID := range c.Clusters.IDs() {
		if only != nil && only.ClusterID != clusterID {
			continue
		}
		var more []*csi.Snapshot
		err := c.bounded(ctx, clusterID, func(ctx context.Context) (err error) {
			more, err = c.clusterSnapshots(ctx, clusterID, only, req.GetSecrets())
			return err
		})
		switch code := status.Code(err); {
		case code == codes.FailedPrecondition:
			klog.InfoS("ListSnapshots: skipping cluster with no known credentials", "cluster", clusterID)
			continue
		case only == nil && len(req.GetSecrets()) > 0 && (code == codes.PermissionDenied || code == codes.Unauthenticated):
			klog.InfoS("ListSnapshots: skipping cluster the request's credentials may not read", "cluster", clusterID, "err", err)
			continue
		case err != nil:
			return nil, err
		}
		for _, s := range more {
			if (only == nil || s.SnapshotId == req.GetSnapshotId()) && (req.GetSourceVolumeId() == "" || s.SourceVolumeId == req.GetSourceVolumeId()) {
				all = append(all, s)
			}
		}
	}
	sort.Slice(all, func(a, b int) bool { return all[a].SnapshotId < all[b].SnapshotId })
	start := 0
	if tok := req.GetStartingToken(); tok != "" {
		if _, err := rcsi.ParseVolumeID(tok); err != nil {
			return nil, status.Errorf(codes.Aborted, "starting_token %q is not one this driver issued", tok)
		}
		start = sort.Search(len(all), func(i int) bool { return all[i].SnapshotId > tok })
	}
	end := len(all)
	if m := int(req.GetMaxEntries()); m > 0 && start+m < end {
		end = start + m
	}
	resp := &csi.ListSnapshotsResponse{}
	for _, s := range all[start:end] {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: s})
	}
	if end < len(all) {
		resp.NextToken = all[end-1].SnapshotId
	}
	return resp, nil
}

// clusterSnapshots lists the made snapshots of a cluster's pools (only's pool
// if given), leased with secrets if the request has them, else with the
// known credentials.
func (c *Controller) clusterSnapshots(ctx context.Context, clusterID string, only *rcsi.VolumeID, secrets map[string]string) ([]*csi.Snapshot, error) {
	var lease *rcsi.Lease
	var cluster rcsi.ClusterConfig
	var err error
	if len(secrets) > 0 {
		lease, cluster, _, err = c.leaseWith(ctx, clusterID, secrets)
	} else {
		lease, cluster, err = c.knownConn(ctx, clusterID)
	}
	if err != nil {
		return nil, err
	}
	defer lease.Release()
	t := &target{cluster: cluster, lease: lease}
	pools := []string{}
	if only != nil {
		pools = append(pools, only.Pool)
	} else if pools, err = lease.Conn().ListPools(); err != nil {
		return nil, t.status(err, "listing pools of cluster %q", clusterID)
	}
	var out []*csi.Snapshot
	for _, pool := range pools {
		io, err := lease.IOContext(pool, cluster.RBD.RadosNamespace)
		if err != nil {
			continue // a pool these credentials may not read is not ours
		}
		recs, err := NewJournal(io).Snapshots()
		if err != nil {
			if rcsi.Code(err) == codes.PermissionDenied {
				continue
			}
			return nil, t.status(err, "listing snapshots in pool %q", pool)
		}
		for image, rec := range recs {
			if rec.Ready {
				id := rcsi.VolumeID{ClusterID: clusterID, Pool: pool, Namespace: cluster.RBD.RadosNamespace, Name: image}
				out = append(out, snapshotOf(id.String(), rec))
			}
		}
	}
	return out, nil
}
