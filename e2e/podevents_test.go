package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// podTarget makes a target path as long as kubelet's real ones.
func podTarget(t *testing.T) (target, podUID string) {
	podUID = uuid.NewString()
	target = filepath.Join(t.TempDir(), "var/lib/kubelet/pods", podUID, "volumes/kubernetes.io~csi/events/mount")
	if n := len(target + "/control.sock"); n <= 107 {
		t.Fatalf("target path + socket is %d bytes: not longer than a unix socket address", n)
	}
	return target, podUID
}

// publishPodEvents publishes the events.rookzmq.io inline volume for a pod.
func publishPodEvents(t *testing.T, d *driver, target, ns, podUID, scope string) {
	t.Helper()
	vc := map[string]string{"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "app",
		"csi.storage.k8s.io/pod.namespace": ns, "csi.storage.k8s.io/pod.uid": podUID, "scope": scope}
	for i := 0; i < 2; i++ { // idempotent
		if _, err := d.podEvents.NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: "csi-" + podUID[:8],
			TargetPath: target, VolumeCapability: mountCap("", rwo), VolumeContext: vc}); err != nil {
			t.Fatalf("publishing the pod's event volume: %v", err)
		}
	}
}

// podClient connects to a pod endpoint the way a pod does: by a short path
// (here /proc/self/fd/N, the target directory opened).
func podClient(t *testing.T, target string) *zmqbridge.Client {
	t.Helper()
	dirf, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dirf.Close() })
	short := fmt.Sprintf("/proc/self/fd/%d", dirf.Fd())
	c, err := zmqbridge.Dial("ipc://"+short+"/events.sock", "ipc://"+short+"/control.sock")
	if err != nil {
		t.Fatal(err)
	}
	c.Timeout = 20 * time.Second
	t.Cleanup(c.Close)
	return c
}

// stagePVC creates, stages and publishes a volume for a PVC, as a pod's.
func stagePVC(t *testing.T, d *driver, prefix, ns, pvc, podUID string) staged {
	t.Helper()
	vc := mountCap("", rwo)
	req := createReq(prefix+ns+pvc, prefix, 64<<20)
	req.Parameters["csi.storage.k8s.io/pvc/name"] = pvc
	req.Parameters["csi.storage.k8s.io/pvc/namespace"] = ns
	r, err := d.ctrl.CreateVolume(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	s := staged{id: r.GetVolume().GetVolumeId(), staging: filepath.Join(t.TempDir(), "s"), target: filepath.Join(t.TempDir(), "t"),
		capability: vc, context: r.GetVolume().GetVolumeContext()}
	if _, err := d.node.NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		VolumeCapability: vc, VolumeContext: s.context, Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	pub := mergeMaps(s.context, map[string]string{"csi.storage.k8s.io/pod.name": "app", "csi.storage.k8s.io/pod.namespace": ns, "csi.storage.k8s.io/pod.uid": podUID})
	if _, err := d.node.NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: s.id, StagingTargetPath: s.staging,
		TargetPath: s.target, VolumeCapability: vc, VolumeContext: pub}); err != nil {
		t.Fatal(err)
	}
	return s
}

