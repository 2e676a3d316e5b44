package csi

import (
	"context"
	"crypto/sha256"
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// ConnTimeout bounds a connection attempt (client_mount_timeout) of a call
// without a deadline, or with a longer one.
const ConnTimeout = 30 * time.Second

// OpTimeout bounds one Ceph operation on a cached connection
// (rados_osd_op_timeout, rados_mon_op_timeout): an operation left running by
// a call that answered at its deadline ends at most this long after it began.
const OpTimeout = 10 * time.Second

// Budget is the time a call may spend before it must answer: its deadline
// less a margin (a tenth, at most a second) for the answer to travel, at most
// max. Without a deadline it is max.
func Budget(ctx context.Context, max time.Duration) time.Duration {
	d, ok := ctx.Deadline()
	if !ok {
		return max
	}
	left := time.Until(d)
	left -= min(left/10, time.Second)
	return min(left, max)
}

// UnreachableError says a cluster's monitors did not answer in time. It is
// Unavailable for gRPC.
type UnreachableError struct {
	Cluster  string
	Monitors string
	Waited   time.Duration
	Err      error // Ceph's error, if Ceph gave up first
}

func (e *UnreachableError) Error() string {
	s := fmt.Sprintf("cluster %q: monitors %s did not answer within %s", e.Cluster, e.Monitors, e.Waited.Round(time.Millisecond))
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// GRPCStatus makes the error Unavailable.
func (e *UnreachableError) GRPCStatus() *status.Status {
	return status.New(codes.Unavailable, e.Error())
}

// Broken reports whether err says the connection itself is finished: shut
// down, or blocklisted by the cluster (EBLOCKLISTED is ESHUTDOWN). Such a
// connection never works again; a new one does.
func Broken(err error) bool {
	switch Errno(err) {
	case syscall.ESHUTDOWN, syscall.ENOTCONN:
		return true
	}
	return false
}

// Conns caches one RADOS connection per cluster, monitor list and credential, and
// one I/O context per pool and namespace on it, so that a CSI call costs no
// connection set-up. A connection found broken is dropped, and closed once its
// last lease is released.
type Conns struct {
	mu    sync.Mutex
	conns map[string]*connEntry
}

type connEntry struct {
	key     string
	cluster ClusterConfig
	ready   chan struct{} // closed once conn or err is set
	conn    *rados.Conn
	err     error

	mu      sync.Mutex
	ioctxs  map[[2]string]*rados.IOContext
	leases  int
	dropped bool

	pingMu  sync.Mutex    // guards pinging and pingErr (health.go)
	pinging chan struct{} // closed when the ping in flight ends
	pingErr error         // the last ping's result
}

// Lease is one call's use of a cached connection. Release it when done,
// after the last Ceph operation of the call (also one that outlived the call).
type Lease struct {
	c    *Conns
	e    *connEntry
	once sync.Once
}

// Acquire returns a lease on the cached connection for cluster and creds,
// connecting on first use. Waiting for a connection in progress ends with ctx
// or its Budget: the answer is then an UnreachableError. A connection attempt
// is bounded by the Budget of the call that starts it (client_mount_timeout);
// it goes on after that call gave up, and a failed one is not cached.
func (c *Conns) Acquire(ctx context.Context, cluster ClusterConfig, creds Credentials) (*Lease, error) {
	sum := sha256.Sum256([]byte(creds.Key))
	key := fmt.Sprintf("%s\x00%s\x00%s\x00%x", cluster.ClusterID, cluster.MonHost(), creds.ID, sum)
	budget := Budget(ctx, ConnTimeout)
	start := time.Now()
	timer := time.NewTimer(max(budget, 0))
	defer timer.Stop()
	for {
		c.mu.Lock()
		if c.conns == nil {
			c.conns = map[string]*connEntry{}
		}
		e, ok := c.conns[key]
		if !ok {
			e = &connEntry{key: key, cluster: cluster, ready: make(chan struct{}), ioctxs: map[[2]string]*rados.IOContext{}}
			c.conns[key] = e
			go c.connect(e, creds, budget)
		}
		c.mu.Unlock()

		select {
		case <-e.ready:
		case <-ctx.Done():
			return nil, &UnreachableError{Cluster: cluster.ClusterID, Monitors: cluster.MonHost(), Waited: time.Since(start), Err: ctx.Err()}
		case <-timer.C:
			return nil, &UnreachableError{Cluster: cluster.ClusterID, Monitors: cluster.MonHost(), Waited: time.Since(start)}
		}
		if e.err != nil {
			return nil, e.err
		}
		e.mu.Lock()
		if e.dropped {
			// Dropped since we found it (and maybe closed): look again.
			e.mu.Unlock()
			continue
		}
		e.leases++
		e.mu.Unlock()
		return &Lease{c: c, e: e}, nil
	}
}

func (c *Conns) connect(e *connEntry, creds Credentials, budget time.Duration) {
	start := time.Now()
	conn, err := connect(e.cluster, creds, budget)
	if err != nil && Errno(err) == syscall.ETIMEDOUT {
		err = &UnreachableError{Cluster: e.cluster.ClusterID, Monitors: e.cluster.MonHost(), Waited: time.Since(start), Err: err}
	}
	e.conn, e.err = conn, err
	close(e.ready)
	if err != nil {
		c.forget(e)
		klog.InfoS("connecting to Ceph failed", "cluster", e.cluster.ClusterID, "monitors", e.cluster.MonHost(), "user", creds.ID,
			"duration", time.Since(start), "err", err)
		return
	}
	addr, _ := conn.GetAddrs()
	klog.V(2).InfoS("connected to Ceph", "cluster", e.cluster.ClusterID, "user", creds.ID, "clientAddr", addr,
		"instanceID", conn.GetInstanceID(), "duration", time.Since(start))
}

// forget removes e from the cache (if it is still the cached entry for its key).
func (c *Conns) forget(e *connEntry) {
	c.mu.Lock()
	if c.conns[e.key] == e {
		delete(c.conns, e.key)
	}
	c.mu.Unlock()
}

// Conn is the leased connection.
func (l *Lease) Conn() *rados.Conn { return l.e.conn }

// IOContext returns a cached I/O context for pool and RADOS namespace. Callers
// must not change its namespace or close it.
func (l *Lease) IOContext(pool, namespace string) (*rados.IOContext, error) {
	e := l.e
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

// Check passes err through; if err says the connection is broken (see
// Broken), the connection is dropped from the cache so that the next call
// connects again.
func (l *Lease) Check(err error) error {
	if err != nil && Broken(err) {
		l.e.mu.Lock()
		first := !l.e.dropped
		l.e.dropped = true
		l.e.mu.Unlock()
		l.c.forget(l.e)
		if first {
			klog.InfoS("dropping a broken Ceph connection (blocklisted or shut down); the next call reconnects",
				"cluster", l.e.cluster.ClusterID, "err", err)
		}
	}
	return err
}

// Release ends the lease; a dropped connection is closed with its last lease.
func (l *Lease) Release() {
	l.once.Do(func() {
		e := l.e
		e.mu.Lock()
		e.leases--
		closeNow := e.dropped && e.leases == 0
		e.mu.Unlock()
		if closeNow {
			e.shutdown()
		}
	})
}

func (e *connEntry) shutdown() {
	for _, io := range e.ioctxs {
		io.Destroy()
	}
	e.ioctxs = nil
	e.conn.Shutdown()
}

// Close shuts down every cached connection that no call is using (at exit,
// one still in use is left to the process's end).
func (c *Conns) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, e := range c.conns {
		select {
		case <-e.ready:
		default:
			continue // still connecting
		}
		delete(c.conns, k)
		if e.conn == nil {
			continue
		}
		e.mu.Lock()
		e.dropped = true
		idle := e.leases == 0
		e.mu.Unlock()
		if idle {
			e.shutdown()
		}
	}
}

func connect(cluster ClusterConfig, creds Credentials, budget time.Duration) (*rados.Conn, error) {
	conn, err := rados.NewConnWithUser(creds.ID)
	if err != nil {
		return nil, fmt.Errorf("creating RADOS handle: %w", err)
	}
	// Whole seconds (rados_mon_op_timeout takes no fraction), at least one.
	mount := fmt.Sprint(max(int(budget/time.Second), 1))
	op := fmt.Sprint(int(OpTimeout / time.Second))
	for _, o := range [][2]string{
		// Logging off first: librados prints a key it cannot decode.
		{"log_to_stderr", "false"},
		{"err_to_stderr", "false"},
		{"log_file", ""},
		{"admin_socket", ""},
		{"mon_host", cluster.MonHost()},
		{"keyring", ""},
		{"key", creds.Key},
		{"client_mount_timeout", mount},
		{"rados_mon_op_timeout", op},
		{"rados_osd_op_timeout", op},
	} {
		if err := conn.SetConfigOption(o[0], o[1]); err != nil {
			conn.Shutdown()
			// Never echo the value: one of them is the key.
			return nil, fmt.Errorf("setting Ceph option %s: %w", o[0], err)
		}
	}
	if err := conn.Connect(); err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("connecting to cluster %q (monitors %s) as %s: %w", cluster.ClusterID, cluster.MonHost(), creds.ID, err)
	}
	return conn, nil
}

// Bounded runs f on its own goroutine and waits for it until ctx's deadline
// less half the Budget margin; if f has not returned by then, Bounded answers
// late(waited) while f goes on (Ceph's own timeouts end it; it must release
// what it holds itself). f gets a context that ends at the Budget, so that
// what f waits for in Go (locks, a connection in progress) gives up first.
func Bounded(ctx context.Context, f func(ctx context.Context) error, late func(waited time.Duration) error) error {
	d, ok := ctx.Deadline()
	if !ok {
		return f(ctx)
	}
	budget := Budget(ctx, time.Until(d))
	inner, cancel := context.WithTimeout(ctx, budget)
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		defer cancel()
		done <- f(inner)
	}()
	wait := time.NewTimer(max(budget+(time.Until(d)-budget)/2, 0))
	defer wait.Stop()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	case <-wait.C:
	}
	return late(time.Since(start))
}
