package zmqbridge

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
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

func (c *client) allowed(ns string) bool { return c.all || (ns != "" && c.ns[ns]) }
func (c *client) sees(r Record) bool     { return c.allowed(TopicNamespace(r.Topic)) }
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

func readServerKey(path string) (secret, public string, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", err
	}
	secret = strings.TrimSpace(string(b))
	public, err = zmq.AuthCurvePublic(secret)
	if err != nil || len(secret) != 40 {
		return "", "", fmt.Errorf("server key file %s does not hold a Z85 CURVE secret key", path)
	}
	return secret, public, nil
}

// zapLoop answers ZeroMQ's authentication requests (RFC 27) for the bridge's
// context: CURVE clients whose key is in the keyring get in, with the key as
// their User-Id; all others are refused. It owns the inproc REP socket.
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
	for {
		select {
		case <-b.stop:
			return
		default:
		}
		if ready, err := poller.Poll(100 * time.Millisecond); err != nil || len(ready) == 0 {
			continue
		}
		req, err := rep.RecvMessageBytes(0)
		if err != nil || len(req) < 6 {
			continue
		}
		version, id, domain, mechanism := req[0], req[1], string(req[2]), string(req[5])
		code, text, user := "400", "unknown key", ""
		if mechanism == "CURVE" && domain == zapDomain && len(req) >= 7 && len(req[6]) == 32 {
			key := zmq.Z85encode(string(req[6]))
			if c := b.curveKeys.lookup(key); c != nil {
				code, text, user = "200", "OK", key
				klog.V(3).InfoS("event client admitted", "client", c.name)
			} else {
				klog.InfoS("event client refused: unknown CURVE key", "address", string(req[3]))
			}
		}
		rep.SendMessage(version, id, code, text, user, "")
	}
}

const zapDomain = "rookzmq"

// curveEndpoint is the TCP endpoint's configuration.
func (b *Bridge) curveEndpoint() Endpoint {
	c := b.opts.Curve
	return Endpoint{
		Events:  fmt.Sprintf("tcp://%s:%d", c.Host, c.Port),
		Control: fmt.Sprintf("tcp://%s:%d", c.Host, c.Port+1),
	}
}

// secureSocket makes a socket a CURVE server in the ZAP domain.
func (b *Bridge) secureSocket(s *zmq.Socket) error {
	if err := s.SetZapDomain(zapDomain); err != nil {
		return err
	}
	if err := s.SetCurveServer(1); err != nil {
		return err
	}
	return s.SetCurveSecretkey(b.curveSecret.Load().(string))
}

// watchCurve reloads the key files. New client keys are admitted at once (ZAP
// asks on every connection); when a key is removed or the server key changes
// the TCP endpoint is rebound, so every connection authenticates again: the
// revoked key is refused, the others reconnect and resubscribe by themselves
// (ZeroMQ does that), and replay covers what they missed meanwhile.
func (b *Bridge) watchCurve() {
	defer b.wg.Done()
	c := b.opts.Curve
	every := c.Reload
	if every <= 0 {
		every = 2 * time.Second
	}
	lastClients, _ := os.ReadFile(c.ClientsFile)
	lastServer, _ := os.ReadFile(c.ServerKeyFile)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
		}
		clients, err1 := os.ReadFile(c.ClientsFile)
		server, err2 := os.ReadFile(c.ServerKeyFile)
		if err1 != nil || err2 != nil || (bytes.Equal(clients, lastClients) && bytes.Equal(server, lastServer)) {
			continue
		}
		keys, err := parseClients(clients)
		if err != nil {
			klog.ErrorS(err, "keeping the previous event client keys")
			continue
		}
		secret, _, err := readServerKey(c.ServerKeyFile)
		if err != nil {
			klog.ErrorS(err, "keeping the previous event server key")
			continue
		}
		old := b.curveKeys.keys.Load()
		b.curveKeys.keys.Store(&keys)
		revoked := !bytes.Equal(server, lastServer)
		for k, was := range *old {
			if now := keys[k]; now == nil || narrower(was, now) {
				revoked = true // live subscriptions granted before must go
			}
		}
		lastClients, lastServer = clients, server
		b.curveSecret.Store(secret)
		klog.InfoS("event client keys reloaded", "clients", len(keys), "rebind", revoked)
		if revoked {
			b.endpoints.remove(curveKey)
			if err := b.addCurveEndpoint(); err != nil {
				klog.ErrorS(err, "rebinding the CURVE event endpoint")
			}
		}
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
		if err = b.endpoints.add(curveKey, b.curveEndpoint()); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

// authorizeSubscriptions applies the subscriptions CURVE clients ask for on
// the XPUB socket (manual mode) within their namespaces. Publish goroutine.
func (b *Bridge) authorizeSubscriptions(ep *endpoint) {
	for {
		msg, meta, err := ep.pub.RecvMessageWithMetadata(zmq.DONTWAIT, "User-Id")
		if err != nil || len(msg) != 1 || len(msg[0]) == 0 {
			return
		}
		subscribe, topic := msg[0][0] == 1, msg[0][1:]
		c := ep.keys.lookup(meta["User-Id"])
		if c == nil {
			continue
		}
		for _, p := range grants(c, topic, b.opts.Node) {
			if subscribe {
				ep.pub.SetSubscribe(p)
			} else {
				ep.pub.SetUnsubscribe(p)
			}
		}
	}
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
