package k8s

import (
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// After a kubelet restart, kubelet registers both drivers again through the
// node plugin's registration sockets (the plugin logs kubelet's verdict).
func TestKubeletRestartReRegisters(t *testing.T) {
	if m := os.Getenv("E2E_CLUSTER"); m != "" && m != "local" {
		t.Skip("restarts kubelet through e2e/k8s/cluster.sh: local cluster only")
	}
	ctx := testCtx(t, 5*time.Minute)
	pods, err := client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=node"})
	if err != nil || len(pods.Items) != 1 {
		t.Fatalf("node plugin pods: %v %v", pods, err)
	}
	plugin := pods.Items[0].Name
	since := metav1.NewTime(time.Now().Add(-time.Second))
	if _, err := sh("e2e/k8s/cluster.sh", "restart-kubelet"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = poll(ctx, 2*time.Minute, func() (bool, error) {
		raw, err := client.CoreV1().Pods(namespace).GetLogs(plugin, &corev1.PodLogOptions{SinceTime: &since}).DoRaw(ctx)
		if err != nil {
			return false, nil // kubelet (which serves logs) is still starting
		}
		s := string(raw)
		return strings.Contains(s, `"kubelet registered the driver" driver="rbd.rookzmq.io"`) &&
			strings.Contains(s, `"kubelet registered the driver" driver="events.rookzmq.io"`), nil
	})
	if err != nil {
		t.Fatalf("no re-registration after the kubelet restart: %v", err)
	}
	t.Logf("kubelet registered both drivers again %s after its restart", time.Since(start).Round(100*time.Millisecond))
}