// A per-pod endpoint scoped to namespace A never delivers, replays or flushes
// namespace B's volumes; scope "pod" narrows it to the pod's own volumes.
func TestPodEndpointScopes(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	nsTarget, podA := podTarget(t)
	publishPodEvents(t, d, nsTarget, "team-a", podA, "namespace")
	podTgt, podA2 := podTarget(t)
	publishPodEvents(t, d, podTgt, "team-a", podA2, "pod")
	for _, f := range []string{"events.sock", "control.sock"} {
		if fi, err := os.Stat(filepath.Join(nsTarget, f)); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Fatalf("%s in the pod's target: %v", f, err)
		}
	}
	nsRec := recordFrom(t, podClient(t, nsTarget), 0)
	podRec := recordFrom(t, podClient(t, podTgt), 0)

	a := stagePVC(t, d, prefix, "team-a", "data", podA2) // the pod-scoped pod's volume
	other := stagePVC(t, d, prefix, "team-a", "other", podA)
	b := stagePVC(t, d, prefix, "team-b", "secret", uuid.NewString())

	c := podClient(t, nsTarget)
	if _, _, err := c.Flush(a.id, "", ""); err != nil {
		t.Errorf("flush of its own namespace's volume: %v", err)
	}
	for _, tc := range [][3]string{{b.id, "", ""}, {"", "secret", "team-b"}} {
		if _, _, err := c.Flush(tc[0], tc[1], tc[2]); err == nil {
			t.Errorf("a team-a endpoint flushed team-b's volume (%v)", tc)
		}
	}
	pc := podClient(t, podTgt)
	if _, _, err := pc.Flush(other.id, "", ""); err == nil {
		t.Errorf("a pod-scoped endpoint flushed another pod's volume")
	}
	// Something written: the flush journals a new ack (an idle one would not).
	if err := os.WriteFile(filepath.Join(a.target, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := pc.Flush(a.id, "", ""); err != nil {
		t.Errorf("pod-scoped flush of its own volume: %v", err)
	}
	// team-a: 2 volumes x (attach, publish) + 1 ack, + the pod-scoped pod's ack.
	nsGot := nsRec.wait(t, 6)
	podGot := podRec.wait(t, 2)
	time.Sleep(500 * time.Millisecond) // nothing more may arrive
	for _, ev := range nsRec.snapshot() {
		if ev.Namespace != "team-a" {
			t.Errorf("namespace endpoint delivered %s/%s", ev.Namespace, ev.PVC)
		}
	}
	for _, ev := range podRec.snapshot() {
		if ev.VolumeID != a.id {
			t.Errorf("pod endpoint delivered another volume's %s event (%s)", ev.Kind, ev.PVC)
		}
	}
	if len(nsRec.snapshot()) != 6 || len(podRec.snapshot()) < 2 {
		t.Errorf("namespace endpoint got %d events (want 6), pod endpoint %d: %+v / %+v", len(nsGot), len(podGot), nsGot, podGot)
	}
	events, _, err := c.Replay(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, raw := range events {
		var ev zmqbridge.Event
		json.Unmarshal(raw, &ev)
		if ev.Namespace != "team-a" {
			t.Errorf("replay gave %s", raw)
		}
	}
	for _, s := range []staged{a, other, b} {
		unpublishUnstageDelete(t, d, s)
	}
	for _, tgt := range []string{nsTarget, podTgt} {
		if _, err := d.podEvents.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: "x", TargetPath: tgt}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(tgt); !os.IsNotExist(err) {
			t.Errorf("target %s still there after unpublish: %v", tgt, err)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "events", "p", "*")); len(left) != 0 {
		t.Errorf("pod endpoint leftovers: %v", left)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mi), nsTarget) || strings.Contains(string(mi), podTgt) {
		t.Errorf("a pod target is still mounted")
	}
}

func (r *recorder) snapshot() []zmqbridge.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]zmqbridge.Event(nil), r.events...)
}

func TestPodEndpointBadInput(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil)
	target, uid := podTarget(t)
	base := map[string]string{"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.namespace": "a", "csi.storage.k8s.io/pod.uid": uid}
	for name, vc := range map[string]map[string]string{
		"not ephemeral":     mergeMaps(base, map[string]string{"csi.storage.k8s.io/ephemeral": "false"}),
		"no pod info":       {"csi.storage.k8s.io/ephemeral": "true"},
		"bad scope":         mergeMaps(base, map[string]string{"scope": "cluster"}),
		"unknown attribute": mergeMaps(base, map[string]string{"scop": "pod"}),
	} {
		_, err := d.podEvents.NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: "v", TargetPath: target,
			VolumeCapability: mountCap("", rwo), VolumeContext: vc})
		if err == nil || !strings.Contains(err.Error(), "InvalidArgument") {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
}
