package zmqbridge

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
)

type keypair struct{ pub, sec string }

func newKeypair(t *testing.T) keypair {
	pub, sec, err := zmq.NewCurveKeypair()
	if err != nil {
		t.Fatal(err)
	}
	return keypair{pub, sec}
}

func freePort(t *testing.T) int {
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1)); err == nil {
			l2.Close()
			return port
		}
	}
	t.Fatal("no two free ports in a row")
	return 0
}

func writeClients(t *testing.T, path string, clients map[string][]string) {
	var f struct {
		Clients []map[string]any `json:"clients"`
	}
	for key, ns := range clients {
		f.Clients = append(f.Clients, map[string]any{"name": key[:6], "public_key": key, "namespaces": ns})
	}
	b, _ := json.Marshal(f)
	tmp := path + ".tmp"
	os.WriteFile(tmp, b, 0o600)
	os.Rename(tmp, path) // as a Secret update swaps files
}

// rawSub is a CURVE SUB socket subscribed to everything it asks for.
func rawSub(t *testing.T, zctx *zmq.Context, addr, server string, k keypair, prefix string) *zmq.Socket {
	s, _ := watchedSub(t, zctx, addr, server, k, prefix)
	return s
}

// watchedSub is rawSub that also counts the times the connection was lost.
func watchedSub(t *testing.T, zctx *zmq.Context, addr, server string, k keypair, prefix string) (*zmq.Socket, *atomic.Int32) {
	s, _ := zctx.NewSocket(zmq.SUB)
	s.SetLinger(0)
	s.SetCurveServerkey(server)
	s.SetCurvePublickey(k.pub)
	s.SetCurveSecretkey(k.sec)
	s.SetSubscribe(prefix)
	s.SetRcvtimeo(50 * time.Millisecond)
	lost := new(atomic.Int32)
	mon := fmt.Sprintf("inproc://client-monitor-%p", s)
	if err := s.Monitor(mon, zmq.EVENT_DISCONNECTED|zmq.EVENT_MONITOR_STOPPED); err != nil {
		t.Fatal(err)
	}
	pair, _ := zctx.NewSocket(zmq.PAIR)
	pair.SetLinger(0)
	if err := pair.Connect(mon); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer pair.Close()
		for {
			ev, _, _, err := pair.RecvEvent(0)
			if err != nil || ev == zmq.EVENT_MONITOR_STOPPED {
				return
			}
			lost.Add(1)
		}
	}()
	if err := s.Connect(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(); <-done })
	return s, lost
}

// drain returns the topics of the event messages received within d.
func drain(s *zmq.Socket, d time.Duration) []string {
	var topics []string
	for end := time.Now().Add(d); time.Now().Before(end); {
		m, err := s.RecvMessage(0)
		if err == nil && len(m) == 2 && !strings.HasPrefix(m[0], "hb/") {
			topics = append(topics, m[0])
		}
	}
	return topics
}

