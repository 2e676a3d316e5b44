package zmqbridge

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	zmq "github.com/pebbe/zmq4"
	"k8s.io/klog/v2"
)

// CurveOptions configure the TCP endpoint: CURVE encryption, and ZAP
// authentication of client keys that each may see some namespaces.
type CurveOptions struct {
	// Host and Port: events are published on Port, control listens on Port+1.
	Host string
	Port int
	// ServerKeyFile holds the server's Z85 secret key (40 characters).
	ServerKeyFile string
	// ClientsFile lists the authorised client keys (see docs/events.md).
	ClientsFile string
	// Reload is how often the files are checked for changes (default 2s).
	Reload time.Duration
}

// clientsFile is the format of CurveOptions.ClientsFile.
type clientsFile struct {
	Clients []struct {
		Name       string   `json:"name"`
		PublicKey  string   `json:"public_key"`
		Namespaces []string `json:"namespaces"`
	} `json:"clients"`
}

// client is one authorised key: it sees its namespaces ("*": all).
type client struct {
	name string
	all  bool
	ns   map[string]bool
}

func (c *client) allowed(ns string) bool   { return c.all || (ns != "" && c.ns[ns]) }
func (c *client) sees(r Record) bool       { return c.allowed(recordNamespace(r)) }
func (c *client) seesClass(ns string) bool { return c.allowed(ns) }
func (c *client) mayFlush(ns, _ string) bool {
	return c.allowed(ns)
}

// keyring is the current set of authorised keys, swapped atomically on reload.
type keyring struct {
	keys atomic.Pointer[map[string]*client] // Z85 public key -> client
}

func (k *keyring) lookup(key string) *client {
	if m := k.keys.Load(); m != nil {
		return (*m)[key]
	}
	return nil
}

// parseClients reads the authorised client keys.
func parseClients(b []byte) (map[string]*client, error) {
	var f clientsFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("clients file: %w", err)
	}
	out := map[string]*client{}
	for i, c := range f.Clients {
		if len(c.PublicKey) != 40 || len(zmq.Z85decode(c.PublicKey)) != 32 {
			return nil, fmt.Errorf("clients file: entry %d (%s): public_key is not a 40-character Z85 CURVE key", i, c.Name)
		}
		cl := &client{name: c.Name, ns: map[string]bool{}}
		for _, ns := range c.Namespaces {
			if ns == "*" {
				cl.all = true
			}
			cl.ns[ns] = true
		}
		out[c.PublicKey] = cl
	}
	return out, nil
}

// parseServerKey reads the server's secret key from the bytes of path.
func parseServerKey(path string, b []byte) (secret, public string, err error) {
	secret = strings.TrimSpace(string(b))
	public, err = zmq.AuthCurvePublic(secret)
	if err != nil || len(secret) != 40 {
		return "", "", fmt.Errorf("server key file %s does not hold a Z85 CURVE secret key", path)
	}
	return secret, public, nil
}

// zapLoop answers ZeroMQ's authentication requests (RFC 27) for the bridge's
// context: CURVE clients whose key is in the keyring get in, with the key as
// their User-Id; all others are refused. It owns the inproc REP socket and the
// CURVE events socket's monitors, so that it knows which connection each
// admitted key holds and can cut the connections of revoked keys.
func (b *Bridge) zapLoop(ready chan<- error) {
	defer b.wg.Done()
	rep, err := b.zctx.NewSocket(zmq.REP)
	if err == nil {
		rep.SetLinger(0)
		err = rep.Bind("inproc://zeromq.zap.01")
	}
	ready <- err
	if err != nil {
		return
	}
	defer rep.Close()
	poller := zmq.NewPoller()
	poller.Add(rep, zmq.POLLIN)
	var mons []*monitor
	defer func() {
		for _, m := range mons {
			go m.finish() // until the XPUB socket closes (closeAll) or the context ends
		}
	}()
	drain := func() { // every event so far, so each connection is known before its ZAP answer
		for i := 0; i < len(mons); i++ {
			if !mons[i].drain(false) { // stopped: its socket is closed
				poller.RemoveBySocket(mons[i].sock)
				mons[i].close()
				mons = append(mons[:i], mons[i+1:]...)
				i--
			}
		}
	}
	for {
		select {
		case <-b.stop:
			return
		case m := <-b.curveMons:
			mons = append(mons, m)
			poller.Add(m.sock, zmq.POLLIN)
			continue
		case keys := <-b.curveCuts:
			drain()
			n := 0
			for _, m := range mons {
				n += m.conns.cutKeys(keys)
			}
			klog.InfoS("event clients cut off: their keys were removed or narrowed", "keys", len(keys), "connections", n)
			continue
		default:
		}
		polled, err := poller.Poll(100 * time.Millisecond)
		if err != nil || len(polled) == 0 {
			continue
		}
		var req [][]byte
		if slices.ContainsFunc(polled, func(p zmq.Polled) bool { return p.Socket == rep }) {
			req, _ = rep.RecvMessageBytes(zmq.DONTWAIT)
		}
		// After the receive: a request's connection was reported to the
		// monitor before the request was sent.
		drain()
		if len(req) >= 6 {
			rep.SendMessage(b.authenticate(req, mons)...)
		}
	}
}

