package zmqbridge

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
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
	s, _ := zctx.NewSocket(zmq.SUB)
	s.SetLinger(0)
	s.SetCurveServerkey(server)
	s.SetCurvePublickey(k.pub)
	s.SetCurveSecretkey(k.sec)
	s.SetSubscribe(prefix)
	s.SetRcvtimeo(200 * time.Millisecond)
	if err := s.Connect(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
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
	a, all, stranger, late := newKeypair(t), newKeypair(t), newKeypair(t), newKeypair(t)
	os.WriteFile(filepath.Join(dir, "server.key"), []byte(server.sec+"\n"), 0o600)
	clients := filepath.Join(dir, "clients.json")
	writeClients(t, clients, map[string][]string{a.pub: {"team-a"}, all.pub: {"*"}})
	port := freePort(t)
	b, err := New(Options{Dir: filepath.Join(dir, "ev"), Node: "n1", Heartbeat: 100 * time.Millisecond,
		Curve: &CurveOptions{Host: "127.0.0.1", Port: port, ServerKeyFile: filepath.Join(dir, "server.key"), ClientsFile: clients, Reload: 100 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	events := fmt.Sprintf("tcp://127.0.0.1:%d", port)
	zctx, _ := zmq.NewContext()
	t.Cleanup(func() { zctx.Term() })                  // after the sockets' clean-ups (they run first)
	subA := rawSub(t, zctx, events, server.pub, a, "") // asks for everything
	subAll := rawSub(t, zctx, events, server.pub, all, "")
	subStranger := rawSub(t, zctx, events, server.pub, stranger, "")
	time.Sleep(500 * time.Millisecond)
	emit := func(tag string) {
		for _, ns := range []string{"team-a", "team-b"} {
			if _, err := b.Emit(Event{Kind: KindAttach, VolumeID: "v", PVC: tag, Namespace: ns}); err != nil {
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

	// Rotation: a new key works without a restart; a removed key is cut off
	// while the others keep receiving.
	writeClients(t, clients, map[string][]string{all.pub: {"*"}, late.pub: {"team-b"}})
	time.Sleep(600 * time.Millisecond) // the files are checked every 100 ms
	subLate := rawSub(t, zctx, events, server.pub, late, "attach/")
	// The rebind makes every client reconnect; wait until the * key is back.
	var toA []string
	deadline := time.Now().Add(15 * time.Second)
	for back := false; !back; {
		if time.Now().After(deadline) {
			t.Fatal("the * key never received anything after the rotation")
		}
		emit("between")
		toA = append(toA, drain(subA, 100*time.Millisecond)...)
		back = len(drain(subAll, 200*time.Millisecond)) > 0
	}
	drain(subLate, 300*time.Millisecond)
	emit("two")
	toA = append(toA, drain(subA, time.Second)...)
	if len(toA) != 0 {
		t.Errorf("a revoked key still received %v", toA)
	}
	if got := drain(subAll, 500*time.Millisecond); len(got) != 2 {
		t.Errorf("after rotation the * key received %v", got)
	}
	if got := drain(subLate, 500*time.Millisecond); len(got) != 1 || got[0] != "attach/team-b/two" {
		t.Errorf("the new team-b key received %v", got)
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
