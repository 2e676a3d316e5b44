package zmqbridge

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// A guarded endpoint (Endpoint.Guard) is served through a relay: the pod's
// socket file is a plain unix listener of the bridge, and each connection is
// relayed to the ZeroMQ socket bound in a directory of the bridge's own. The
// relay reads the ZMTP framing of what the client sends and cuts the
// connection at the first frame larger than the socket allows or the first
// message of more frames than its requests have. libzmq cannot do this: it
// keeps an unfinished multipart message whole in memory, however long, and
// bounds only each frame. The relay also bounds the connections one
// endpoint may hold and, on the events socket, the subscriptions each
// connection holds: it sees every connection, while an XPUB socket tells the
// bridge neither which peer a subscription came from nor, when a peer
// leaves, whose subscriptions are handed back.

// Guard limits.
const (
	// MaxConnections is the most connections a guarded socket holds at once.
	MaxConnections = 64
	// MaxConnSubscriptions is the most subscriptions one connection to a
	// guarded events socket holds at once; its own unsubscribe gives room
	// back. A guarded endpoint thus holds at most MaxConnections times this.
	MaxConnSubscriptions = 16
	// wireFramesControl: a control request on the wire is REQ's empty
	// delimiter and the JSON (ROUTER adds the routing ID itself).
	wireFramesControl = 2
	wireFramesEvents  = 1 // a subscription
	maxCommandBytes   = 4 << 10
)

// guard is one guarded socket: its listener and live relays.
type guard struct {
	ln        *net.UnixListener
	path      string // the listener's path
	inner     string // the ZeroMQ socket's path
	maxFrame  uint64
	maxFrames int
	// subs: an events socket, whose connections' subscriptions the relay
	// counts (subscription messages or ZMTP 3.1 SUBSCRIBE/CANCEL commands).
	subs    bool
	refused rateLog // subscriptions refused, logged rate-limited
	mu      sync.Mutex
	conns   map[net.Conn]bool
	closed  bool
	wg      sync.WaitGroup
}

// internalPath is where the ZeroMQ socket behind a guarded one is bound.
func (b *Bridge) internalPath(addr string) string {
	sum := sha256.Sum256([]byte(addr))
	return filepath.Join(b.opts.Dir, "i", hex.EncodeToString(sum[:8])+".sock")
}

// startGuard listens on path (mode by the binding thread's umask) and relays
// each connection to the ZeroMQ socket at inner; subs: an events socket.
func startGuard(path, inner string, mode os.FileMode, maxFrame uint64, maxFrames int, subs bool) (*guard, error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
	}
	type result struct {
		ln  *net.UnixListener
		err error
	}
	rc := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with its umask
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			rc <- result{err: err}
			return
		}
		unix.Umask(int(^mode.Perm() & 0o777))
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		rc <- result{ln, err}
	}()
	r := <-rc
	if r.err != nil {
		return nil, r.err
	}
	g := &guard{ln: r.ln, path: path, inner: inner, maxFrame: maxFrame, maxFrames: maxFrames, subs: subs, conns: map[net.Conn]bool{}}
	g.wg.Add(1)
	go g.accept()
	return g, nil
}

func (g *guard) accept() {
	defer g.wg.Done()
	for {
		c, err := g.ln.Accept()
		if err != nil {
			return
		}
		g.mu.Lock()
		full := len(g.conns) >= MaxConnections
		if !g.closed && !full {
			g.conns[c] = true
			g.wg.Add(1)
		}
		closed := g.closed
		g.mu.Unlock()
		if closed || full {
			if full {
				klog.V(2).InfoS("event connection refused: the socket holds the most connections allowed", "socket", g.ln.Addr(), "max", MaxConnections)
			}
			c.Close()
			continue
		}
		go g.relay(c)
	}
}

// relay copies one connection both ways, checking what the client sends.
func (g *guard) relay(c net.Conn) {
	defer g.wg.Done()
	defer func() {
		g.mu.Lock()
		delete(g.conns, c)
		g.mu.Unlock()
		c.Close()
	}()
	z, err := net.Dial("unix", g.inner)
	if err != nil {
		return
	}
	defer z.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(c, z)
		c.Close()
		close(done)
	}()
	if err := g.checkedCopy(z, c); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
		klog.V(2).InfoS("event connection cut", "socket", g.ln.Addr(), "reason", err)
	}
	z.Close()
	<-done
}

