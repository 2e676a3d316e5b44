package k8s

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// writerScript appends 4 KiB records (record i is "i\n" repeated) to
// /data/blob, each with fsync so an I/O error shows at once, and logs each
// record's completion time (ns) to /status/times, off the volume. On an
// error it says so in its termination message and exits; after /data/stop
// it idles.
const writerScript = `set -u
i=0
while [ ! -e /data/stop ]; do
  i=$((i+1))
  if ! yes "$i" | head -c 4096 | dd of=/data/blob oflag=append conv=notrunc,fsync status=none 2>/status/dd.err; then
    echo "record $i: $(cat /status/dd.err)" > /dev/termination-log
    exit 1
  fi
  echo "$i $(date +%s%N)" >> /status/times
  sleep 0.02
done
echo "$i" > /status/count
sleep infinity
`

// verifyScript rebuilds what N records must be and compares with /data/blob.
const verifyScript = `n=$1; i=0
while [ $i -lt $n ]; do i=$((i+1)); yes "$i" | head -c 4096; done > /tmp/expect
cmp /tmp/expect /data/blob && echo "$n records match"`

// writer is a pod that writes continuously to a FUSE-mounted PVC: rbd-fuse
// (driver provisioner) or ceph-fuse (cephfsDriver).
type writer struct {
	ns, pod, claim, pv, node string
	// driver is the PV's CSI driver; image its RBD image or CephFS subvolume.
	driver, image string
}

// startWriter provisions an rbd-fuse PVC and starts the writer pod on it; it
// waits until the first records are written.
func startWriter(ctx context.Context, t *testing.T, ns string) *writer {
	return startWriterOn(ctx, t, ns, provisioner)
}

// startWriterOn is startWriter on a volume of driver (its suite StorageClass).
func startWriterOn(ctx context.Context, t *testing.T, ns, driver string) *writer {
	t.Helper()
	claim := pvc("data", "64Mi", corev1.PersistentVolumeFilesystem)
	if driver == cephfsDriver {
		claim = pvcOf(scCephFS, "data", "64Mi", corev1.PersistentVolumeFilesystem)
	}
	if _, err := client.CoreV1().PersistentVolumeClaims(ns).Create(ctx, claim, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w := &writer{ns: ns, pod: "writer", claim: "data", driver: driver}
	if driver == cephfsDriver {
		w.pv, w.image = boundSubvolume(ctx, t, ns, "data")
	} else {
		w.pv, w.image = boundImage(ctx, t, ns, "data")
	}
	pod := appPod(w.pod, append(pvcVolume("data"), corev1.Volume{Name: "status", VolumeSource: corev1.VolumeSource{
		EmptyDir: &corev1.EmptyDirVolumeSource{}}}),
		[]corev1.VolumeMount{{Name: "data", MountPath: "/data"}, {Name: "status", MountPath: "/status"}}, nil)
	pod.Spec.RestartPolicy = corev1.RestartPolicyNever
	pod.Spec.Containers[0].Command = []string{"sh", "-c", writerScript}
	if _, err := client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(ctx, t, ns, w.pod)
	p, err := client.CoreV1().Pods(ns).Get(ctx, w.pod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w.node = p.Spec.NodeName
	if err := poll(ctx, time.Minute, func() (bool, error) { return len(w.times(ctx, t)) >= 20, nil }); err != nil {
		t.Fatalf("the writer did not get going: %v", err)
	}
	return w
}

// times reads the writer's completion times (ns since the epoch), by record.
func (w *writer) times(ctx context.Context, t *testing.T) []int64 {
	t.Helper()
	w.checkAlive(ctx, t)
	out, err := execIn(ctx, w.ns, w.pod, "cat", "/status/times")
	if err != nil {
		t.Fatal(err)
	}
	var ts []int64
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) != 2 {
			continue
		}
		n, _ := strconv.Atoi(f[0])
		v, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || n != len(ts)+1 {
			t.Fatalf("times line %q after %d records", l, len(ts))
		}
		ts = append(ts, v)
	}
	return ts
}

