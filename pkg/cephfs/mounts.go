package cephfs

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/cephfs"
	"github.com/ceph/go-ceph/rados"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// volumesRoot is where the mgr volumes module keeps subvolume groups; our
// libcephfs mounts are rooted there, so users restricted to it can mount.
const volumesRoot = "/volumes"

// fsInfo is what the file system map says about one file system.
type fsInfo struct {
	Name         string   `json:"name"`
	MetadataPool string   `json:"metadata_pool"`
	DataPools    []string `json:"data_pools"`
}

// Mounts caches one libcephfs mount (rooted at /volumes) per cluster, file
// system and credential, on the RADOS connections of Conns, so that a CSI call
// costs no mount set-up.
type Mounts struct {
	Conns *rcsi.Conns
	// Instance names this driver process in a way its restart keeps (CSI
	// name, host name, endpoint) and another replica does not: with the
	// cluster, file system and user it makes the client UUID under which a
	// restarted process reclaims (resets) the MDS session of a killed one.
	// Empty disables that.
	Instance string

	mu     sync.Mutex
	mounts map[string]*mountEntry
}

type mountEntry struct {
	key   string
	ready chan struct{} // closed once mnt or err is set
	mnt   *cephfs.MountInfo
	// lease keeps the RADOS connection under the mount alive as long as
	// the mount; the journal's I/O contexts come from it too.
	lease *rcsi.Lease
	err   error
	// refs counts the callers using the mount; dropped says it was found
	// broken and left the cache: the last Release frees it. Both are
	// guarded by Mounts.mu.
	refs    int
	dropped bool
}

// Mounted is a cached mount and the connection lease it lives on, held until
// Release.
type Mounted struct {
	Mnt   *cephfs.MountInfo
	Lease *rcsi.Lease
	m     *Mounts
	e     *mountEntry
}

// errNoVolumesDir means the file system has no /volumes directory yet.
var errNoVolumesDir = fmt.Errorf("the file system has no %s directory (no subvolume group yet)", volumesRoot)

// Mount returns the cached mount of fsName, mounting it on first use; the
// caller releases it. A failed mount is not cached: the next call tries again.
func (m *Mounts) Mount(ctx context.Context, cluster rcsi.ClusterConfig, creds rcsi.Credentials, fsName string) (Mounted, error) {
	sum := sha256.Sum256([]byte(creds.Key))
	key := fmt.Sprintf("%s\x00%s\x00%s\x00%x\x00%s", cluster.ClusterID, cluster.MonHost(), creds.ID, sum, fsName)
	m.mu.Lock()
	if m.mounts == nil {
		m.mounts = map[string]*mountEntry{}
	}
	e, ok := m.mounts[key]
	if !ok {
		e = &mountEntry{key: key, ready: make(chan struct{})}
		m.mounts[key] = e
	}
	e.refs++
	m.mu.Unlock()
	if ok {
		select {
		case <-e.ready:
		case <-ctx.Done():
			m.release(e)
			return Mounted{}, ctx.Err()
		}
		if e.err != nil {
			m.release(e)
			return Mounted{}, e.err
		}
		return Mounted{Mnt: e.mnt, Lease: e.lease, m: m, e: e}, nil
	}
	start := time.Now()
	e.lease, e.err = m.Conns.Acquire(ctx, cluster, creds)
	if e.err == nil {
		e.mnt, e.err = m.mount(e.lease, cluster, creds, fsName)
		if e.err != nil {
			e.lease.Release()
		}
	}
	close(e.ready)
	if e.err != nil {
		m.mu.Lock()
		if m.mounts[key] == e {
			delete(m.mounts, key)
		}
		e.refs--
		m.mu.Unlock()
		return Mounted{}, e.err
	}
	klog.V(2).InfoS("mounted CephFS through libcephfs", "cluster", cluster.ClusterID, "fs", fsName, "user", creds.ID, "duration", time.Since(start))
	return Mounted{Mnt: e.mnt, Lease: e.lease, m: m, e: e}, nil
}

// Release ends the caller's use of the mount.
func (md Mounted) Release() {
	if md.e != nil {
		md.m.release(md.e)
	}
}