// checkedCopy forwards a ZMTP 3 stream from src to dst frame by frame,
// failing at the first frame or message beyond the guard's limits. On an
// events socket it reads each frame whole (they are small) and forwards only
// the subscriptions the connection may hold (see subscription).
func (g *guard) checkedCopy(dst io.Writer, src io.Reader) error {
	// The greeting is forwarded as it comes: peers exchange its first 11
	// bytes (signature, major version) before they send the rest.
	var greeting [64]byte
	for _, part := range [][2]int{{0, 10}, {10, 11}, {11, 64}} {
		if _, err := io.ReadFull(src, greeting[part[0]:part[1]]); err != nil {
			return err
		}
		if (part[1] == 10 && (greeting[0] != 0xff || greeting[9] != 0x7f)) || (part[1] == 11 && greeting[10] < 3) {
			return errors.New("not a ZMTP 3 greeting")
		}
		if _, err := dst.Write(greeting[part[0]:part[1]]); err != nil {
			return err
		}
	}
	var head [9]byte
	frames := 0
	var subs map[string]bool // the connection's subscriptions (events socket)
	var body []byte
	if g.subs {
		subs = map[string]bool{}
	}
	for {
		if _, err := io.ReadFull(src, head[:1]); err != nil {
			return err
		}
		flags, n := head[0], 1
		var size uint64
		if flags&0x02 != 0 {
			if _, err := io.ReadFull(src, head[1:9]); err != nil {
				return err
			}
			size, n = binary.BigEndian.Uint64(head[1:9]), 9
		} else {
			if _, err := io.ReadFull(src, head[1:2]); err != nil {
				return err
			}
			size, n = uint64(head[1]), 2
		}
		if flags&0x04 != 0 { // a command (READY, PING, SUBSCRIBE...)
			if size > maxCommandBytes {
				return fmt.Errorf("command of %d bytes", size)
			}
		} else {
			if size > g.maxFrame {
				return fmt.Errorf("frame of %d bytes exceeds %d", size, g.maxFrame)
			}
			if frames++; frames > g.maxFrames {
				return fmt.Errorf("message of more than %d frames", g.maxFrames)
			}
			if flags&0x01 == 0 {
				frames = 0
			}
		}
		if subs == nil {
			if _, err := dst.Write(head[:n]); err != nil {
				return err
			}
			if _, err := io.CopyN(dst, src, int64(size)); err != nil {
				return err
			}
			continue
		}
		body = slices.Grow(body[:0], int(size))[:size] // size is bounded above
		if _, err := io.ReadFull(src, body); err != nil {
			return err
		}
		if fwd, err := g.subscription(subs, flags, body); err != nil {
			return err
		} else if !fwd {
			continue
		}
		if _, err := dst.Write(head[:n]); err != nil {
			return err
		}
		if _, err := dst.Write(body); err != nil {
			return err
		}
	}
}

// subscription decides whether the relay forwards one frame a client sent to
// an events socket (body: the whole frame), keeping subs, the connection's
// subscriptions, exactly what the XPUB socket holds for it: a subscription
// (a one-frame message 0x01<topic>, or a ZMTP 3.1 SUBSCRIBE command) is
// forwarded if the connection does not hold that topic yet and holds fewer
// than MaxConnSubscriptions; an unsubscription (0x00<topic>, CANCEL) only
// for a topic it holds. Other commands (READY, PING...) pass; other data,
// which the bridge would drop anyway, does not. A SUBSCRIBE or CANCEL
// command larger than a subscription frame may be is an error.
func (g *guard) subscription(subs map[string]bool, flags byte, body []byte) (bool, error) {
	var subscribe bool
	var topic []byte
	switch {
	case flags&0x04 != 0: // a command: <name length><name><data>
		if len(body) == 0 || 1+int(body[0]) > len(body) {
			return true, nil // malformed: libzmq refuses it
		}
		name, data := string(body[1:1+int(body[0])]), body[1+int(body[0]):]
		switch name {
		case "SUBSCRIBE":
			subscribe, topic = true, data
		case "CANCEL":
			topic = data
		default:
			return true, nil
		}
		if uint64(len(topic))+1 > g.maxFrame {
			return false, fmt.Errorf("%s command of %d bytes exceeds %d", name, len(body), g.maxFrame)
		}
	case flags&0x01 != 0 || len(body) == 0 || body[0] > 1:
		return false, nil // not a subscription (one more frame cuts a multipart message)
	default:
		subscribe, topic = body[0] == 1, body[1:]
	}
	t := string(topic)
	switch {
	case subscribe && subs[t]:
		return false, nil // held already: the bridge must not apply it twice
	case subscribe && len(subs) >= MaxConnSubscriptions:
		g.refused.log("subscription refused: the connection holds the most subscriptions allowed",
			"socket", g.path, "max", MaxConnSubscriptions)
		return false, nil
	case subscribe:
		subs[t] = true
		return true, nil
	case subs[t]:
		delete(subs, t)
		return true, nil
	}
	return false, nil
}

// close stops listening, removes the socket file and cuts every relay.
func (g *guard) close() {
	g.mu.Lock()
	g.closed = true
	for c := range g.conns {
		c.Close()
	}
	g.mu.Unlock()
	g.ln.Close() // removes the socket file
	g.wg.Wait()
}