func TestCurveEndpoint(t *testing.T) {
	dir := t.TempDir()
	server := newKeypair(t)
	a, all, narrow, stranger, late := newKeypair(t), newKeypair(t), newKeypair(t), newKeypair(t), newKeypair(t)
	os.WriteFile(filepath.Join(dir, "server.key"), []byte(server.sec+"\n"), 0o600)
	clients := filepath.Join(dir, "clients.json")
	writeClients(t, clients, map[string][]string{a.pub: {"team-a"}, all.pub: {"*"}, narrow.pub: {"team-a", "team-b"}})
	port := freePort(t)
	b, err := New(Options{Dir: filepath.Join(dir, "ev"), Node: "n1", Heartbeat: 100 * time.Millisecond,
		Curve: &CurveOptions{Host: "127.0.0.1", Port: port, ServerKeyFile: filepath.Join(dir, "server.key"), ClientsFile: clients, Reload: 100 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	events := fmt.Sprintf("tcp://127.0.0.1:%d", port)
	zctx, _ := zmq.NewContext()
	t.Cleanup(func() { zctx.Term() }) // after the sockets' clean-ups (they run first)
	// One after the other, as clients come in practice: each connection's key
	// is then known exactly (see curveConns).
	subA := rawSub(t, zctx, events, server.pub, a, "") // asks for everything
	time.Sleep(200 * time.Millisecond)
	subAll, allLost := watchedSub(t, zctx, events, server.pub, all, "")
	time.Sleep(200 * time.Millisecond)
	subNarrow := rawSub(t, zctx, events, server.pub, narrow, "attach/")
	time.Sleep(200 * time.Millisecond)
	subStranger := rawSub(t, zctx, events, server.pub, stranger, "")
	time.Sleep(500 * time.Millisecond)
	emit := func(tag string) {
		for _, ns := range []string{"team-a", "team-b"} {
			if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "v", PVC: tag, Namespace: ns}); err != nil {
				t.Fatal(err)
			}
		}
	}
	emit("one")
	if got := drain(subA, time.Second); len(got) != 1 || got[0] != "attach/team-a/one" {
		t.Errorf("team-a key received %v, want only attach/team-a/one", got)
	}
	if got := drain(subAll, 300*time.Millisecond); len(got) != 2 {
		t.Errorf("* key received %v, want both", got)
	}
	if got := drain(subNarrow, 300*time.Millisecond); len(got) != 2 {
		t.Errorf("team-a,team-b key received %v, want both", got)
	}
	if got := drain(subStranger, 300*time.Millisecond); len(got) != 0 {
		t.Errorf("an unknown key received %v", got)
	}

	// Replay and flush over the authenticated control socket are scoped too.
	ca := &Client{events: events, control: fmt.Sprintf("tcp://127.0.0.1:%d", port+1), Timeout: 3 * time.Second,
		Curve: &ClientKeys{ServerPublic: server.pub, Public: a.pub, Secret: a.sec}}
	ca.zctx, _ = zmq.NewContext()
	defer ca.Close()
	evs, _, err := ca.Replay(0, 0)
	if err != nil || len(evs) != 1 || !strings.Contains(string(evs[0]), `"namespace":"team-a"`) {
		t.Errorf("team-a replay: %s %v", evs, err)
	}
	cs := &Client{events: events, control: ca.control, Timeout: time.Second,
		Curve: &ClientKeys{ServerPublic: server.pub, Public: stranger.pub, Secret: stranger.sec}}
	cs.zctx, _ = zmq.NewContext()
	defer cs.Close()
	if evs, _, err := cs.Replay(0, 0); err == nil {
		t.Errorf("an unknown key replayed %d events", len(evs))
	}

	// Rotation, while events keep coming: a new key works without a restart;
	// a removed key is cut off and a narrowed one sees only what it still
	// may, while the other subscriber stays connected and misses nothing.
	writeClients(t, clients, map[string][]string{all.pub: {"*"}, narrow.pub: {"team-b"}, late.pub: {"team-b"}})
	var toA, toAll []string
	for i := 0; i < 10; i++ { // the files are checked every 100 ms
		emit(fmt.Sprint("during-", i))
		toA = append(toA, drain(subA, 50*time.Millisecond)...)
		toAll = append(toAll, drain(subAll, 50*time.Millisecond)...)
		drain(subNarrow, 50*time.Millisecond)
	}
	subLate := rawSub(t, zctx, events, server.pub, late, "attach/")
	time.Sleep(time.Second) // the narrowed key reconnects by itself
	toA = append(toA, drain(subA, 100*time.Millisecond)...)
	toAll = append(toAll, drain(subAll, 100*time.Millisecond)...)
	drain(subNarrow, 100*time.Millisecond)
	emit("two")
	toA = append(toA, drain(subA, time.Second)...)
	toAll = append(toAll, drain(subAll, 500*time.Millisecond)...)
	if n := strings.Count(strings.Join(toA, " "), "team-a/during"); len(toA) > n || n > 3 {
		// events emitted before the reload took effect may still arrive
		t.Errorf("a removed key still received %v", toA)
	}
	if len(toAll) != 22 || toAll[21] != "attach/team-b/two" {
		t.Errorf("the * key received %d events during and after the rotation, want all 22: %v", len(toAll), toAll)
	}
	if n := allLost.Load(); n != 0 {
		t.Errorf("the * key's connection was lost %d times during the rotation, want 0", n)
	}
	if got := drain(subNarrow, 500*time.Millisecond); len(got) != 1 || got[0] != "attach/team-b/two" {
		t.Errorf("the narrowed key (now team-b only) received %v, want only attach/team-b/two", got)
	}
	if got := drain(subLate, 500*time.Millisecond); len(got) != 1 || got[0] != "attach/team-b/two" {
		t.Errorf("the new team-b key received %v", got)
	}
}

// TestCurveConns checks which connections a revoked key cuts: exactly its own
// when clients handshake one at a time; when two handshake at once from one
// address, both (never fewer).
func TestCurveConns(t *testing.T) {
	now := time.Unix(1000, 0)
	cc := newCurveConns(10 * time.Second)
	cc.now = func() time.Time { return now }
	var cut []int
	cc.cut = func(c *curveConn) bool { cut = append(cut, c.fd); return true }
	conn := func(fd int, ip string) { cc.accepted(&curveConn{fd: fd, ip: ip}) }
	cutting := func(keys ...string) []int {
		cut = nil
		m := map[string]bool{}
		for _, k := range keys {
			m[k] = true
		}
		cc.cutKeys(m)
		slices.Sort(cut)
		return cut
	}

	conn(10, "10.0.0.1")
	cc.admitted("10.0.0.1", "A")
	now = now.Add(time.Second)
	conn(11, "10.0.0.1") // same address, after the first one authenticated
	cc.admitted("10.0.0.1", "B")
	conn(12, "10.0.0.2")
	conn(13, "10.0.0.3")
	cc.admitted("10.0.0.3", "C") // other addresses: never confused
	cc.admitted("::ffff:10.0.0.2", "B")
	if got := cutting("B"); !slices.Equal(got, []int{11, 12}) {
		t.Errorf("revoking B cut %v, want [11 12]", got)
	}
	if got := cutting("A"); !slices.Equal(got, []int{10}) {
		t.Errorf("revoking A cut %v, want [10]", got)
	}

	// Two handshakes at once from one address: either may be either key.
	conn(20, "10.0.0.9")
	conn(21, "10.0.0.9")
	cc.admitted("10.0.0.9", "D")
	cc.admitted("10.0.0.9", "E")
	if got := cutting("E"); !slices.Equal(got, []int{20, 21}) {
		t.Errorf("revoking E cut %v, want both of [20 21]", got)
	}

	// The only unclaimed connection closed before its answer and another
	// arrived: the key goes to every recent connection from the address.
	conn(30, "10.0.0.7")
	cc.gone(30)
	conn(31, "10.0.0.7")
	cc.admitted("10.0.0.7", "F") // was 30's; 31 is taken for it
	cc.admitted("10.0.0.7", "G") // 31's own: no unclaimed one is left
	if got := cutting("G"); !slices.Equal(got, []int{31}) {
		t.Errorf("revoking G cut %v, want [31]", got)
	}

	// After the handshake interval an old unclaimed connection takes no keys.
	conn(40, "10.0.0.5")
	now = now.Add(time.Minute)
	conn(41, "10.0.0.5")
	cc.admitted("10.0.0.5", "H")
	if got := cutting("H"); !slices.Equal(got, []int{41}) {
		t.Errorf("revoking H cut %v, want [41]", got)
	}
	if got := cutting("C"); !slices.Equal(got, []int{13}) {
		t.Errorf("revoking C cut %v, want [13]", got)
	}
}

func TestGrants(t *testing.T) {
	c := &client{ns: map[string]bool{"team-a": true}}
	for topic, want := range map[string]string{
		"":                  "hb/ attach/team-a/ publish/team-a/ unpublish/team-a/ expand/team-a/ ack/team-a/ detach/team-a/",
		"attach/":           "attach/team-a/",
		"attach/team-b/":    "",
		"attach/team-a/db":  "attach/team-a/db",
		"attach/team":       "attach/team-a/",
		"hb/":               "hb/",
		"publish/team-a/x/": "publish/team-a/x/",
	} {
		if got := strings.Join(grants(c, topic, "n1"), " "); got != want {
			t.Errorf("grants(%q) = %q, want %q", topic, got, want)
		}
	}
}

// curveMetrics counts the CURVE troubles the bridge reports.
type curveMetrics struct {
	gaugeMetrics
	fileFailed, refused atomic.Int32
}

func (m *curveMetrics) CurveClientsFileFailed() { m.fileFailed.Add(1) }
func (m *curveMetrics) CurveRefused()           { m.refused.Add(1) }

// A clients file that cannot be parsed (or read) revokes every key: the
// connected client is cut and refused, its control requests too, a metric
// counts it; the fixed file lets it back in.
func TestCurveBrokenClientsFileFailsClosed(t *testing.T) {
	dir := t.TempDir()
	server, a := newKeypair(t), newKeypair(t)
	os.WriteFile(filepath.Join(dir, "server.key"), []byte(server.sec+"\n"), 0o600)
	clients := filepath.Join(dir, "clients.json")
	writeClients(t, clients, map[string][]string{a.pub: {"*"}})
	port := freePort(t)
	m := &curveMetrics{}
	b, err := New(Options{Dir: filepath.Join(dir, "ev"), Node: "n1", Heartbeat: 100 * time.Millisecond, Metrics: m,
		Curve: &CurveOptions{Host: "127.0.0.1", Port: port, ServerKeyFile: filepath.Join(dir, "server.key"), ClientsFile: clients, Reload: 100 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	zctx, _ := zmq.NewContext()
	t.Cleanup(func() { zctx.Term() })
	sub := rawSub(t, zctx, fmt.Sprintf("tcp://127.0.0.1:%d", port), server.pub, a, "")
	time.Sleep(500 * time.Millisecond)
	emit := func(tag string) {
		if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "v", PVC: tag, Namespace: "x"}); err != nil {
			t.Fatal(err)
		}
	}
	emit("before")
	if got := drain(sub, time.Second); len(got) != 1 {
		t.Fatalf("before: got %v", got)
	}
	for _, broken := range []string{`{"clients":[{"name":"x","public_key":"short","namespaces":["*"]}]}`, "not json"} {
		os.WriteFile(clients, []byte(broken), 0o600)
		time.Sleep(500 * time.Millisecond)
		emit("while-broken")
		if got := drain(sub, time.Second); len(got) != 0 {
			t.Errorf("with a broken clients file (%.20s) a revoked key received %v", broken, got)
		}
		ca := &Client{control: fmt.Sprintf("tcp://127.0.0.1:%d", port+1), Timeout: time.Second,
			Curve: &ClientKeys{ServerPublic: server.pub, Public: a.pub, Secret: a.sec}}
		ca.zctx, _ = zmq.NewContext()
		if _, _, err := ca.Replay(0, 0); err == nil {
			t.Errorf("with a broken clients file a revoked key replayed")
		}
		ca.Close()
		writeClients(t, clients, map[string][]string{a.pub: {"*"}})
		time.Sleep(500 * time.Millisecond)
	}
	if n := m.fileFailed.Load(); n != 2 {
		t.Errorf("clients file failures counted %d times, want 2", n)
	}
	if m.refused.Load() == 0 {
		t.Errorf("no refused handshake counted")
	}
	// libzmq 4.3 does not retry a refused handshake: the client connects anew.
	sub = rawSub(t, zctx, fmt.Sprintf("tcp://127.0.0.1:%d", port), server.pub, a, "")
	time.Sleep(500 * time.Millisecond)
	emit("after")
	if got := drain(sub, 2*time.Second); len(got) == 0 || got[len(got)-1] != "attach/x/after" {
		t.Errorf("after the fix: got %v", got)
	}
}

// A CURVE client's subscriptions are given back when its connection closes:
// a key reconnecting again and again (its "" granted as one prefix per kind
// and namespace) still receives events after more reconnects than the
// endpoint has room for at once. The grants used to be counted but never
// given back (libzmq hands back the topic asked for, not the grants).
func TestCurveSubscriptionsGivenBack(t *testing.T) {
	dir := t.TempDir()
	server, a := newKeypair(t), newKeypair(t)
	os.WriteFile(filepath.Join(dir, "server.key"), []byte(server.sec+"\n"), 0o600)
	clients := filepath.Join(dir, "clients.json")
	writeClients(t, clients, map[string][]string{a.pub: {"team-a"}})
	port := freePort(t)
	b, err := New(Options{Dir: filepath.Join(dir, "ev"), Node: "n1", Heartbeat: 100 * time.Millisecond, MaxSubscriptions: 3,
		Curve: &CurveOptions{Host: "127.0.0.1", Port: port, ServerKeyFile: filepath.Join(dir, "server.key"), ClientsFile: clients, Reload: time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	zctx, _ := zmq.NewContext()
	t.Cleanup(func() { zctx.Term() })
	for i := 0; i < 6; i++ {
		s := rawSub(t, zctx, fmt.Sprintf("tcp://127.0.0.1:%d", port), server.pub, a, "")
		var got []string
		for deadline := time.Now().Add(3 * time.Second); len(got) == 0 && time.Now().Before(deadline); {
			if _, err := b.Emit(context.Background(), Event{Kind: KindDetach, // its last grant: a "" counts once, however many grants
				VolumeID: "v", PVC: fmt.Sprint(i), Namespace: "team-a"}); err != nil {
				t.Fatal(err)
			}
			got = drain(s, 200*time.Millisecond)
		}
		if len(got) == 0 {
			t.Fatalf("connection %d of the key (room for 3 at once) receives nothing", i+1)
		}
		s.Close()
	}
}
