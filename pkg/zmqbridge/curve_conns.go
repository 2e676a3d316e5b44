package zmqbridge

import (
	"fmt"
	"net"
	"time"

	zmq "github.com/pebbe/zmq4"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// curveConns tracks the TCP connections of the CURVE events socket, so that a
// revoked (or narrowed) key's connections can be cut while every other
// subscriber stays connected. libzmq 4.3's stable API cannot drop one peer of
// an XPUB socket, so the bridge shuts the connection's socket down itself
// (shutdown(2): libzmq sees the peer go and closes the descriptor).
//
// Matching a connection to its key: the socket monitor reports each accepted
// descriptor; a ZAP request names the peer's IP address but not its port. The
// ZAP handler drains the monitor before it answers (libzmq reports the
// connection before it can send its ZAP request), so the connection being
// authenticated is one of the unclaimed connections from that address still
// within the handshake interval. When it is the only one, it is claimed with
// the key; when several handshake at once from one address, each of them
// takes the key as a possible one. A connection's set of keys therefore
// always holds its real key: revoking a key may cut an innocent connection
// that handshook at the same moment from the same address (it reconnects),
// but never leaves the revoked one connected.
type curveConns struct {
	window time.Duration // a connection authenticates within this after its accept
	byFD   map[int]*curveConn
	now    func() time.Time
	// cut shuts a connection down if its descriptor is still that connection.
	cut func(c *curveConn) bool
}

// curveConn is one accepted connection.
type curveConn struct {
	fd      int
	ino     uint64 // the socket's inode: a reused descriptor is never cut
	ip      string
	port    int
	since   time.Time
	claimed bool            // its key is known (keys has exactly one)
	keys    map[string]bool // the keys it may have authenticated with
}

func newCurveConns(window time.Duration) *curveConns {
	return &curveConns{window: window, byFD: map[int]*curveConn{}, now: time.Now, cut: shutdownConn}
}

// accepted records a connection the monitor reported.
func (cc *curveConns) accepted(c *curveConn) {
	c.since, c.keys = cc.now(), map[string]bool{}
	cc.byFD[c.fd] = c
}

// gone forgets a connection the monitor reported closed.
func (cc *curveConns) gone(fd int) { delete(cc.byFD, fd) }

// admitted records that ZAP let key in from address ip (the monitor drained).
func (cc *curveConns) admitted(ip, key string) {
	ip = normalIP(ip)
	now := cc.now()
	var unclaimed, recent []*curveConn
	for _, c := range cc.byFD {
		if c.ip != ip || now.Sub(c.since) > cc.window {
			continue
		}
		recent = append(recent, c)
		if !c.claimed {
			unclaimed = append(unclaimed, c)
		}
	}
	switch len(unclaimed) {
	case 1:
		c := unclaimed[0]
		if len(c.keys) == 0 {
			c.claimed = true
		}
		c.keys[key] = true
	case 0:
		// The connection closed already, or an earlier claim picked the wrong
		// one of two: every recent connection from the address may be it.
		for _, c := range recent {
			c.keys[key] = true
			c.claimed = false
		}
	default:
		for _, c := range unclaimed {
			c.keys[key] = true
		}
	}
}

// cutKeys shuts down every connection that may have authenticated with one of
// keys, and returns how many it cut.
func (cc *curveConns) cutKeys(keys map[string]bool) int {
	n := 0
	for fd, c := range cc.byFD {
		hit := false
		for k := range c.keys {
			hit = hit || keys[k]
		}
		if !hit {
			continue
		}
		if cc.cut(c) {
			n++
		}
		delete(cc.byFD, fd) // cut, or its descriptor is no longer this connection
	}
	return n
}

// peerConn describes an accepted TCP connection by its descriptor.
func peerConn(fd int) (*curveConn, bool) {
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return nil, false
	}
	ip, port, ok := peerAddr(fd)
	if !ok {
		return nil, false
	}
	return &curveConn{fd: fd, ino: st.Ino, ip: ip, port: port}, true
}

func peerAddr(fd int) (string, int, bool) {
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return "", 0, false
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return net.IP(a.Addr[:]).String(), a.Port, true
	case *unix.SockaddrInet6:
		return normalIP(net.IP(a.Addr[:]).String()), a.Port, true
	}
	return "", 0, false
}