// authenticate answers one ZAP request: [version, id, domain, address,
// identity, mechanism, credentials...] -> [version, id, code, text, user, metadata].
func (b *Bridge) authenticate(req [][]byte, mons []*monitor) []any {
	version, id, domain, address, mechanism := req[0], req[1], string(req[2]), string(req[3]), string(req[5])
	code, text, user := "400", "unknown key", ""
	if mechanism == "CURVE" && (domain == zapEvents || domain == zapControl) && len(req) >= 7 && len(req[6]) == 32 {
		key := zmq.Z85encode(string(req[6]))
		if c := b.curveKeys.lookup(key); c != nil {
			code, text, user = "200", "OK", key
			klog.V(3).InfoS("event client admitted", "client", c.name, "address", address, "domain", domain)
			if domain == zapEvents {
				for _, m := range mons {
					m.conns.admitted(address, key)
				}
			}
		}
	}
	if code != "200" {
		b.refusedKeys.log("event client refused: unknown CURVE key", "address", address, "domain", domain)
		if m, ok := b.opts.Metrics.(CurveMetrics); ok {
			m.CurveRefused()
		}
	}
	return []any{version, id, code, text, user, ""}
}

// ZAP domains of the CURVE events and control sockets.
const (
	zapEvents  = "rookzmq-events"
	zapControl = "rookzmq-control"
)

// curveHandshake bounds a CURVE handshake (ZMQ_HANDSHAKE_IVL), and so the
// time within which a connection's ZAP request follows its accept.
const curveHandshake = 10 * time.Second

// curveEndpoint is the TCP endpoint's configuration.
func (b *Bridge) curveEndpoint() Endpoint {
	c := b.opts.Curve
	return Endpoint{
		Events:  fmt.Sprintf("tcp://%s:%d", c.Host, c.Port),
		Control: fmt.Sprintf("tcp://%s:%d", c.Host, c.Port+1),
		Scope:   Scope{All: true}, // each key's subscriptions are narrowed to its grants
	}
}

// secureSocket makes a socket a CURVE server in its ZAP domain.
func (b *Bridge) secureSocket(s *zmq.Socket, t zmq.Type) error {
	domain := zapControl
	if t == zmq.XPUB {
		domain = zapEvents
	}
	if err := s.SetZapDomain(domain); err != nil {
		return err
	}
	if err := s.SetHandshakeIvl(curveHandshake); err != nil {
		return err
	}
	if err := s.SetCurveServer(1); err != nil {
		return err
	}
	return s.SetCurveSecretkey(b.curveSecret.Load().(string))
}

// CurveMetrics, if the Options.Metrics implement it, counts CURVE key
// trouble: a clients file that could not be read or parsed (every key is
// then refused), and refused handshakes.
type CurveMetrics interface {
	CurveClientsFileFailed()
	CurveRefused()
}

