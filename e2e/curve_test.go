package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// keygen runs `rookzmq events keygen` and returns the public and secret keys.
func keygen(t *testing.T) (public, secret string) {
	t.Helper()
	out, err := exec.Command(binPath, "events", "keygen").Output()
	if err != nil {
		t.Fatalf("events keygen: %v", err)
	}
	m := regexp.MustCompile(`(?m)^public: (\S{40})\nsecret: (\S{40})$`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("events keygen printed %q", out)
	}
	return m[1], m[2]
}

// tcpPorts finds a free port P with P+1 free too (events and control).
func tcpPorts(t *testing.T) int {
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p+1)); err == nil {
			l2.Close()
			return p
		}
	}
	t.Fatal("no two free ports in a row")
	return 0
}

// cliSubscriber is `rookzmq events subscribe -o json` over the CURVE endpoint.
type cliSubscriber struct {
	mu     sync.Mutex
	events []zmqbridge.Event
}

func startCLISubscriber(t *testing.T, port int, serverPub, secret string) *cliSubscriber {
	t.Helper()
	keyFile := filepath.Join(t.TempDir(), "client.key")
	if err := os.WriteFile(keyFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binPath, "events", "--events", fmt.Sprintf("tcp://127.0.0.1:%d", port),
		"--control", fmt.Sprintf("tcp://127.0.0.1:%d", port+1), "--server-key", serverPub, "--key-file", keyFile,
		"subscribe", "-o", "json")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &cliSubscriber{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev zmqbridge.Event
			if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.Kind != "" {
				s.mu.Lock()
				s.events = append(s.events, ev)
				s.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); <-done })
	return s
}

// kinds lists the kinds received so far.
func (s *cliSubscriber) kinds() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, ev := range s.events {
		out = append(out, ev.Kind)
	}
	return out
}

// waitKinds waits until the subscriber received want (in order) or times out.
func (s *cliSubscriber) waitKinds(want string, d time.Duration) string {
	deadline := time.Now().Add(d)
	for {
		got := strings.Join(s.kinds(), ",")
		if got == want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Through the binary: the TCP endpoint with CURVE keys from files, the CLI
// subscribing with a key; removing one key from the file cuts that client off
// (and only its connection) while the other keeps receiving.
func TestCurveRotation(t *testing.T) {
	dir := newDriverDir(t)
	serverPub, serverSec := keygen(t)
	aPub, aSec := keygen(t)
	allPub, allSec := keygen(t)
	writeFile := func(name, content string) string {
		p := filepath.Join(dir, name)
		tmp := p + ".tmp"
		if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, p); err != nil { // as a Secret update swaps files
			t.Fatal(err)
		}
		return p
	}
	clients := func(keys ...string) string {
		var entries []string
		for i := 0; i < len(keys); i += 2 {
			entries = append(entries, fmt.Sprintf(`{"name":"c%d","public_key":%q,"namespaces":[%q]}`, i, keys[i], keys[i+1]))
		}
		return `{"clients":[` + strings.Join(entries, ",") + `]}`
	}
	serverKey := writeFile("server.key", serverSec+"\n")
	clientsFile := writeFile("clients.json", clients(aPub, "team-a", allPub, "*"))
	port := tcpPorts(t)
	d := startDriver(t, dir, nil, "--events-tcp", fmt.Sprintf("127.0.0.1:%d", port),
		"--events-curve-server-key", serverKey, "--events-curve-clients", clientsFile)

	subA := startCLISubscriber(t, port, serverPub, aSec)
	time.Sleep(time.Second) // one after the other, as clients connect in practice
	subAll := startCLISubscriber(t, port, serverPub, allSec)
	time.Sleep(time.Second)

	prefix := uniquePrefix(t)
	s := stagePVC(t, d, prefix, "team-a", "data", "uid-1")
	for name, sub := range map[string]*cliSubscriber{"team-a key": subA, "* key": subAll} {
		if got := sub.waitKinds("attach,publish", 20*time.Second); got != "attach,publish" {
			t.Fatalf("%s received %q, want attach,publish", name, got)
		}
	}

	writeFile("clients.json", clients(allPub, "*")) // the team-a key is removed
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(readFileString(d.log), "event clients cut off") {
		if time.Now().After(deadline) {
			t.Fatalf("the driver never cut the removed key off:\n%s", tail(d.log, 20))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if m := regexp.MustCompile(`event clients cut off.*connections=(\d+)`).FindStringSubmatch(readFileString(d.log)); m == nil || m[1] != "1" {
		t.Errorf("cut-off log line %q: want exactly 1 connection cut (the removed key's)", m)
	}
	if _, err := d.node.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: s.id, TargetPath: s.target}); err != nil {
		t.Fatal(err)
	}
	if got := subAll.waitKinds("attach,publish,unpublish", 20*time.Second); got != "attach,publish,unpublish" {
		t.Errorf("the * key received %q after the rotation, want attach,publish,unpublish", got)
	}
	time.Sleep(2 * time.Second) // time for anything that would still reach the removed key
	if got := strings.Join(subA.kinds(), ","); got != "attach,publish" {
		t.Errorf("the removed key received %q, want nothing after attach,publish", got)
	}
	if _, err := d.node.NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging}); err != nil {
		t.Fatal(err)
	}
	deleteEventually(t, d, s.id)
}

func readFileString(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}
