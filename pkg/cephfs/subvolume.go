package cephfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/cephfs"
	"github.com/google/uuid"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// The on-disk layout of a version 2 subvolume, as the mgr volumes module of
// Ceph Pacific writes and reads it (mgr/volumes/fs/operations/versions):
//
//	/volumes/<group>/<name>/            base directory, xattr ceph.dir.subvolume=1
//	/volumes/<group>/<name>/.meta       INI file: [GLOBAL] version, type, path, state; [USER_METADATA]
//	/volumes/<group>/<name>/<uuid>/     the data directory: quota, pool layout, owner of the group
//	/volumes/_<group>:<name>.meta       the auth metadata file (empty until ids are authorised)
//	/volumes/_deleting/<entry>/         removed base directories, purged by us and the mgr
const (
	trashDir        = "_deleting"
	metaFile        = ".meta"
	subvolumeMode   = 0o755 // `ceph fs subvolume create` default
	metaMode        = 0o640
	trashMode       = 0o700
	authMetaMode    = 0o755
	xattrSubvolume  = "ceph.dir.subvolume"
	xattrQuota      = "ceph.quota.max_bytes"
	xattrPool       = "ceph.dir.layout.pool"
	metaGlobal      = "GLOBAL"
	metaUser        = "USER_METADATA"
	subvolumeV2     = "2"
	typeSubvolume   = "subvolume"
	stateComplete   = "complete"
	errPartialMeta  = "subvolume metadata is incomplete"
	maxMetaFileSize = 1 << 20
)

// errNoGroup means the subvolume group directory does not exist.
var errNoGroup = errors.New("subvolume group does not exist")

// subvolumes reads and writes the subvolumes of one group through a mount
// rooted at /volumes.
type subvolumes struct {
	mnt   *cephfs.MountInfo
	group string
	// defaultPool is the file system's first data pool, used when no
	// ancestor directory names one.
	defaultPool string
	// poolCache, when set, keeps the inherited pool for a short while, so
	// that a create does not read the group's layout every time.
	poolCache *poolCache
}

// poolCache remembers a group's inherited data pool for poolCacheTTL.
type poolCache struct {
	mu   sync.Mutex
	pool string
	at   time.Time
}

// poolCacheTTL bounds how long a change of the group's layout goes unseen.
const poolCacheTTL = 30 * time.Second

// subvolume is what .meta and the data directory say about one subvolume.
type subvolume struct {
	Path  string // absolute in the file system: /volumes/<group>/<name>/<uuid>
	State string
	Quota int64 // 0: no quota
	User  map[string]string
}

func (s *subvolumes) base(name string) string { return "/" + s.group + "/" + name }

// rel turns an absolute file system path under /volumes into a mount path.
func rel(abs string) (string, error) {
	r, ok := strings.CutPrefix(abs, volumesRoot+"/")
	if !ok {
		return "", fmt.Errorf("subvolume path %q is not under %s", abs, volumesRoot)
	}
	return "/" + r, nil
}

// Get reads a subvolume; a missing one is an error with errno ENOENT.
func (s *subvolumes) Get(name string) (*subvolume, error) {
	meta, err := s.readMeta(name)
	if err != nil {
		return nil, err
	}
	sv := &subvolume{Path: meta[metaGlobal]["path"], State: meta[metaGlobal]["state"], User: meta[metaUser]}
	if sv.State != stateComplete {
		return sv, nil
	}
	p, err := rel(sv.Path)
	if err != nil {
		return nil, err
	}
	q, err := s.mnt.GetXattr(p, xattrQuota)
	switch {
	case rcsi.Errno(err) == syscall.ENODATA:
	case err != nil:
		return nil, fmt.Errorf("reading the quota of %s: %w", sv.Path, err)
	default:
		if sv.Quota, err = strconv.ParseInt(strings.TrimSpace(string(q)), 10, 64); err != nil {
			return nil, fmt.Errorf("quota of %s is %q: %w", sv.Path, q, err)
		}
	}
	return sv, nil
}

