package csi

import (
	"crypto/sha256"
	"fmt"
	"sync"
	"time"

	"github.com/ceph/go-ceph/rados"
	"k8s.io/klog/v2"
)

// ConnTimeout bounds how long a Ceph call may wait for monitors and OSDs.
const ConnTimeout = 30 * time.Second

// Conns caches one RADOS connection per cluster, monitor list and credential, and
// one I/O context per pool and namespace on it, so that a CSI call costs no
// connection set-up.
type Conns struct {
	mu    sync.Mutex
	conns map[string]*connEntry
}

type connEntry struct {
	ready chan struct{} // closed once conn or err is set
	conn  *rados.Conn
	err   error

	mu     sync.Mutex
	ioctxs map[[2]string]*rados.IOContext

	pingMu  sync.Mutex    // guards pinging and pingErr (health.go)
	pinging chan struct{} // closed when the ping in flight ends
	pingErr error         // the last ping's result
}

// Conn returns the cached connection for cluster and creds, connecting on first use.
// A failed connection is not cached: the next call tries again.
func (c *Conns) Conn(cluster ClusterConfig, creds Credentials) (*rados.Conn, error) {
	e, err := c.entry(cluster, creds)
	if err != nil {
		return nil, err
	}
	return e.conn, nil
}

// IOContext returns a cached I/O context for pool and RADOS namespace. Callers
// must not change its namespace or close it.
func (c *Conns) IOContext(cluster ClusterConfig, creds Credentials, pool, namespace string) (*rados.IOContext, error) {
	e, err := c.entry(cluster, creds)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	k := [2]string{pool, namespace}
	if io := e.ioctxs[k]; io != nil {
		return io, nil
	}
	io, err := e.conn.OpenIOContext(pool)
	if err != nil {
		return nil, fmt.Errorf("opening pool %q: %w", pool, err)
	}
	io.SetNamespace(namespace)
	e.ioctxs[k] = io
	return io, nil
}

// Close shuts every cached connection down.
func (c *Conns) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, e := range c.conns {
		<-e.ready
		if e.conn != nil {
			for _, io := range e.ioctxs {
				io.Destroy()
			}
			e.conn.Shutdown()
		}
		delete(c.conns, k)
	}
}

func (c *Conns) entry(cluster ClusterConfig, creds Credentials) (*connEntry, error) {
	sum := sha256.Sum256([]byte(creds.Key))
	key := fmt.Sprintf("%s\x00%s\x00%s\x00%x", cluster.ClusterID, cluster.MonHost(), creds.ID, sum)
	c.mu.Lock()
	if c.conns == nil {
		c.conns = map[string]*connEntry{}
	}
	e, ok := c.conns[key]
	if !ok {
		e = &connEntry{ready: make(chan struct{}), ioctxs: map[[2]string]*rados.IOContext{}}
		c.conns[key] = e
	}
	c.mu.Unlock()
	if ok {
		<-e.ready
		if e.err == nil {
			return e, nil
		}
		return nil, e.err
	}
	start := time.Now()
	e.conn, e.err = connect(cluster, creds)
	close(e.ready)
	if e.err != nil {
		c.mu.Lock()
		delete(c.conns, key)
		c.mu.Unlock()
		return nil, e.err
	}
	klog.V(2).InfoS("connected to Ceph", "cluster", cluster.ClusterID, "user", creds.ID, "duration", time.Since(start))
	return e, nil
}

func connect(cluster ClusterConfig, creds Credentials) (*rados.Conn, error) {
	conn, err := rados.NewConnWithUser(creds.ID)
	if err != nil {
		return nil, fmt.Errorf("creating RADOS handle: %w", err)
	}
	timeout := fmt.Sprint(int(ConnTimeout.Seconds()))
	for _, o := range [][2]string{
		// Logging off first: librados prints a key it cannot decode.
		{"log_to_stderr", "false"},
		{"err_to_stderr", "false"},
		{"log_file", ""},
		{"admin_socket", ""},
		{"mon_host", cluster.MonHost()},
		{"keyring", ""},
		{"key", creds.Key},
		{"client_mount_timeout", timeout},
		{"rados_mon_op_timeout", timeout},
		{"rados_osd_op_timeout", timeout},
	} {
		if err := conn.SetConfigOption(o[0], o[1]); err != nil {
			conn.Shutdown()
			// Never echo the value: one of them is the key.
			return nil, fmt.Errorf("setting Ceph option %s: %w", o[0], err)
		}
	}
	if err := conn.Connect(); err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("connecting to cluster %q as %s: %w", cluster.ClusterID, creds.ID, err)
	}
	return conn, nil
}
