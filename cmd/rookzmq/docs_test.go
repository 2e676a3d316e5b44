package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func readDoc(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../..", path))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// --help, of the driver and of each client command, exits 0 after the usage.
func TestHelpExitsZero(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"events", "--help"}, {"events", "subscribe", "--help"},
		{"events", "replay", "-h"}, {"demo", "--help"}} {
		if code := run(args); code != 0 {
			t.Errorf("rookzmq %s exits %d, want 0", strings.Join(args, " "), code)
		}
	}
	if code := run([]string{"--no-such-flag"}); code == 0 {
		t.Error("an unknown flag exits 0")
	}
}

// The CSI endpoint's default follows --drivername, like --events-dir's.
func TestEndpointDefaultFollowsDriverName(t *testing.T) {
	f, err := parseServeFlags([]string{"--node", "--nodeid", "n", "--drivername", "x.example.com"})
	if err != nil {
		t.Fatal(err)
	}
	if want := "unix:///var/lib/kubelet/plugins/x.example.com/csi.sock"; f.endpoint != want {
		t.Errorf("--endpoint default %q, want %q", f.endpoint, want)
	}
	if f, _ = parseServeFlags([]string{"--node", "--nodeid", "n"}); f.endpoint != "unix:///var/lib/kubelet/plugins/rbd.rookzmq.io/csi.sock" {
		t.Errorf("--endpoint default %q for the default driver name", f.endpoint)
	}
	if f, _ = parseServeFlags([]string{"--node", "--nodeid", "n", "--endpoint", "tcp://127.0.0.1:1"}); f.endpoint != "tcp://127.0.0.1:1" {
		t.Errorf("--endpoint given: %q", f.endpoint)
	}
}

// README says what the code does: FUZZTIME's default, the mounter a
// StorageClass without one gets, the --endpoint default, the socket modes,
// and a layout that lists every package, command and document.
func TestReadmeMatchesCode(t *testing.T) {
	readme, makefile := readDoc(t, "README.md"), readDoc(t, "Makefile")
	m := regexp.MustCompile(`(?m)^FUZZTIME \?= (\S+)$`).FindStringSubmatch(makefile)
	if m == nil {
		t.Fatal("no FUZZTIME default in the Makefile")
	}
	if !strings.Contains(readme, "`FUZZTIME` (default "+m[1]+")") {
		t.Errorf("README does not give FUZZTIME's default, %s", m[1])
	}
	// A StorageClass without mounter gets the node's --default-mounter.
	if !strings.Contains(readme, "absent: the node plugin's `--default-mounter`") || strings.Contains(readme, "or absent —") {
		t.Error("README's mounter parameter does not say that absent means --default-mounter")
	}
	if !strings.Contains(readme, "| `--endpoint` | `unix:///path.sock` or `tcp://host:port` (default `unix:///var/lib/kubelet/plugins/<drivername>/csi.sock`) |") {
		t.Error("README's --endpoint row does not give its default")
	}
	if !strings.Contains(readme, "mode of the node-wide event socket files (default `0600`; a pod's are always `0666`)") {
		t.Error("README's --events-mode row does not say pods' sockets are 0666")
	}
	layout := readme[strings.Index(readme, "## Layout"):]
	var want []string
	for _, glob := range []string{"../../pkg/*", "../../cmd/*", "../../docs/*", "../../examples/*"} {
		paths, _ := filepath.Glob(glob)
		for _, p := range paths {
			rel, _ := filepath.Rel("../..", p)
			if filepath.Dir(rel) == "docs" || filepath.Dir(rel) == "examples" {
				rel = filepath.Base(rel)
			}
			want = append(want, rel)
		}
	}
	for _, w := range want {
		if !strings.Contains(layout, w) {
			t.Errorf("README's layout does not list %s", w)
		}
	}
	if !strings.Contains(layout, "(demo, events)") {
		t.Error("README's layout does not name the client subcommands demo and events")
	}
}

// --events-journal-keep: the default keeps 100 events of each namespace, 0
// none (the journal's KeepPerClass < 0), a negative value is refused.
func TestEventsJournalKeepFlag(t *testing.T) {
	base := []string{"--node", "--nodeid", "n"}
	for arg, want := range map[string]int{"": 100, "--events-journal-keep=0": -1, "--events-journal-keep=7": 7} {
		args := base
		if arg != "" {
			args = append(args, arg)
		}
		f, err := parseServeFlags(args)
		if err != nil {
			t.Fatal(err)
		}
		if got := keepPerClass(f.eventsJournalKeep); got != want {
			t.Errorf("%q: KeepPerClass %d, want %d", arg, got, want)
		}
	}
	if _, err := parseServeFlags(append(base, "--events-journal-keep=-1")); err == nil {
		t.Error("--events-journal-keep=-1 accepted")
	}
}
