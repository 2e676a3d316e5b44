package k8s

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// An app pod in team-a with an events.rookzmq.io inline volume sees its own
// volume's attach and publish, and the ack after `rookzmq events flush` run
// inside the pod; it sees nothing of team-b's volume, provisioned and used at
// the same time, whose events team-b's own pod does see.
func TestPodEventsNamespaceScoped(t *testing.T) {
	ctx := testCtx(t, 10*time.Minute)
	a, b := makeNamespace(t, "team-a"), makeNamespace(t, "team-b")
	for _, ns := range []string{a, b} {
		if _, err := client.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc("data", "32Mi", corev1.PersistentVolumeFilesystem), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	pvA, imageA := boundImage(ctx, t, a, "data")
	pvB, imageB := boundImage(ctx, t, b, "data")

	// team-a's pod subscribes through its inline volume from its first second
	// and writes every event (JSON) to its log.
	withEvents := func(name string) *corev1.Pod {
		p := appPod(name, append(pvcVolume("data"), corev1.Volume{Name: "events", VolumeSource: corev1.VolumeSource{
			CSI: &corev1.CSIVolumeSource{Driver: "events.rookzmq.io"}}}),
			[]corev1.VolumeMount{{Name: "data", MountPath: "/data"}, {Name: "events", MountPath: "/events"}}, nil)
		p.Spec.Containers[0].Command = []string{"rookzmq", "events", "--dir", "/events", "subscribe", "-o", "json"}
		return p
	}
	watcher := withEvents("watcher")
	// team-b's pod subscribes the same way, so that team-b's events are known
	// to exist (the check below is not vacuous).
	writer := withEvents("writer")
	if _, err := client.CoreV1().Pods(a).Create(ctx, watcher, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Pods(b).Create(ctx, writer, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(ctx, t, a, "watcher")
	waitPodRunning(ctx, t, b, "writer")

	out, err := execIn(ctx, a, "watcher", "rookzmq", "events", "--dir", "/events", "flush", "--pvc", "data", "--namespace", a)
	if err != nil {
		t.Fatalf("flush from inside the pod: %v (%s)", err, out)
	}
	t.Logf("flush from inside the pod: %s", strings.TrimSpace(out))

	var seen []zmqbridge.Event
	err = poll(ctx, time.Minute, func() (bool, error) {
		seen = podEvents(ctx, t, a, "watcher")
		kinds := map[string]bool{}
		for _, ev := range seen {
			// By PV: the journal also replays earlier runs' team-a/data.
			if ev.Namespace == a && ev.PVC == "data" && ev.PV == pvA {
				kinds[ev.Kind] = true
			}
		}
		return kinds["attach"] && kinds["publish"] && kinds["ack"], nil
	})
	if err != nil {
		t.Fatalf("team-a's pod did not see attach, publish and ack of its volume %s: %v\n%s", pvA, err, summary(seen))
	}
	err = poll(ctx, time.Minute, func() (bool, error) {
		kinds := map[string]bool{}
		for _, ev := range podEvents(ctx, t, b, "writer") {
			if ev.Namespace == b && ev.PVC == "data" && ev.PV == pvB {
				kinds[ev.Kind] = true
			}
		}
		return kinds["attach"] && kinds["publish"], nil
	})
	if err != nil {
		t.Fatalf("team-b's pod did not see its own volume's attach and publish: %v", err)
	}
	seen = podEvents(ctx, t, a, "watcher")
	for _, ev := range seen {
		if ev.Namespace == b || ev.PodNamespace == b || ev.PV == pvB || strings.Contains(ev.VolumeID, strings.TrimPrefix(imageB, namePrefix)) {
			t.Errorf("team-a's pod saw team-b's event: %+v", ev)
		}
		if ev.Kind != "heartbeat" && ev.Namespace != a {
			t.Errorf("team-a's pod saw an event outside its namespace: %+v", ev)
		}
	}
	t.Logf("team-a's pod saw %d events (its volume %s and earlier team-a volumes), none of team-b's", len(seen), imageA)
}

func summary(evs []zmqbridge.Event) string {
	var b strings.Builder
	for _, ev := range evs {
		fmt.Fprintf(&b, "  %d %s %s/%s pv=%s pod=%s/%s\n", ev.Seq, ev.Kind, ev.Namespace, ev.PVC, ev.PV, ev.PodNamespace, ev.Pod)
	}
	return b.String()
}

// podEvents parses the JSON events a pod printed to its log.
func podEvents(ctx context.Context, t *testing.T, ns, pod string) []zmqbridge.Event {
	t.Helper()
	raw, err := client.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{}).DoRaw(ctx)
	if err != nil {
		t.Fatalf("logs of %s/%s: %v", ns, pod, err)
	}
	var evs []zmqbridge.Event
	sc := bufio.NewScanner(strings.NewReader(string(raw)))
	for sc.Scan() {
		var ev zmqbridge.Event
		if json.Unmarshal(sc.Bytes(), &ev) == nil && ev.Kind != "" {
			evs = append(evs, ev)
		}
	}
	return evs
}