// Check drops the mount from the cache if err says the cluster cut its client
// off (blocklisted or evicted: ESHUTDOWN, ENOTCONN), so that the next Mount
// connects and mounts afresh; the last Release frees it. It returns err.
func (md Mounted) Check(err error) error {
	if md.e == nil || !rcsi.Broken(err) {
		return err
	}
	md.Lease.Check(err) // and the RADOS connection under it
	md.m.mu.Lock()
	first := !md.e.dropped
	md.e.dropped = true
	if md.m.mounts[md.e.key] == md.e {
		delete(md.m.mounts, md.e.key)
	}
	md.m.mu.Unlock()
	if first {
		klog.InfoS("the cluster cut off this CephFS client (blocklisted or evicted): the next call mounts again", "err", err)
	}
	return err
}

func (m *Mounts) release(e *mountEntry) {
	m.mu.Lock()
	e.refs--
	free := e.dropped && e.refs == 0 && e.mnt != nil
	m.mu.Unlock()
	if free {
		go func() { // an evicted client's unmount may take a while
			e.mnt.Unmount()
			e.mnt.Release()
			e.lease.Release()
		}()
	}
}

func (m *Mounts) mount(lease *rcsi.Lease, cluster rcsi.ClusterConfig, creds rcsi.Credentials, fsName string) (*cephfs.MountInfo, error) {
	mnt, err := cephfs.CreateFromRados(lease.Conn())
	if err != nil {
		return nil, fmt.Errorf("creating libcephfs handle: %w", err)
	}
	if err := mnt.SelectFilesystem(fsName); err != nil {
		mnt.Release()
		return nil, fmt.Errorf("selecting file system %q: %w", fsName, err)
	}
	if m.Instance != "" {
		if err := mnt.Init(); err != nil {
			mnt.Release()
			return nil, fmt.Errorf("initialising libcephfs: %w", err)
		}
		id := sha256.Sum256([]byte(m.Instance + "\x00" + cluster.ClusterID + "\x00" + fsName + "\x00" + creds.ID))
		uuid := fmt.Sprintf("rookzmq-%x", id[:16])
		reclaimed, err := reclaimAndSetUUID(mnt, uuid)
		if err != nil {
			mnt.Release()
			return nil, err
		}
		if reclaimed {
			klog.InfoS("reset the MDS session a previous driver process left", "cluster", cluster.ClusterID, "fs", fsName, "user", creds.ID)
		}
	}
	if err := mnt.MountWithRoot(volumesRoot); err != nil {
		mnt.Release()
		if rcsi.Errno(err) == syscall.ENOENT {
			return nil, errNoVolumesDir
		}
		return nil, fmt.Errorf("mounting %s of file system %q as %s: %w", volumesRoot, fsName, creds.ID, err)
	}
	return mnt, nil
}

// Close unmounts everything (releasing the capabilities the MDS would
// otherwise wait for), giving up after closeTimeout: a process that exits
// anyway must not hang on an MDS that does not answer.
func (m *Mounts) Close() {
	m.mu.Lock()
	entries := m.mounts
	m.mounts = nil
	m.mu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, e := range entries {
			<-e.ready
			if e.mnt != nil {
				e.mnt.Unmount()
				e.mnt.Release()
				e.lease.Release()
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(closeTimeout):
		klog.InfoS("gave up unmounting CephFS at shutdown", "after", closeTimeout)
	}
}

// closeTimeout bounds Close.
const closeTimeout = 5 * time.Second

// fileSystems reads the file system map.
func fileSystems(conn *rados.Conn) ([]fsInfo, error) {
	out, _, err := conn.MonCommand([]byte(`{"prefix":"fs ls","format":"json"}`))
	if err != nil {
		return nil, fmt.Errorf("listing file systems: %w", err)
	}
	var all []fsInfo
	if err := json.Unmarshal(out, &all); err != nil {
		return nil, fmt.Errorf("decoding fs ls: %w", err)
	}
	return all, nil
}

// discard drops the mount from the cache (a probe found the user cannot use
// it); the last Release frees it.
func (md Mounted) discard() {
	md.m.mu.Lock()
	md.e.dropped = true
	if md.m.mounts[md.e.key] == md.e {
		delete(md.m.mounts, md.e.key)
	}
	md.m.mu.Unlock()
}
