package csi

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

// ClusterConfig is one entry of the clusters file, in ceph-csi's config.json shape.
type ClusterConfig struct {
	ClusterID string   `json:"clusterID"`
	Monitors  []string `json:"monitors"`
	RBD       struct {
		RadosNamespace string `json:"radosNamespace"`
	} `json:"rbd"`
	CephFS struct {
		SubvolumeGroup string `json:"subvolumeGroup"`
	} `json:"cephFS"`
}

// ErrUnknownCluster is returned (wrapped) for a clusterID the file does not list.
var ErrUnknownCluster = errors.New("unknown clusterID")

// Clusters reads the clusters file, re-reading it when it changes on disk, so a
// mounted ConfigMap can be edited without restarting the driver.
type Clusters struct {
	path string

	mu      sync.Mutex
	modTime time.Time
	size    int64
	byID    map[string]ClusterConfig
}

// NewClusters loads path once so a broken file fails at start-up.
func NewClusters(path string) (*Clusters, error) {
	c := &Clusters{path: path}
	if _, err := c.load(); err != nil {
		return nil, err
	}
	return c, nil
}

// Get returns the cluster with the given ID, or an error wrapping ErrUnknownCluster.
func (c *Clusters) Get(id string) (ClusterConfig, error) {
	byID, err := c.load()
	if err != nil {
		return ClusterConfig{}, err
	}
	cc, ok := byID[id]
	if !ok {
		return ClusterConfig{}, fmt.Errorf("%w %q: not in clusters file %s", ErrUnknownCluster, id, c.path)
	}
	return cc, nil
}

func (c *Clusters) load() (map[string]ClusterConfig, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st, err := os.Stat(c.path)
	if err != nil {
		return nil, fmt.Errorf("clusters file: %w", err)
	}
	if c.byID != nil && st.ModTime().Equal(c.modTime) && st.Size() == c.size {
		return c.byID, nil
	}
	data, err := os.ReadFile(c.path)
	if err != nil {
		return nil, fmt.Errorf("clusters file: %w", err)
	}
	byID, err := ParseClusters(data)
	if err != nil {
		return nil, fmt.Errorf("clusters file %s: %w", c.path, err)
	}
	c.byID, c.modTime, c.size = byID, st.ModTime(), st.Size()
	return byID, nil
}

// ParseClusters decodes and checks the clusters file contents.
func ParseClusters(data []byte) (map[string]ClusterConfig, error) {
	var list []ClusterConfig
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, err
	}
	byID := make(map[string]ClusterConfig, len(list))
	for i, cc := range list {
		switch {
		case cc.ClusterID == "":
			return nil, fmt.Errorf("entry %d has no clusterID", i)
		case len(cc.Monitors) == 0:
			return nil, fmt.Errorf("cluster %q has no monitors", cc.ClusterID)
		}
		if _, dup := byID[cc.ClusterID]; dup {
			return nil, fmt.Errorf("cluster %q is listed twice", cc.ClusterID)
		}
		for _, m := range cc.Monitors {
			if m == "" || strings.ContainsAny(m, " \t\n,") {
				return nil, fmt.Errorf("cluster %q: bad monitor address %q", cc.ClusterID, m)
			}
		}
		byID[cc.ClusterID] = cc
	}
	return byID, nil
}

// MonHost is the monitor list in the form of ceph.conf's mon_host option.
func (cc ClusterConfig) MonHost() string { return strings.Join(cc.Monitors, ",") }

// IDs lists the cluster IDs in the file, sorted.
func (c *Clusters) IDs() []string {
	byID, err := c.load()
	if err != nil {
		return nil
	}
	ids := make([]string, 0, len(byID))
	for id := range byID {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}
