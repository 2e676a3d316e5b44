package cephfs

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/cephfs/admin"
	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// store is how the controller reaches the subvolumes of one group: its own
// libcephfs mount (subvolumes) or the mgr volumes module (mgrSubvolumes).
// Both see and make the same on-disk subvolumes.
type store interface {
	// Get reads a subvolume; a missing one is an error with errno ENOENT.
	Get(name string) (*subvolume, error)
	// Create makes subvolume name with quota bytes (0: none) in data pool
	// ("" inherits), recording user metadata; errNoGroup if the group is
	// missing. fresh says nothing can have used the name yet.
	Create(name string, quota int64, pool string, user map[string]string, fresh bool) (*subvolume, error)
	// SetUser records user metadata on an existing subvolume (a create
	// retried after a crash may find one without it).
	SetUser(name string, user map[string]string) error
	// Resize sets the quota of a complete subvolume.
	Resize(name string, sv *subvolume, quota int64) error
	// exclusive runs fn while no other controller process creates name.
	exclusive(ctx context.Context, name string, fn func() error) error
	// Trash removes name from the group (a missing one is fine); entry
	// names its trash entry where the store chooses it.
	Trash(name, entry string) error
	// Purge removes what Trash left in the trash; a missing entry is fine.
	Purge(entry string) error
}

// mgrSubvolumes reaches subvolumes through the mgr volumes module (go-ceph
// cephfs/admin): for users without the MDS caps the libcephfs path needs.
// Every call waits for the mgr's single thread; the connection's
// rados_mon_op_timeout bounds each.
type mgrSubvolumes struct {
	conn  admin.RadosCommander
	fsa   *admin.FSAdmin
	fs    string
	group string
}

func newMgrSubvolumes(conn admin.RadosCommander, fs, group string) *mgrSubvolumes {
	return &mgrSubvolumes{conn: conn, fsa: admin.NewFromConn(conn), fs: fs, group: group}
}

// Get is `fs subvolume info`.
func (s *mgrSubvolumes) Get(name string) (*subvolume, error) {
	info, err := s.fsa.SubVolumeInfo(s.fs, s.group, name)
	if err != nil {
		return nil, fmt.Errorf("fs subvolume info %s: %w", name, err)
	}
	sv := &subvolume{Path: info.Path, State: string(info.State)}
	if q, ok := info.BytesQuota.(admin.ByteCount); ok {
		sv.Quota = int64(q)
	}
	return sv, nil
}

// Create is `fs subvolume create` (mode 0755, the group's owner), then one
// `fs subvolume metadata set` per user key, then `fs subvolume info` for
// the path the mgr chose.
func (s *mgrSubvolumes) Create(name string, quota int64, pool string, user map[string]string, _ bool) (*subvolume, error) {
	start := time.Now()
	err := s.fsa.CreateSubVolume(s.fs, s.group, name, &admin.SubVolumeOptions{
		Size: admin.ByteCount(quota), Mode: subvolumeMode, PoolLayout: pool})
	if rcsi.Errno(err) == syscall.ENOENT {
		return nil, errNoGroup // the only thing create can miss: the file system was checked
	} else if err != nil {
		return nil, fmt.Errorf("fs subvolume create %s: %w", name, err)
	}
	rcsi.CrashPoint("cephfs-create-after-mgr-create")
	if err := s.SetUser(name, user); err != nil {
		return nil, err
	}
	sv, err := s.Get(name)
	if err != nil {
		return nil, err
	}
	klog.V(4).InfoS("created subvolume through the mgr", "fs", s.fs, "group", s.group, "subvolume", name, "duration", time.Since(start))
	return sv, nil
}

// SetUser is `fs subvolume metadata set` for each key (Pacific has the
// command; go-ceph builds its wrapper only for later releases).
func (s *mgrSubvolumes) SetUser(name string, user map[string]string) error {
	keys := make([]string, 0, len(user))
	for k := range user {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		cmd, err := json.Marshal(map[string]string{"prefix": "fs subvolume metadata set", "format": "json",
			"vol_name": s.fs, "group_name": s.group, "sub_name": name, "key_name": k, "value": user[k]})
		if err != nil {
			return err
		}
		if _, st, err := s.conn.MgrCommand([][]byte{cmd}); err != nil {
			return fmt.Errorf("fs subvolume metadata set %s %s: %w (%s)", name, k, err, st)
		}
	}
	return nil
}

// Resize is `fs subvolume resize` (never below the bytes in use).
func (s *mgrSubvolumes) Resize(name string, _ *subvolume, quota int64) error {
	if _, err := s.fsa.ResizeSubVolume(s.fs, s.group, name, admin.ByteCount(quota), true); err != nil {
		return fmt.Errorf("fs subvolume resize %s: %w", name, err)
	}
	return nil
}

// exclusive runs fn: the journal gave name to one request, the caller holds
// this process's lock on it, and the mgr runs one create at a time (a second
// create of an existing subvolume only sets its attributes again).
func (s *mgrSubvolumes) exclusive(_ context.Context, _ string, fn func() error) error { return fn() }

// Trash is `fs subvolume rm`: the mgr moves the subvolume to its trash and
// its purge threads purge it. A subvolume already gone is success.
func (s *mgrSubvolumes) Trash(name, _ string) error {
	err := s.fsa.RemoveSubVolume(s.fs, s.group, name)
	if err != nil && rcsi.Errno(err) != syscall.ENOENT {
		return fmt.Errorf("fs subvolume rm %s: %w", name, err)
	}
	return nil
}

// Purge does nothing: the mgr's purge threads purge its trash.
func (s *mgrSubvolumes) Purge(string) error { return nil }