// Create makes subvolume name with quota bytes (0: none) in data pool (""
// inherits), owned like its group, recording user metadata, exactly as `ceph
// fs subvolume create` does. Unless fresh (a name nothing can have used
// yet), a leftover of an interrupted Create of the same name (a base
// directory without .meta) is cleared first.
func (s *subvolumes) Create(name string, quota int64, pool string, user map[string]string, fresh bool) (*subvolume, error) {
	group, err := s.mnt.Statx("/"+s.group, cephfs.StatxBasicStats, 0)
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil, errNoGroup
	} else if err != nil {
		return nil, fmt.Errorf("reading group %s: %w", s.group, err)
	}
	base := s.base(name)
	if !fresh {
		if err := s.clearPartial(base); err != nil {
			return nil, err
		}
	}
	data := base + "/" + uuid.NewString()
	if err := s.mnt.MakeDirs(data, subvolumeMode); err != nil {
		return nil, fmt.Errorf("creating %s: %w", data, err)
	}
	if err := s.mnt.SetXattr(base, xattrSubvolume, []byte("1"), 0); err != nil {
		return nil, fmt.Errorf("marking %s a subvolume: %w", base, err)
	}
	rcsi.CrashPoint("cephfs-create-after-mkdir")
	if quota > 0 {
		if err := s.mnt.SetXattr(data, xattrQuota, []byte(strconv.FormatInt(quota, 10)), 0); err != nil {
			return nil, fmt.Errorf("setting the quota of %s: %w", data, err)
		}
	}
	if pool == "" {
		// Pin the inherited pool, as the mgr does, so that a later change of
		// an ancestor's layout does not move the subvolume's new files.
		if pool, err = s.inheritedPool(); err != nil {
			return nil, err
		}
	}
	if err := s.mnt.SetXattr(data, xattrPool, []byte(pool), 0); err != nil {
		if rcsi.Errno(err) == syscall.EINVAL {
			return nil, fmt.Errorf("pool %q is not a data pool of the file system: %w", pool, err)
		}
		return nil, fmt.Errorf("setting the data pool of %s: %w", data, err)
	}
	if int(group.Uid) != os.Geteuid() || int(group.Gid) != os.Getegid() {
		if err := s.mnt.Chown(data, group.Uid, group.Gid); err != nil {
			return nil, fmt.Errorf("setting the owner of %s: %w", data, err)
		}
	}
	abs := volumesRoot + data
	meta := map[string]map[string]string{metaGlobal: {
		"version": subvolumeV2, "type": typeSubvolume, "path": abs, "state": stateComplete}}
	if len(user) > 0 {
		meta[metaUser] = user
	}
	if err := s.writeMeta(base, meta); err != nil {
		return nil, err
	}
	f, err := s.mnt.Open(s.authMeta(name), os.O_CREATE|os.O_WRONLY, authMetaMode)
	if err != nil {
		return nil, fmt.Errorf("creating the auth metadata file of %s: %w", name, err)
	}
	f.Close()
	return &subvolume{Path: abs, State: stateComplete, Quota: quota, User: user}, nil
}

// clearPartial removes what an interrupted Create left: empty data
// directories and temporary files under a base directory that has no .meta.
// A base directory with .meta is left alone; Create then fails with EEXIST.
func (s *subvolumes) clearPartial(base string) error {
	_, err := s.mnt.Statx(base+"/"+metaFile, cephfs.StatxBasicStats, 0)
	if err == nil {
		return fmt.Errorf("%s already exists: %w", base, syscall.EEXIST)
	}
	if rcsi.Errno(err) != syscall.ENOENT {
		return fmt.Errorf("reading %s: %w", base, err)
	}
	names, err := s.list(base)
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil
	} else if err != nil {
		return err
	}
	for _, n := range names {
		if n.name == createLock {
			continue // held by the caller
		}
		p := base + "/" + n.name
		if n.dir {
			err = s.mnt.RemoveDir(p) // fails (ENOTEMPTY) on anything with data
		} else {
			err = s.mnt.Unlink(p)
		}
		if err != nil && rcsi.Errno(err) != syscall.ENOENT {
			return fmt.Errorf("clearing the leftover of an interrupted create at %s: %w", p, err)
		}
	}
	return nil
}

func (s *subvolumes) inheritedPool() (string, error) {
	if c := s.poolCache; c != nil {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.pool != "" && time.Since(c.at) < poolCacheTTL {
			return c.pool, nil
		}
		pool, err := s.readInheritedPool()
		if err == nil {
			c.pool, c.at = pool, time.Now()
		}
		return pool, err
	}
	return s.readInheritedPool()
}

func (s *subvolumes) readInheritedPool() (string, error) {
	for _, dir := range []string{"/" + s.group, "/"} {
		v, err := s.mnt.GetXattr(dir, xattrPool)
		if err == nil && len(v) > 0 {
			return string(v), nil
		}
		if err != nil && rcsi.Errno(err) != syscall.ENODATA {
			return "", fmt.Errorf("reading the layout of %s%s: %w", volumesRoot, dir, err)
		}
	}
	if s.defaultPool == "" {
		return "", errors.New("the file system has no data pool")
	}
	return s.defaultPool, nil
}

// Resize sets the quota of a complete subvolume.
func (s *subvolumes) Resize(_ string, sv *subvolume, quota int64) error {
	p, err := rel(sv.Path)
	if err != nil {
		return err
	}
	if err := s.mnt.SetXattr(p, xattrQuota, []byte(strconv.FormatInt(quota, 10)), 0); err != nil {
		return fmt.Errorf("setting the quota of %s: %w", sv.Path, err)
	}
	return nil
}

// SetUser adds user metadata to .meta (rewritten through a temporary file
// and a rename). Our own Create writes it with .meta in one rename; a
// subvolume the mgr path made may lack it after a crash.
func (s *subvolumes) SetUser(name string, user map[string]string) error {
	meta, err := s.readMeta(name)
	if err != nil {
		return err
	}
	if meta[metaUser] == nil {
		meta[metaUser] = map[string]string{}
	}
	for k, v := range user {
		meta[metaUser][k] = v
	}
	return s.writeMeta(s.base(name), meta)
}

