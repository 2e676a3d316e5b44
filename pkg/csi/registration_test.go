package csi

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// kubeletDial plays kubelet's plugin watcher: it dials the registration socket.
func kubeletDial(t *testing.T, path string) registerapi.RegistrationClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return registerapi.NewRegistrationClient(conn)
}

func waitSocket(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no socket at %s", path)
}

// waitInfo calls GetInfo on path until it answers (10s at most).
func waitInfo(t *testing.T, path string) *registerapi.PluginInfo {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var info *registerapi.PluginInfo
		info, err = kubeletDial(t, path).GetInfo(ctx, &registerapi.InfoRequest{})
		cancel()
		if err == nil {
			return info
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("GetInfo on %s: %v", path, err)
	return nil
}

func startRegistrar(t *testing.T, r *Registrar) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	return func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	}
}

func TestRegistrarKubeletHandshake(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "plugins_registry")
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	r := &Registrar{Dir: dir, Driver: "rbd.rookzmq.io", Endpoint: "/var/lib/kubelet/plugins/rbd.rookzmq.io/csi.sock", Check: 50 * time.Millisecond}
	stop := startRegistrar(t, r)
	path := filepath.Join(dir, "rbd.rookzmq.io-reg.sock")
	waitSocket(t, path)
	c := kubeletDial(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := c.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != registerapi.CSIPlugin || info.Name != "rbd.rookzmq.io" || info.Endpoint != r.Endpoint || len(info.SupportedVersions) == 0 {
		t.Fatalf("GetInfo = %+v", info)
	}
	if r.Status() != nil {
		t.Fatal("status before kubelet reported any")
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: false, Error: "version 0.9 too old"}); err != nil {
		t.Fatal(err)
	}
	if s := r.Status(); s == nil || s.Registered || s.Error != "version 0.9 too old" {
		t.Fatalf("status = %+v", s)
	}
	if _, err := c.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	if s := r.Status(); s == nil || !s.Registered || s.Error != "" {
		t.Fatalf("status = %+v", s)
	}
	stop()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after Run returned: %v", err)
	}
}

func TestRegistrarReplacesStaleSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "events.rookzmq.io-reg.sock")
	// A socket file nobody listens on: what a crashed plugin leaves.
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	r := &Registrar{Dir: dir, Driver: "events.rookzmq.io", Endpoint: "/x/csi.sock", Check: 50 * time.Millisecond}
	stop := startRegistrar(t, r)
	defer stop()
	// The stale socket refuses connections; only a new listener answers.
	if info := waitInfo(t, path); info.Name != "events.rookzmq.io" {
		t.Fatalf("GetInfo = %v", info)
	}
}

func TestRegistrarRefusesNonSocket(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "d-reg.sock"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := &Registrar{Dir: dir, Driver: "d", Endpoint: "/x"}
	if err := r.Run(context.Background()); err == nil {
		t.Fatal("Run replaced a regular file")
	}
}

func TestRegistrarRecreatesAfterKubeletDirReset(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "plugins_registry")
	r := &Registrar{Dir: dir, Driver: "rbd.rookzmq.io", Endpoint: "/p/csi.sock", Check: 50 * time.Millisecond}
	stop := startRegistrar(t, r)
	defer stop()
	path := r.SocketPath()
	// No kubelet yet: nothing is created.
	time.Sleep(200 * time.Millisecond)
	if _, err := os.Lstat(dir); !os.IsNotExist(err) {
		t.Fatalf("registrar created kubelet's directory: %v", err)
	}
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	waitInfo(t, path)
	// kubelet's directory is wiped and made again (e.g. a node reset).
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if _, err := os.Lstat(dir); !os.IsNotExist(err) {
		t.Fatalf("registrar re-created kubelet's directory: %v", err)
	}
	if err := os.Mkdir(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	waitInfo(t, path)
}
