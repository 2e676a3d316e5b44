package cephfs

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/cephfs"
	"github.com/ceph/go-ceph/cephfs/admin"
	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// The controller provisions through one of two paths, chosen per cluster,
// file system and user:
//
//   - libcephfs (fast): its own mount of /volumes writes the subvolume layout
//     directly. Needs MDS caps that let it write /volumes and set quotas and
//     layouts (the p flag): 'allow rwps path=/volumes'.
//   - the mgr volumes module (slow: one mgr thread runs every command), for
//     users with ceph-csi's caps, which lack MDS caps or the p flag.
//
// A probe decides: the mount, then a directory in /volumes/_deleting (the
// trash the purger moves subvolumes to; the mgr purges whatever is left
// there) with a quota and a pool layout set on it. A refusal (EPERM, EACCES)
// selects the mgr; any other error decides nothing and fails the call.

// DefaultCapsRecheck is how long a decision to go through the mgr stands
// before the next call probes again, so that a user given the caps later gets
// the fast path.
const DefaultCapsRecheck = 10 * time.Minute

// fastCaps and mgrCaps name what each path needs, for messages.
const (
	fastCaps = "mds 'allow rwps fsname=<fs> path=/volumes'"
	mgrCaps  = "mgr 'allow rw'"
	// capsHint ends every PermissionDenied message.
	capsHint = "the provisioner user needs mon 'allow r', osd 'allow rw tag cephfs metadata=<fs>' and either " +
		fastCaps + " (libcephfs, fast; the p flag sets quotas and layouts) or " +
		mgrCaps + " (the mgr volumes module, slower; ceph-csi's caps)"
)

// pathDecision is the cached choice for one cluster, file system and user.
type pathDecision struct {
	viaMgr bool
	reason string    // why not libcephfs
	at     time.Time // zero: undecided
}

// pathKey identifies a user on a file system; the key's hash makes a rotated
// key probe afresh.
func pathKey(cluster rcsi.ClusterConfig, creds rcsi.Credentials, fsName string) string {
	sum := sha256.Sum256([]byte(creds.Key))
	return fmt.Sprintf("%s\x00%s\x00%s\x00%x\x00%s", cluster.ClusterID, cluster.MonHost(), creds.ID, sum[:8], fsName)
}

// paths caches decisions.
type paths struct {
	mu sync.Mutex
	m  map[string]pathDecision
}

func (p *paths) get(key string) pathDecision {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.m[key]
}

// set records d and returns the decision it replaces.
func (p *paths) set(key string, d pathDecision) pathDecision {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[string]pathDecision{}
	}
	old := p.m[key]
	p.m[key] = d
	return old
}

// forget makes the next call probe again, keeping what the last decision was
// (so that a probe with the same answer logs nothing).
func (p *paths) forget(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d, ok := p.m[key]; ok {
		d.at = time.Time{}
		p.m[key] = d
	}
}

func (c *Controller) capsRecheck() time.Duration {
	if c.CapsRecheck > 0 {
		return c.CapsRecheck
	}
	return DefaultCapsRecheck
}

// choosePath returns whether to provision through the mgr, and otherwise
// the libcephfs mount to use (the caller releases it). conn is a connection
// with the same credentials, for the mgr check.
func (c *Controller) choosePath(ctx context.Context, cluster rcsi.ClusterConfig, creds rcsi.Credentials, fs *fsInfo, group string,
	conn admin.RadosCommander) (bool, Mounted, error) {
	key := pathKey(cluster, creds, fs.Name)
	if viaMgr, m, ok, err := c.decided(ctx, key, cluster, creds, fs, group); ok || err != nil {
		return viaMgr, m, err
	}
	// One probe at a time per user; the others take its answer.
	unlock, err := c.locks.Lock(ctx, "path\x00"+key)
	if err != nil {
		return false, Mounted{}, status.Errorf(codes.Aborted, "waiting for the probe of user %q's caps on file system %q: %v", creds.ID, fs.Name, err)
	}
	defer unlock()
	if viaMgr, m, ok, err := c.decided(ctx, key, cluster, creds, fs, group); ok || err != nil {
		return viaMgr, m, err
	}
	start := time.Now()
	m, err := c.mountFS(ctx, cluster, creds, fs.Name, group, conn)
	reason := ""
	switch {
	case refused(err):
		reason = fmt.Sprintf("the MDS refused this user a libcephfs mount of %s: %v", volumesRoot, err)
	case err != nil:
		return false, Mounted{}, cephStatus(err, "mounting file system %q", fs.Name)
	default:
		if reason, err = probeFast(m.Mnt, fs.DataPools[0]); err != nil {
			m.Check(err)
			m.Release()
			return false, Mounted{}, cephStatus(err, "probing the caps of user %q on file system %q", creds.ID, fs.Name)
		}
	}
	if reason == "" {
		old := c.paths.set(key, pathDecision{at: time.Now()})
		if old.viaMgr {
			klog.InfoS("CephFS provisioning for this user goes through libcephfs again (its caps now allow it)",
				"cluster", cluster.ClusterID, "fs", fs.Name, "user", creds.ID, "probe", time.Since(start))
		} else {
			klog.V(2).InfoS("CephFS provisioning for this user goes through libcephfs", "cluster", cluster.ClusterID, "fs", fs.Name,
				"user", creds.ID, "probe", time.Since(start))
		}
		return false, m, nil
	}
	if m.e != nil {
		m.discard() // not used on the mgr path; its MDS session would only hold caps
		m.Release()
	}
	if err := mgrUsable(conn, fs.Name, group); err != nil {
		if refused(err) {
			return false, Mounted{}, status.Errorf(codes.PermissionDenied,
				"user %q can provision on file system %q neither through libcephfs (%s) nor through the mgr volumes module (%v): %s",
				creds.ID, fs.Name, reason, err, capsHint)
		}
		return false, Mounted{}, cephStatus(err, "reaching the mgr volumes module of cluster %q", cluster.ClusterID)
	}
	old := c.paths.set(key, pathDecision{viaMgr: true, reason: reason, at: time.Now()})
	if !old.viaMgr || old.reason != reason {
		klog.InfoS("CephFS provisioning for this user goes through the mgr volumes module (slower: one mgr thread runs every command); "+
			"these MDS caps would make it fast", "caps", "mds 'allow rwps fsname="+fs.Name+" path=/volumes'", "cluster", cluster.ClusterID,
			"fs", fs.Name, "user", creds.ID, "reason", reason, "recheck", c.capsRecheck())
	}
	return true, Mounted{}, nil
}