// normalIP writes an address the way both ZAP and getpeername's are compared.
func normalIP(s string) string {
	if i := len(s) - 1; i > 0 && s[0] == '[' && s[i] == ']' {
		s = s[1:i]
	}
	for i := 0; i < len(s); i++ {
		if s[i] == '%' { // IPv6 zone
			s = s[:i]
			break
		}
	}
	if ip := net.ParseIP(s); ip != nil {
		if v4 := ip.To4(); v4 != nil {
			return v4.String()
		}
		return ip.String()
	}
	return s
}

// shutdownConn shuts the connection's socket down. It works on a duplicate of
// the descriptor, checked to still be that connection's socket (libzmq may
// have closed the number and the process reused it): the duplicate keeps the
// checked socket referenced, so nothing else can be hit.
func shutdownConn(c *curveConn) bool {
	fd, err := unix.Dup(c.fd)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || st.Ino != c.ino {
		return false
	}
	if ip, port, ok := peerAddr(fd); !ok || ip != c.ip || port != c.port {
		return false
	}
	return unix.Shutdown(fd, unix.SHUT_RDWR) == nil
}

// monitor reads one socket's connection events from its inproc PAIR socket:
// it counts subscribers and, on the CURVE events socket, tracks connections.
type monitor struct {
	sock    *zmq.Socket
	metrics Metrics
	live    int
	conns   *curveConns // nil except on the CURVE events socket
}

// watch starts monitoring s; call it before s binds, so no connection is missed.
func (es *endpoints) watch(s *zmq.Socket, conns *curveConns) (*monitor, error) {
	addr := fmt.Sprintf("inproc://monitor-%p", s)
	// MONITOR_STOPPED must be asked for, or the reader never learns the socket closed.
	if err := s.Monitor(addr, zmq.EVENT_ACCEPTED|zmq.EVENT_DISCONNECTED|zmq.EVENT_MONITOR_STOPPED); err != nil {
		return nil, err
	}
	sock, err := es.b.zctx.NewSocket(zmq.PAIR)
	if err != nil {
		return nil, err
	}
	sock.SetLinger(0)
	if err := sock.Connect(addr); err != nil {
		sock.Close()
		return nil, err
	}
	return &monitor{sock: sock, metrics: es.b.opts.Metrics, conns: conns}, nil
}

// drain handles the events waiting; it reports false once the monitor
// stopped (MONITOR_STOPPED, or the context is terminating). Only then may its
// PAIR socket be closed: libzmq sends monitor events with a blocking send, so
// closing it earlier would stall the thread that reports the next event.
func (m *monitor) drain(wait bool) bool {
	flags := zmq.DONTWAIT
	if wait {
		flags = 0
	}
	for {
		ev, _, val, err := m.sock.RecvEvent(flags)
		if err != nil { // EAGAIN: all read; EINTR: again; ETERM or worse: done
			e := zmq.AsErrno(err)
			return e == zmq.Errno(unix.EAGAIN) || e == zmq.Errno(unix.EINTR)
		}
		if !m.handle(ev, val) {
			return false
		}
		flags = zmq.DONTWAIT
	}
}

// finish reads the monitor until it stops, then closes it; call it (on a
// goroutine of its own) once the monitored socket is closed or closing.
func (m *monitor) finish() {
	for m.drain(true) {
	}
	m.close()
}

func (m *monitor) handle(ev zmq.Event, val int) bool {
	switch ev {
	case zmq.EVENT_ACCEPTED:
		m.count(1)
		if m.conns != nil {
			if c, ok := peerConn(val); ok {
				m.conns.accepted(c)
			} else {
				klog.V(2).InfoS("CURVE connection closed before it could be tracked", "fd", val)
			}
		}
	case zmq.EVENT_DISCONNECTED:
		m.count(-1)
		if m.conns != nil {
			m.conns.gone(val)
		}
	case zmq.EVENT_MONITOR_STOPPED:
		return false
	}
	return true
}

func (m *monitor) count(d int) {
	m.live += d
	if m.metrics != nil {
		m.metrics.Subscribers(d)
	}
}

// close releases the monitor; connections still open are no longer counted.
func (m *monitor) close() {
	m.count(-m.live)
	m.sock.Close()
}