// checkAlive fails the test if the writer stopped (an I/O error).
func (w *writer) checkAlive(ctx context.Context, t *testing.T) {
	t.Helper()
	p, err := client.CoreV1().Pods(w.ns).Get(ctx, w.pod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Status.Phase != corev1.PodRunning {
		msg := ""
		for _, c := range p.Status.ContainerStatuses {
			if c.State.Terminated != nil {
				msg = c.State.Terminated.Message
			}
		}
		t.Fatalf("the writer stopped (phase %s): %s", p.Status.Phase, msg)
	}
}

// keepsWriting runs action while the writer writes, and checks that the
// writer went on without an error, wrote after action returned, and that
// every record reads back. It returns the longest pause between two records
// during action and before it (the baseline).
func (w *writer) keepsWriting(ctx context.Context, t *testing.T, action func()) (gap, baseline time.Duration) {
	t.Helper()
	before := w.times(ctx, t)
	from := time.Now().UnixNano()
	action()
	to := time.Now().UnixNano()
	// Records written after the action prove the volume still takes writes.
	n := len(w.times(ctx, t))
	if err := poll(ctx, time.Minute, func() (bool, error) { return len(w.times(ctx, t)) >= n+50, nil }); err != nil {
		t.Fatalf("the writer made no progress after the action: %v", err)
	}
	if _, err := execIn(ctx, w.ns, w.pod, "touch", "/data/stop"); err != nil {
		t.Fatal(err)
	}
	var count string
	if err := poll(ctx, time.Minute, func() (bool, error) {
		w.checkAlive(ctx, t)
		out, err := execIn(ctx, w.ns, w.pod, "cat", "/status/count")
		count = strings.TrimSpace(out)
		return err == nil && count != "", nil
	}); err != nil {
		t.Fatalf("the writer did not stop: %v", err)
	}
	ts := w.times(ctx, t)
	if strconv.Itoa(len(ts)) != count {
		t.Fatalf("the writer counts %s records, its log %d", count, len(ts))
	}
	if out, err := execIn(ctx, w.ns, w.pod, "sh", "-c", verifyScript, "verify", count); err != nil || !strings.Contains(out, "records match") {
		t.Fatalf("read back %s records: %q %v", count, out, err)
	}
	gap, baseline = maxGap(ts, from, to), maxGap(before, 0, from)
	t.Logf("%s records written and read back; longest pause between records: %s during the action (%.1f s), %s before it",
		count, gap.Round(time.Millisecond), float64(to-from)/1e9, baseline.Round(time.Millisecond))
	return gap, baseline
}

// maxGap is the longest interval between consecutive times that ends in [from, to].
func maxGap(ts []int64, from, to int64) time.Duration {
	var m int64
	for i := 1; i < len(ts); i++ {
		if ts[i] >= from && ts[i-1] <= to && ts[i]-ts[i-1] > m {
			m = ts[i] - ts[i-1]
		}
	}
	return time.Duration(m)
}

// readBackFromCeph deletes the writer pod, waits until kubelet has unstaged
// the volume (so its FUSE daemon is gone), and reads every record again in a new
// pod, which stages the volume afresh from Ceph.
func (w *writer) readBackFromCeph(ctx context.Context, t *testing.T, count string) {
	t.Helper()
	if err := client.CoreV1().Pods(w.ns).Delete(ctx, w.pod, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	inUse := corev1.UniqueVolumeName("kubernetes.io/csi/" + w.driver + "^")
	err := poll(ctx, 3*time.Minute, func() (bool, error) {
		if _, err := client.CoreV1().Pods(w.ns).Get(ctx, w.pod, metav1.GetOptions{}); err == nil {
			return false, nil
		}
		n, err := client.CoreV1().Nodes().Get(ctx, w.node, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		pv, err := client.CoreV1().PersistentVolumes().Get(ctx, w.pv, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, v := range n.Status.VolumesInUse {
			if v == inUse+corev1.UniqueVolumeName(pv.Spec.CSI.VolumeHandle) {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("volume %s still in use on %s: %v", w.pv, w.node, err)
	}
	reader := appPod("reader", pvcVolume(w.claim), []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}, nil)
	if _, err := client.CoreV1().Pods(w.ns).Create(ctx, reader, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(ctx, t, w.ns, "reader")
	if out, err := execIn(ctx, w.ns, "reader", "sh", "-c", verifyScript, "verify", count); err != nil || !strings.Contains(out, "records match") {
		t.Fatalf("read back %s records after staging afresh: %q %v", count, out, err)
	}
	w.pod = "reader"
}

// nodePlugin returns the RBD node plugin pod (one node).
func nodePlugin(ctx context.Context, t *testing.T) corev1.Pod {
	return nodePluginOf(ctx, t, "node")
}

// nodePluginOf returns the node plugin pod of a component: node (RBD) or
// node-cephfs.
func nodePluginOf(ctx context.Context, t *testing.T, component string) corev1.Pod {
	t.Helper()
	pods, err := client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + component})
	if err != nil || len(pods.Items) != 1 {
		t.Fatalf("node plugin pods: %v %v", pods, err)
	}
	return pods.Items[0]
}

// waitNewNodePlugin waits until a node plugin pod (of old's component) other
// than old is Ready and returns it.
func waitNewNodePlugin(ctx context.Context, t *testing.T, old metav1.Object) corev1.Pod {
	t.Helper()
	var got corev1.Pod
	component := old.GetLabels()["app.kubernetes.io/component"]
	err := poll(ctx, 3*time.Minute, func() (bool, error) {
		pods, err := client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=" + component})
		if err != nil {
			return false, err
		}
		for _, p := range pods.Items {
			if p.UID != old.GetUID() && p.DeletionTimestamp == nil && podReady(&p) {
				got = p
				return len(pods.Items) == 1, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("no new node plugin pod ready: %v", err)
	}
	return got
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podLog returns a pod's log (its rookzmq container).
func podLog(ctx context.Context, t *testing.T, ns, pod string) string {
	t.Helper()
	raw, err := client.CoreV1().Pods(ns).GetLogs(pod, &corev1.PodLogOptions{Container: "rookzmq"}).DoRaw(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

// checkedHealthy wants the node plugin's start-up recovery to have kept the
// writer's volume, and no volume failed.
func (w *writer) checkedHealthy(ctx context.Context, t *testing.T, plugin string) {
	t.Helper()
	pv, err := client.CoreV1().PersistentVolumes().Get(ctx, w.pv, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	log := podLog(ctx, t, namespace, plugin)
	var line string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `"staged volume kept"`) && strings.Contains(l, pv.Spec.CSI.VolumeHandle) {
			line = l
		}
	}
	if !strings.Contains(line, ` pid=`) || !strings.Contains(log, `repaired=0 failed=0`) {
		t.Fatalf("the new node plugin did not find volume %s healthy at start (line %q):\n%s", w.pv, line, clip(log))
	}
	t.Logf("new node plugin %s: %s", plugin, line[strings.Index(line, `"staged volume kept"`):])
}

// noFuseDaemon wants no rbd-fuse serving image (or ceph-fuse serving a
// subvolume of that name) left on this machine within a minute (local
// cluster only: the test runs on its node). A CephFS volume's PV may go
// before kubelet unstages it (deleting a subvolume does not wait for its
// mounts, as with ceph-csi), so this waits for kubelet's unstage.
func noFuseDaemon(t *testing.T, image string) {
	t.Helper()
	if m := os.Getenv("E2E_CLUSTER"); m != "" && m != "local" {
		return
	}
	var pids []int
	start := time.Now()
	for deadline := start.Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if pids = fuseDaemons(image); len(pids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("FUSE daemons for %s still running a minute after its PV went: pids %v", image, pids)
		}
	}
	t.Logf("no FUSE daemon for %s after %s", image, time.Since(start).Round(100*time.Millisecond))
}

// fuseDaemons lists live rbd-fuse processes whose command line names image,
// and ceph-fuse processes mounting a subvolume of that name.
func fuseDaemons(image string) []int {
	var pids []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		rbdFuse := filepath.Base(args[0]) == "rbd-fuse" && strings.Contains(string(b), "--image="+image)
		cephFuse := filepath.Base(args[0]) == "ceph-fuse" && strings.Contains(string(b), "/"+image+"/")
		if !rbdFuse && !cephFuse {
			continue
		}
		pid, _ := strconv.Atoi(strings.Split(p, "/")[2])
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			s := string(st)
			if i := strings.LastIndexByte(s, ')'); i > 0 && i+2 < len(s) && s[i+2] != 'Z' {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// A pod keeps writing to its rbd-fuse volume while the node plugin pod is
// deleted and the DaemonSet replaces it: no I/O error, the new plugin finds
// the volume healthy before it is Ready, every record reads back, also after
// staging afresh from Ceph; nothing is left afterwards.
func TestNodePluginRestartKeepsWriter(t *testing.T) {
	pluginRestartKeepsWriter(t, "e2e-survive", provisioner, "node", "node plugin")
}

// pluginRestartKeepsWriter deletes the node plugin pod of component while a
// writer writes to a volume of driver (in namespace ns), and checks what
// TestNodePluginRestartKeepsWriter says; what names the plugin in the log.
func pluginRestartKeepsWriter(t *testing.T, ns, driver, component, what string) {
	ctx := testCtx(t, 10*time.Minute)
	ns = makeNamespace(t, ns)
	w := startWriterOn(ctx, t, ns, driver)
	old := nodePluginOf(ctx, t, component)
	var plugin corev1.Pod
	gap, _ := w.keepsWriting(ctx, t, func() {
		start := time.Now()
		if err := client.CoreV1().Pods(namespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		plugin = waitNewNodePlugin(ctx, t, &old)
		t.Logf("%s %s deleted, %s ready in %s", what, old.Name, plugin.Name, time.Since(start).Round(100*time.Millisecond))
	})
	w.checkedHealthy(ctx, t, plugin.Name)
	t.Logf("k8s-e2e: %s pod restart with a live writer: longest pause between records %s", what, gap.Round(time.Millisecond))
	count := strconv.Itoa(len(w.times(ctx, t)))
	w.readBackFromCeph(ctx, t, count)
	deleteAndCheckGone(ctx, t, ns, w.pod, w.claim, w.pv, w.image)
	noFuseDaemon(t, w.image)
}

// helm upgrade to a new image tag and a changed value while a pod writes to
// its rbd-fuse volume: the writer goes on without an error, the node plugin
// and controller pods are replaced by ones of the new tag, kubelet registers
// the new node plugin's drivers, and nothing is left afterwards.
func TestHelmUpgradeKeepsWriter(t *testing.T) {
	if m := os.Getenv("E2E_CLUSTER"); m != "" && m != "local" {
		t.Skip("tags the image in the local cluster's containerd: local cluster only")
	}
	ctx := testCtx(t, 10*time.Minute)
	tag := strings.TrimPrefix(appImage, "rookzmq:")
	newTag := tag + "-upgrade"
	env := map[string]string{}
	if err := exportsInto(env, "e2e/k8s/cluster.sh"); err != nil {
		t.Fatal(err)
	}
	ctr := strings.Fields(env["ROOKZMQ_K8S_CTR"])
	// containerd knows the images by their full names.
	const repo = "docker.io/library/"
	sh(ctr[0], append(ctr[1:], "images", "rm", repo+"rookzmq:"+newTag)...)
	if _, err := sh(ctr[0], append(ctr[1:], "images", "tag", repo+appImage, repo+"rookzmq:"+newTag)...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Back to the release the other tests expect.
		if err := installChart(tag); err != nil {
			t.Errorf("helm upgrade back to %s: %v", tag, err)
		}
		sh(ctr[0], append(ctr[1:], "images", "rm", repo+"rookzmq:"+newTag)...)
	})
	ns := makeNamespace(t, "e2e-upgrade")
	w := startWriter(ctx, t, ns)
	oldNode := nodePlugin(ctx, t)
	oldCtrl, err := client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=controller"})
	if err != nil {
		t.Fatal(err)
	}
	var plugin corev1.Pod
	gap, _ := w.keepsWriting(ctx, t, func() {
		start := time.Now()
		if err := installChart(newTag, "--set", "logLevel=5"); err != nil {
			t.Fatal(err)
		}
		plugin = waitNewNodePlugin(ctx, t, &oldNode)
		t.Logf("helm upgrade to %s done in %s", newTag, time.Since(start).Round(100*time.Millisecond))
	})
	t.Logf("k8s-e2e: helm upgrade with a live writer: longest pause between records %s", gap.Round(time.Millisecond))
	if img := plugin.Spec.Containers[0].Image; img != "rookzmq:"+newTag {
		t.Fatalf("new node plugin runs %s, want rookzmq:%s", img, newTag)
	}
	w.checkedHealthy(ctx, t, plugin.Name)
	// kubelet registered the new plugin's drivers (it logs kubelet's verdict).
	if err := poll(ctx, time.Minute, func() (bool, error) {
		log := podLog(ctx, t, namespace, plugin.Name)
		return strings.Contains(log, `"kubelet registered the driver" driver="rbd.rookzmq.io"`) &&
			strings.Contains(log, `"kubelet registered the driver" driver="events.rookzmq.io"`), nil
	}); err != nil {
		t.Fatalf("kubelet did not register the upgraded node plugin's drivers: %v", err)
	}
	// Only the new controller pods are left, all of the new tag.
	old := map[string]bool{}
	for _, p := range oldCtrl.Items {
		old[string(p.UID)] = true
	}
	if err := poll(ctx, 2*time.Minute, func() (bool, error) {
		pods, err := client.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=controller"})
		if err != nil {
			return false, err
		}
		for _, p := range pods.Items {
			if old[string(p.UID)] || p.Spec.Containers[0].Image != "rookzmq:"+newTag {
				return false, nil
			}
		}
		return len(pods.Items) == len(oldCtrl.Items), nil
	}); err != nil {
		t.Fatalf("old controller pods left after the upgrade: %v", err)
	}
	// One registration socket per driver in kubelet's directory.
	if entries, err := os.ReadDir("/var/lib/kubelet/plugins_registry"); err != nil {
		t.Fatal(err)
	} else {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		if strings.Join(names, " ") != "cephfs.rookzmq.io-reg.sock events.rookzmq.io-reg.sock rbd.rookzmq.io-reg.sock" {
			t.Fatalf("kubelet's registration directory holds %v", names)
		}
	}
	count := strconv.Itoa(len(w.times(ctx, t)))
	w.readBackFromCeph(ctx, t, count)
	deleteAndCheckGone(ctx, t, ns, w.pod, w.claim, w.pv, w.image)
	noFuseDaemon(t, w.image)
}
