package e2e

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// The node plugin registers both of its drivers in kubelet's plugin
// registration directory, each naming its own CSI socket.
func TestKubeletRegistration(t *testing.T) {
	dir := newDriverDir(t)
	reg := filepath.Join(dir, "plugins_registry")
	if err := os.Mkdir(reg, 0o750); err != nil {
		t.Fatal(err)
	}
	startDriver(t, dir, nil, "--registration-dir", reg)
	for driver, endpoint := range map[string]string{
		"rbd.rookzmq.io":    filepath.Join(dir, "csi.sock"),
		"events.rookzmq.io": filepath.Join(dir, "events-csi.sock"),
	} {
		conn, err := grpc.NewClient("unix://"+filepath.Join(reg, driver+"-reg.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		var info *registerapi.PluginInfo
		for deadline := time.Now().Add(10 * time.Second); ; {
			info, err = registerapi.NewRegistrationClient(conn).GetInfo(ctx(t), &registerapi.InfoRequest{})
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("%s: GetInfo: %v", driver, err)
		}
		if info.Name != driver || info.Endpoint != endpoint || info.Type != registerapi.CSIPlugin {
			t.Errorf("%s: GetInfo = %+v", driver, info)
		}
		if _, err := registerapi.NewRegistrationClient(conn).NotifyRegistrationStatus(ctx(t), &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
			t.Fatal(err)
		}
	}
}
