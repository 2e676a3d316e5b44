package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// cliRun is a running `rookzmq events ... subscribe`.
type cliRun struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	seqs   []uint64
	stderr strings.Builder
	done   chan struct{}
}

func startCLI(t *testing.T, dir string, args ...string) *cliRun {
	t.Helper()
	r := &cliRun{done: make(chan struct{})}
	r.cmd = exec.Command(binPath, append([]string{"events", "--dir", dir, "subscribe", "-o", "json"}, args...)...)
	out, err := r.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	r.cmd.Stderr = &syncWriter{mu: &r.mu, b: &r.stderr}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(r.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var ev zmqbridge.Event
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				r.mu.Lock()
				r.seqs = append(r.seqs, ev.Seq)
				r.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { r.cmd.Process.Kill(); <-r.done; r.cmd.Wait() })
	return r
}

type syncWriter struct {
	mu *sync.Mutex
	b  *strings.Builder
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (r *cliRun) got() ([]uint64, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]uint64(nil), r.seqs...), r.stderr.String()
}

func (r *cliRun) waitSeqs(t *testing.T, n int) []uint64 {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		seqs, stderr := r.got()
		if len(seqs) >= n {
			return seqs
		}
		if time.Now().After(deadline) {
			t.Fatalf("got %v, want %d events; stderr:\n%s", seqs, n, stderr)
		}
	}
}

func emitN(t *testing.T, b *zmqbridge.Bridge, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if _, err := b.Emit(context.Background(), zmqbridge.Event{Kind: "attach", VolumeID: "v"}); err != nil {
			t.Fatal(err)
		}
	}
}

// `rookzmq events subscribe --since now` prints only what happens from then
// on; on a truncated journal it warns and continues from the first event
// held, and with --strict it fails instead.
func TestCLISubscribeSinceNowAndTruncated(t *testing.T) {
	dir := t.TempDir()
	b, err := zmqbridge.New(zmqbridge.Options{Dir: dir, Node: "n1", Heartbeat: 100 * time.Millisecond,
		Journal: zmqbridge.JournalOptions{SegmentBytes: 1, MaxBytes: 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	emitN(t, b, 5)

	now := startCLI(t, dir, "--since", "now")
	time.Sleep(700 * time.Millisecond)
	emitN(t, b, 1)
	if seqs := now.waitSeqs(t, 1); len(seqs) != 1 || seqs[0] != 6 {
		t.Fatalf("--since now printed %v, want [6]", seqs)
	}

	// Retention keeps only the active segment: from 0, events 1..6 are gone.
	lenient := startCLI(t, dir, "--since", "0")
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, stderr := lenient.got(); strings.Contains(stderr, "WARNING") {
			if !strings.Contains(stderr, "before 7") {
				t.Fatalf("warning %q, want one about the events before 7", stderr)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no warning about the truncated journal")
		}
	}
	emitN(t, b, 1)
	if seqs := lenient.waitSeqs(t, 1); len(seqs) != 1 || seqs[0] != 7 {
		t.Fatalf("after the warning it printed %v, want [7]", seqs)
	}

	out, err := exec.Command(binPath, "events", "--dir", dir, "subscribe", "--since", "0", "--strict").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "truncated") {
		t.Fatalf("--strict on a truncated journal: %v, %s", err, out)
	}
}

// The socket modes are what docs/events.md says: node-wide ones follow
// --events-mode (0600 by default, 0660 here), a pod's are 0666 whatever it says.
func TestSocketModesAsDocumented(t *testing.T) {
	doc, err := os.ReadFile("../docs/events.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(doc), "A pod's socket files (below) are always mode 0666, whatever `--events-mode`") {
		t.Fatal("docs/events.md does not state the pods' socket mode")
	}
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil, "--events-mode", "0660")
	target, uid := podTarget(t)
	publishPodEvents(t, d, target, "team-m", uid, "namespace")
	for path, want := range map[string]os.FileMode{
		filepath.Join(dir, "events", "events.sock"): 0o660, filepath.Join(dir, "events", "control.sock"): 0o660,
		filepath.Join(target, "events.sock"): 0o666, filepath.Join(target, "control.sock"): 0o666,
	} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s has mode %o, want %o", path, st.Mode().Perm(), want)
		}
	}
	if _, err := d.podEvents.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: "csi-" + uid[:8], TargetPath: target}); err != nil {
		t.Fatal(err)
	}
}