// decided applies a standing decision: ok false means probe. A libcephfs
// mount that is now refused withdraws the decision.
func (c *Controller) decided(ctx context.Context, key string, cluster rcsi.ClusterConfig, creds rcsi.Credentials, fs *fsInfo, group string) (bool, Mounted, bool, error) {
	d := c.paths.get(key)
	if d.at.IsZero() {
		return false, Mounted{}, false, nil
	}
	if d.viaMgr {
		return true, Mounted{}, time.Since(d.at) < c.capsRecheck(), nil
	}
	m, err := c.mountFS(ctx, cluster, creds, fs.Name, group, nil)
	if refused(err) {
		c.paths.forget(key)
		return false, Mounted{}, false, nil
	}
	if err != nil {
		return false, Mounted{}, false, cephStatus(err, "mounting file system %q", fs.Name)
	}
	return false, m, true, nil
}

// mountFS returns the cached libcephfs mount of /volumes, creating the
// subvolume group through the mgr first if the file system has no /volumes
// yet (conn nil: a fresh connection for that).
func (c *Controller) mountFS(ctx context.Context, cluster rcsi.ClusterConfig, creds rcsi.Credentials, fsName, group string, conn admin.RadosCommander) (Mounted, error) {
	m, err := c.Mounts.Mount(ctx, cluster, creds, fsName)
	if !errors.Is(err, errNoVolumesDir) {
		return m, err
	}
	if conn == nil {
		lease, err := c.Conns.Acquire(ctx, cluster, creds)
		if err != nil {
			return Mounted{}, err
		}
		defer lease.Release()
		conn = lease.Conn()
	}
	if err := c.createGroup(conn, fsName, group); err != nil {
		return Mounted{}, err
	}
	return c.Mounts.Mount(ctx, cluster, creds, fsName)
}

// refused says err is the cluster refusing the user (EPERM, EACCES).
func refused(err error) bool {
	e := rcsi.Errno(err)
	return e == syscall.EPERM || e == syscall.EACCES
}

// probeFast tries, through mnt, what the libcephfs path needs beyond the
// mount: writing /volumes/_deleting and setting a quota and a data pool
// layout (the MDS p flag), on a scratch directory in the trash. It returns
// why the path is refused, or "" if it is not.
func probeFast(mnt *cephfs.MountInfo, pool string) (string, error) {
	trash := "/" + trashDir
	for attempt := 0; ; attempt++ {
		if _, err := mnt.Statx(trash, cephfs.StatxBasicStats, 0); rcsi.Errno(err) == syscall.ENOENT {
			if err := mnt.MakeDir(trash, trashMode); refused(err) {
				return fmt.Sprintf("creating %s%s: %v", volumesRoot, trash, err), nil
			} else if err != nil && rcsi.Errno(err) != syscall.EEXIST {
				return "", fmt.Errorf("creating %s%s: %w", volumesRoot, trash, err)
			}
		} else if err != nil {
			return "", fmt.Errorf("reading %s%s: %w", volumesRoot, trash, err)
		}
		dir := trash + "/rookzmq-probe-" + uuid.NewString()
		if err := mnt.MakeDir(dir, trashMode); refused(err) {
			return fmt.Sprintf("creating a directory in %s%s: %v", volumesRoot, trash, err), nil
		} else if err != nil {
			return "", fmt.Errorf("creating %s%s: %w", volumesRoot, dir, err)
		}
		reason, err := probeXattrs(mnt, dir, pool)
		if rerr := mnt.RemoveDir(dir); rerr != nil && rcsi.Errno(rerr) != syscall.ENOENT && err == nil {
			err = fmt.Errorf("removing %s%s: %w", volumesRoot, dir, rerr)
		}
		// The mgr's purge threads may have purged the directory under us.
		if rcsi.Errno(err) == syscall.ENOENT && attempt < 2 {
			continue
		}
		return reason, err
	}
}

func probeXattrs(mnt *cephfs.MountInfo, dir, pool string) (string, error) {
	for _, x := range [][2]string{{xattrQuota, "1"}, {xattrPool, pool}} {
		err := mnt.SetXattr(dir, x[0], []byte(x[1]), 0)
		if refused(err) {
			return fmt.Sprintf("setting %s (needs the MDS p flag): %v", x[0], err), nil
		} else if err != nil {
			return "", fmt.Errorf("setting %s on %s%s: %w", x[0], volumesRoot, dir, err)
		}
	}
	return "", nil
}

// mgrUsable asks the mgr volumes module something harmless: whether it
// answers this user at all. A missing group is fine (it is created on
// first use).
func mgrUsable(conn admin.RadosCommander, fsName, group string) error {
	_, err := admin.NewFromConn(conn).SubVolumeGroupPath(fsName, group)
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil
	}
	return err
}
