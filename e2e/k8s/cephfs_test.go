package k8s

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// suiteSubvolumes lists the CephFS subvolumes with the suite's prefix in the
// subvolume group (through the mgr: deleted ones are not listed).
func suiteSubvolumes() (map[string]bool, error) {
	names, err := fsAdmin.ListSubVolumes(cephEnv["ROOKZMQ_CEPH_FS_NAME"], cephEnv["ROOKZMQ_CEPH_SUBVOLUMEGROUP"])
	if err != nil {
		return nil, fmt.Errorf("listing subvolumes: %w", err)
	}
	m := map[string]bool{}
	for _, n := range names {
		if strings.HasPrefix(n, namePrefix) {
			m[n] = true
		}
	}
	return m, nil
}

func subvolumes(t *testing.T) map[string]bool {
	t.Helper()
	m, err := suiteSubvolumes()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// boundSubvolume waits until the claim is bound and returns its PV and the
// subvolume behind it, which must exist.
func boundSubvolume(ctx context.Context, t *testing.T, ns, claim string) (pvName, subvolume string) {
	t.Helper()
	pv := boundPV(ctx, t, ns, claim)
	pvName = pv.Name
	subvolume = pv.Spec.CSI.VolumeAttributes["subvolumeName"]
	if pv.Spec.CSI.Driver != cephfsDriver || subvolume == "" || !subvolumes(t)[subvolume] {
		t.Fatalf("PV %s (driver %s): subvolume %q not in Ceph (attributes %v)", pvName, pv.Spec.CSI.Driver, subvolume, pv.Spec.CSI.VolumeAttributes)
	}
	return pvName, subvolume
}

// A ReadWriteMany CephFS PVC (ceph-fuse) used by two pods at once: what one
// writes the other reads, both ways; the PVC grows, both pods see the new
// size (the subvolume's quota) and kubelet's node step ends the resize; pods
// and PVC deleted -> subvolume gone.
func TestCephFSSharedVolume(t *testing.T) {
	ctx := testCtx(t, 10*time.Minute)
	ns := makeNamespace(t, "e2e-cephfs")
	claim := pvcOf(scCephFS, "shared", "64Mi", corev1.PersistentVolumeFilesystem)
	claim.Spec.AccessModes = []corev1.PersistentVolumeAccessMode{corev1.ReadWriteMany}
	if _, err := client.CoreV1().PersistentVolumeClaims(ns).Create(ctx, claim, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pvName, sub := boundSubvolume(ctx, t, ns, "shared")
	start := time.Now()
	for _, name := range []string{"a", "b"} {
		p := appPod(name, pvcVolume("shared"), []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}, nil)
		if _, err := client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitPodRunning(ctx, t, ns, "a")
	waitPodRunning(ctx, t, ns, "b")
	t.Logf("two pods on one RWX CephFS volume running after %s", time.Since(start).Round(100*time.Millisecond))

	// Both ways: each pod writes a file the other must read.
	for _, w := range [][2]string{{"a", "b"}, {"b", "a"}} {
		want := "written by " + w[0]
		if out, err := execIn(ctx, ns, w[0], "sh", "-c", "echo '"+want+"' > /data/from-"+w[0]+" && sync"); err != nil {
			t.Fatalf("pod %s writing: %v %s", w[0], err, out)
		}
		var got string
		if err := poll(ctx, 30*time.Second, func() (bool, error) {
			out, err := execIn(ctx, ns, w[1], "cat", "/data/from-"+w[0])
			got = strings.TrimSpace(out)
			return err == nil && got == want, nil
		}); err != nil {
			t.Fatalf("pod %s reads %q from /data/from-%s, want %q: %v", w[1], got, w[0], want, err)
		}
	}

	// Growth is a quota change: no node step, both pods see it.
	c, err := client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, "shared", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c.Spec.Resources.Requests[corev1.ResourceStorage] = resource.MustParse("128Mi")
	if _, err := client.CoreV1().PersistentVolumeClaims(ns).Update(ctx, c, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	for _, pod := range []string{"a", "b"} {
		var kib int64
		if err := poll(ctx, 2*time.Minute, func() (bool, error) {
			out, err := execIn(ctx, ns, pod, "df", "-k", "/data")
			if err != nil {
				return false, nil
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			f := strings.Fields(lines[len(lines)-1])
			if len(f) < 2 {
				return false, nil
			}
			kib, _ = strconv.ParseInt(f[1], 10, 64)
			return kib == 128<<10, nil
		}); err != nil {
			t.Fatalf("pod %s sees %d KiB after the PVC grew to 128Mi: %v", pod, kib, err)
		}
	}
	t.Logf("expanded in %s: both pods see 131072 KiB", time.Since(start).Round(100*time.Millisecond))
	// Kubelet's NodeExpandVolume (which emits the node's expand event) ends
	// the resize: the PVC's capacity follows only then.
	if err := poll(ctx, 3*time.Minute, func() (bool, error) {
		c, err := client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, "shared", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		got := c.Status.Capacity[corev1.ResourceStorage]
		return got.Cmp(resource.MustParse("128Mi")) == 0 && len(c.Status.Conditions) == 0, nil
	}); err != nil {
		t.Fatalf("PVC capacity after the node step: %v", err)
	}
	t.Logf("PVC capacity 128Mi (node step done) %s after the request", time.Since(start).Round(100*time.Millisecond))

	if err := client.CoreV1().Pods(ns).Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deleteAndCheckGone(ctx, t, ns, "a", "shared", pvName, sub)
	noFuseDaemon(t, sub)
}

// A pod keeps writing to its ceph-fuse volume while the CephFS node plugin
// pod is deleted and the DaemonSet replaces it: as for rbd-fuse, no I/O
// error, the new plugin keeps the volume before it is Ready, every record
// reads back, also after mounting afresh; nothing is left afterwards.
func TestCephFSNodePluginRestartKeepsWriter(t *testing.T) {
	pluginRestartKeepsWriter(t, "e2e-cephfs-survive", cephfsDriver, "node-cephfs", "CephFS node plugin")
}
