package cephfs

import (
	"context"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fsCacheTTL bounds how long the file system map is trusted (new data pools,
// removed file systems).
const fsCacheTTL = 30 * time.Second

// state is the controller's caches: the file system map per cluster and one
// purger per subvolume group.
type state struct {
	mu      sync.Mutex
	fsCache map[string]fsCached
	purgers map[string]*purger
	pools   map[string]*poolCache
}

// poolCacheFor returns the inherited-pool cache of a group.
func (s *state) poolCacheFor(clusterID, fsName, group string) *poolCache {
	key := clusterID + "\x00" + fsName + "\x00" + group
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pools == nil {
		s.pools = map[string]*poolCache{}
	}
	pc := s.pools[key]
	if pc == nil {
		pc = &poolCache{}
		s.pools[key] = pc
	}
	return pc
}

type fsCached struct {
	at  time.Time
	all []fsInfo
}

// fileSystem returns fsName's map entry; NotFound if there is no such file system.
func (s *state) fileSystem(conn *rados.Conn, clusterID, fsName string) (*fsInfo, error) {
	s.mu.Lock()
	cached, ok := s.fsCache[clusterID]
	s.mu.Unlock()
	find := func(all []fsInfo) *fsInfo {
		for i := range all {
			if all[i].Name == fsName && len(all[i].DataPools) > 0 {
				return &all[i]
			}
		}
		return nil
	}
	if ok && time.Since(cached.at) < fsCacheTTL {
		if fs := find(cached.all); fs != nil {
			return fs, nil
		}
	}
	all, err := fileSystems(conn)
	if err != nil {
		return nil, cephStatus(err, "reading the file system map of cluster %q", clusterID)
	}
	s.mu.Lock()
	if s.fsCache == nil {
		s.fsCache = map[string]fsCached{}
	}
	s.fsCache[clusterID] = fsCached{at: time.Now(), all: all}
	s.mu.Unlock()
	if fs := find(all); fs != nil {
		return fs, nil
	}
	return nil, status.Errorf(codes.NotFound, "file system %q does not exist in cluster %q", fsName, clusterID)
}

// purgerFor returns the purger of t's group, starting it (and so resuming
// the removals its journal promised) on first use.
func (s *state) purgerFor(t *target, open func(ctx context.Context) (*target, error), lock func(ctx context.Context, sv string) (func(), error)) *purger {
	key := t.clusterID + "\x00" + t.fs.Name + "\x00" + t.group
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.purgers == nil {
		s.purgers = map[string]*purger{}
	}
	p := s.purgers[key]
	if p == nil {
		p = newPurger(t.group, open, lock)
		s.purgers[key] = p
	}
	return p
}
