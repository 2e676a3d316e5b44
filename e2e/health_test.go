package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// /healthz checks the cached Ceph connections: 200 while the monitor answers,
// 503 naming the monitors' silence within the 3 s bound once it stopped; the
// driver still stops promptly with that ping in flight (it holds a lease, so
// the connection is closed by the process's end, not under the ping).
func TestHealthzCephConnection(t *testing.T) {
	m := startMiniMon(t)
	dir := t.TempDir()
	cfg := fmt.Sprintf(`[{"clusterID":"mini","monitors":[%q]}]`, m.addr)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := closedPort(t)
	d := startDriver(t, dir, nil, "--node=false", "--metrics-address", addr)
	get := func() (int, string, time.Duration) {
		t.Helper()
		start := time.Now()
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + addr + "/healthz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), time.Since(start)
	}
	// The metrics server starts with the driver; wait for it.
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// A create connects (the monitor answers) and fails for want of an OSD:
	// the connection stays cached.
	c, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	r := createReq(uniquePrefix(t)+"h", "e2e-h-", 16<<20)
	r.Parameters["clusterID"], r.Secrets = "mini", map[string]string{"userID": "admin", "userKey": m.key}
	_, err := d.ctrl.CreateVolume(c, r)
	cancel()
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("create on a cluster without OSD: %v, want Unavailable", err)
	}
	if code, body, took := get(); code != 200 {
		t.Fatalf("/healthz with the monitor up: %d %q after %s", code, body, took)
	}
	m.stop()
	code, body, took := get()
	t.Logf("/healthz with the monitor stopped: %d %q after %s", code, strings.TrimSpace(body), took)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "ceph monitors") {
		t.Errorf("/healthz with the monitor stopped: %d %q, want 503 naming the Ceph monitors", code, body)
	}
	if took > 4*time.Second {
		t.Errorf("/healthz took %s, its Ceph check is bounded by 3 s", took)
	}
	start := time.Now()
	d.stop()
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the driver took %s to stop", took)
	}
}