// Exists says whether the base directory of name exists.
func (s *subvolumes) Exists(name string) (bool, error) {
	_, err := s.mnt.Statx(s.base(name), cephfs.StatxBasicStats, 0)
	if rcsi.Errno(err) == syscall.ENOENT {
		return false, nil
	}
	return err == nil, err
}

// Trash moves the base directory of name to /volumes/_deleting/<entry> (as
// `ceph fs subvolume rm` does) and removes its auth metadata file. A base
// directory already gone is fine. The rename is only tried on a base
// directory that exists: with Pacific's libcephfs, a rename that fails with
// ENOENT onto an existing trash entry left later lookups of that entry
// hanging in the client (seen here, 16.2.15).
func (s *subvolumes) Trash(name, entry string) error {
	exists, err := s.Exists(name)
	if err != nil {
		return fmt.Errorf("looking up %s: %w", s.base(name), err)
	}
	if exists {
		if _, err := s.mnt.Statx("/"+trashDir, cephfs.StatxBasicStats, 0); rcsi.Errno(err) == syscall.ENOENT {
			if err := s.mnt.MakeDir("/"+trashDir, trashMode); err != nil && rcsi.Errno(err) != syscall.EEXIST {
				return fmt.Errorf("creating %s/%s: %w", volumesRoot, trashDir, err)
			}
		} else if err != nil {
			return fmt.Errorf("reading %s/%s: %w", volumesRoot, trashDir, err)
		}
		if err := s.mnt.Rename(s.base(name), "/"+trashDir+"/"+entry); err != nil {
			return fmt.Errorf("moving %s to the trash: %w", s.base(name), err)
		}
	}
	if err := s.mnt.Unlink(s.authMeta(name)); err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return fmt.Errorf("removing the auth metadata file of %s: %w", name, err)
	}
	return nil
}

// Purge removes trash entry and everything under it; a missing entry is fine
// (the mgr's purge threads may have got there first).
func (s *subvolumes) Purge(entry string) error {
	return s.rmtree("/" + trashDir + "/" + entry)
}

func (s *subvolumes) rmtree(dir string) error {
	names, err := s.list(dir)
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil
	} else if err != nil {
		return err
	}
	for _, n := range names {
		p := dir + "/" + n.name
		if n.dir {
			err = s.rmtree(p)
		} else if err = s.mnt.Unlink(p); rcsi.Errno(err) == syscall.ENOENT {
			err = nil
		}
		if err != nil {
			return fmt.Errorf("purging %s: %w", p, err)
		}
	}
	if err := s.mnt.RemoveDir(dir); err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return fmt.Errorf("purging %s: %w", dir, err)
	}
	return nil
}

type dirent struct {
	name string
	dir  bool
}

func (s *subvolumes) list(dir string) ([]dirent, error) {
	d, err := s.mnt.OpenDir(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	var out []dirent
	for {
		e, err := d.ReadDir()
		if err != nil {
			return nil, fmt.Errorf("reading directory %s: %w", dir, err)
		}
		if e == nil {
			return out, nil
		}
		if n := e.Name(); n != "." && n != ".." {
			out = append(out, dirent{name: n, dir: e.DType() == cephfs.DTypeDir})
		}
	}
}

func (s *subvolumes) authMeta(name string) string { return "/_" + s.group + ":" + name + metaFile }

// readMeta reads and parses .meta; a missing one is an error with errno ENOENT.
func (s *subvolumes) readMeta(name string) (map[string]map[string]string, error) {
	f, err := s.mnt.Open(s.base(name)+"/"+metaFile, os.O_RDONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the metadata of subvolume %s: %w", name, err)
	}
	defer f.Close()
	buf := make([]byte, 0, 512)
	chunk := make([]byte, 4096)
	for len(buf) <= maxMetaFileSize {
		n, err := f.Read(chunk)
		buf = append(buf, chunk[:n]...)
		if errors.Is(err, io.EOF) || (err == nil && n == 0) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("reading the metadata of subvolume %s: %w", name, err)
		}
	}
	meta := parseMeta(string(buf))
	if meta[metaGlobal]["version"] == "" || meta[metaGlobal]["state"] == "" {
		return nil, fmt.Errorf("subvolume %s: %s", name, errPartialMeta)
	}
	return meta, nil
}

// writeMeta writes .meta through a temporary file and a rename, as the mgr does.
func (s *subvolumes) writeMeta(base string, meta map[string]map[string]string) error {
	tmp := base + "/" + metaFile + ".tmp"
	f, err := s.mnt.Open(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, metaMode)
	if err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	_, err = f.Write([]byte(formatMeta(meta)))
	if err == nil {
		err = f.Fsync(cephfs.SyncAll)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = s.mnt.Rename(tmp, base+"/"+metaFile)
	}
	if err != nil {
		return fmt.Errorf("writing %s/%s: %w", path.Clean(base), metaFile, err)
	}
	return nil
}