// watchCurve reloads the key files, starting from the bytes startCurve
// applied. New client keys are admitted at once (ZAP asks on every
// connection). The connections of a removed or narrowed key are cut (see
// curveConns), so the key is refused, or reconnects with its new grants,
// while every other client stays connected. A clients file that cannot be
// read or parsed revokes every key (fails closed) until it is fixed. A new
// server key rebinds the TCP endpoint: every client must handshake with it
// again.
func (b *Bridge) watchCurve(lastClients, lastServer []byte) {
	defer b.wg.Done()
	c := b.opts.Curve
	every := c.Reload
	if every <= 0 {
		every = 2 * time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	failed := false // the keys are revoked because the clients file is bad
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
		}
		clients, err := os.ReadFile(c.ClientsFile)
		var keys map[string]*client
		if err == nil {
			if bytes.Equal(clients, lastClients) && !failed {
				keys = *b.curveKeys.keys.Load()
			} else {
				keys, err = parseClients(clients)
			}
		}
		if err != nil {
			if !failed {
				klog.ErrorS(err, "EVENT CLIENT KEYS REVOKED: the clients file cannot be used; every CURVE client is refused until it is fixed",
					"file", c.ClientsFile)
				if m, ok := b.opts.Metrics.(CurveMetrics); ok {
					m.CurveClientsFileFailed()
				}
				failed, lastClients = true, nil
				if !b.applyKeys(map[string]*client{}) {
					return
				}
			}
			continue
		}
		server, serr := os.ReadFile(c.ServerKeyFile)
		rebind := serr == nil && !bytes.Equal(server, lastServer)
		if rebind {
			secret, _, err := parseServerKey(c.ServerKeyFile, server)
			if err != nil {
				klog.ErrorS(err, "keeping the previous event server key")
				rebind = false
			} else {
				b.curveSecret.Store(secret)
				lastServer = server
			}
		} else if serr != nil {
			klog.ErrorS(serr, "keeping the previous event server key")
		}
		if !bytes.Equal(clients, lastClients) {
			if failed {
				klog.InfoS("event client keys restored", "file", c.ClientsFile)
			}
			failed, lastClients = false, clients
			if !b.applyKeys(keys) {
				return
			}
		}
		if rebind {
			klog.InfoS("new event server key: rebinding the CURVE endpoint")
			b.endpoints.remove(curveKey)
			if err := b.addCurveEndpoint(); err != nil {
				klog.ErrorS(err, "rebinding the CURVE event endpoint")
			}
		}
	}
}

// applyKeys makes keys the authorised ones and cuts the connections of keys
// removed or narrowed; false if the bridge is stopping.
func (b *Bridge) applyKeys(keys map[string]*client) bool {
	old := b.curveKeys.keys.Load()
	b.curveKeys.keys.Store(&keys)
	revoked := map[string]bool{}
	for k, was := range *old {
		if now := keys[k]; now == nil || narrower(was, now) {
			revoked[k] = true // live subscriptions granted before must go
		}
	}
	klog.InfoS("event client keys applied", "clients", len(keys), "revoked", len(revoked))
	if len(revoked) == 0 {
		return true
	}
	select {
	case b.curveCuts <- revoked:
		return true
	case <-b.stop:
		return false
	}
}

const curveKey = "\x00curve"

// narrower reports whether now may see less than was.
func narrower(was, now *client) bool {
	if now.all {
		return false
	}
	if was.all {
		return true
	}
	for ns := range was.ns {
		if !now.ns[ns] {
			return true
		}
	}
	return false
}

// addCurveEndpoint binds the TCP endpoint, retrying while the old listener
// is still being closed.
func (b *Bridge) addCurveEndpoint() error {
	var err error
	for i := 0; i < 50; i++ {
		if err = b.endpoints.add(curveKey, b.curveEndpoint()); err == nil || errors.Is(err, errStopped) {
			return err
		}
		select {
		case <-b.stop:
			return errStopped
		case <-time.After(100 * time.Millisecond):
		}
	}
	return err
}

var eventKinds = []string{KindAttach, KindPublish, KindUnpublish, KindExpand, KindAck, KindDetach}

// grants narrows a requested topic prefix to what a client may see.
func grants(c *client, topic, node string) []string {
	if c.all || strings.HasPrefix(topic, KindHeartbeat+"/") {
		return []string{topic}
	}
	var out []string
	if topic == "" || strings.HasPrefix(KindHeartbeat+"/", topic) {
		out = append(out, KindHeartbeat+"/")
	}
	parts := strings.SplitN(topic, "/", 3)
	for _, k := range eventKinds {
		if !strings.HasPrefix(k, parts[0]) || (len(parts) > 1 && k != parts[0]) {
			continue
		}
		for ns := range c.ns {
			if len(parts) == 1 || strings.HasPrefix(ns, parts[1]) {
				p := k + "/" + ns + "/"
				if len(parts) > 1 && len(topic) > len(p) && strings.HasPrefix(topic, p) {
					p = topic // narrower than the namespace: keep it
				}
				out = append(out, p)
			}
		}
	}
	return out
}
