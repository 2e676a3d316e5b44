package k8s

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func pvc(name string, size string, mode corev1.PersistentVolumeMode) *corev1.PersistentVolumeClaim {
	return pvcOf(scFS, name, size, mode)
}

func pvcOf(sc, name string, size string, mode corev1.PersistentVolumeMode) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: &sc,
			VolumeMode:       &mode,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)}},
		},
	}
}

// appPod runs sleep in the rookzmq image (it has sh, dd, df, blockdev).
func appPod(name string, volumes []corev1.Volume, mounts []corev1.VolumeMount, devices []corev1.VolumeDevice) *corev1.Pod {
	zero := int64(0)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: &zero,
			Containers: []corev1.Container{{
				Name: "app", Image: appImage, ImagePullPolicy: corev1.PullNever,
				Command:      []string{"sleep", "infinity"},
				VolumeMounts: mounts, VolumeDevices: devices,
			}},
			Volumes: volumes,
		},
	}
}

func pvcVolume(claim string) []corev1.Volume {
	return []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim}}}}
}

// makeNamespace creates a fresh namespace, deleted (and waited for) at cleanup.
func makeNamespace(t *testing.T, name string) string {
	t.Helper()
	ctx := testCtx(t, time.Minute)
	_, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{suiteLabel: "true"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		client.CoreV1().Namespaces().Delete(ctx, name, metav1.DeleteOptions{})
		poll(ctx, 3*time.Minute, func() (bool, error) {
			_, err := client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		})
	})
	return name
}

func waitPodRunning(ctx context.Context, t *testing.T, ns, name string) {
	t.Helper()
	start := time.Now()
	err := poll(ctx, 3*time.Minute, func() (bool, error) {
		p, err := client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		return p.Status.Phase == corev1.PodRunning, nil
	})
	if err != nil {
		evs, _ := client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
		var b strings.Builder
		for _, e := range evs.Items {
			fmt.Fprintf(&b, "  %s %s: %s\n", e.InvolvedObject.Name, e.Reason, e.Message)
		}
		t.Fatalf("pod %s/%s not running: %v\nevents:\n%s", ns, name, err, b.String())
	}
	t.Logf("pod %s/%s running after %s", ns, name, time.Since(start).Round(100*time.Millisecond))
}

// boundPV waits until the claim is bound and returns its PV.
func boundPV(ctx context.Context, t *testing.T, ns, claim string) *corev1.PersistentVolume {
	t.Helper()
	var pvName string
	err := poll(ctx, 2*time.Minute, func() (bool, error) {
		c, err := client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, claim, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		pvName = c.Spec.VolumeName
		return c.Status.Phase == corev1.ClaimBound, nil
	})
	if err != nil {
		t.Fatalf("PVC %s/%s not bound: %v", ns, claim, err)
	}
	pv, err := client.CoreV1().PersistentVolumes().Get(ctx, pvName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return pv
}

func boundImage(ctx context.Context, t *testing.T, ns, claim string) (pvName, image string) {
	t.Helper()
	pv := boundPV(ctx, t, ns, claim)
	pvName = pv.Name
	image = pv.Spec.CSI.VolumeAttributes["imageName"]
	if image == "" || !rbdImages(t)[image] {
		t.Fatalf("PV %s: image %q not in Ceph (attributes %v)", pvName, image, pv.Spec.CSI.VolumeAttributes)
	}
	return pvName, image
}

// deleteAndCheckGone deletes the pod and PVC and waits until the PV and its
// RBD image (or CephFS subvolume) are gone.
func deleteAndCheckGone(ctx context.Context, t *testing.T, ns, pod, claim, pvName, image string) {
	t.Helper()
	start := time.Now()
	if err := client.CoreV1().Pods(ns).Delete(ctx, pod, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := client.CoreV1().PersistentVolumeClaims(ns).Delete(ctx, claim, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	err := poll(ctx, 3*time.Minute, func() (bool, error) {
		_, err := client.CoreV1().PersistentVolumes().Get(ctx, pvName, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
	if err != nil {
		t.Fatalf("PV %s not deleted: %v", pvName, err)
	}
	if rbdImages(t)[image] || subvolumes(t)[image] {
		t.Fatalf("PV %s is gone but image or subvolume %s is still in Ceph", pvName, image)
	}
	t.Logf("pod, PVC, PV and image %s gone in %s", image, time.Since(start).Round(100*time.Millisecond))
}

// A filesystem PVC on rbd-fuse (XFS: see the StorageClass): bound, written
// and read by a pod, expanded online (the pod sees the new size), deleted with
// its image.
func TestFilesystemVolume(t *testing.T) {
	ctx := testCtx(t, 10*time.Minute)
	ns := makeNamespace(t, "e2e-fs")
	if _, err := client.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvcOf(scXFS, "data", "512Mi", corev1.PersistentVolumeFilesystem), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pvName, image := boundImage(ctx, t, ns, "data")
	pod := appPod("app", pvcVolume("data"), []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}, nil)
	if _, err := client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(ctx, t, ns, "app")
	if _, err := execIn(ctx, ns, "app", "sh", "-c", "dd if=/dev/urandom of=/data/blob bs=1M count=8 status=none && sha256sum /data/blob > /data/blob.sum && sync"); err != nil {
		t.Fatal(err)
	}
	if out, err := execIn(ctx, ns, "app", "sh", "-c", "cd /data && sha256sum -c blob.sum"); err != nil || !strings.Contains(out, "blob: OK") {
		t.Fatalf("read back: %q %v", out, err)
	}
	before := dfKB(ctx, t, ns, "app", "/data")

	// Online expansion: csi-resizer, ControllerExpandVolume, then kubelet's
	// NodeExpandVolume while the pod runs.
	start := time.Now()
	patch := []byte(`{"spec":{"resources":{"requests":{"storage":"768Mi"}}}}`)
	if _, err := client.CoreV1().PersistentVolumeClaims(ns).Patch(ctx, "data", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	var after int64
	err := poll(ctx, 3*time.Minute, func() (bool, error) {
		after = dfKB(ctx, t, ns, "app", "/data")
		return after > before+200*1024, nil
	})
	if err != nil {
		t.Fatalf("the pod still sees %d KiB (was %d) after expanding to 768Mi: %v", after, before, err)
	}
	c, err := client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, "data", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("expanded online in %s: the pod sees %d KiB (was %d); PVC capacity %s", time.Since(start).Round(100*time.Millisecond),
		after, before, c.Status.Capacity.Storage())
	if out, err := execIn(ctx, ns, "app", "sh", "-c", "cd /data && sha256sum -c blob.sum"); err != nil || !strings.Contains(out, "blob: OK") {
		t.Fatalf("data after expansion: %q %v", out, err)
	}
	deleteAndCheckGone(ctx, t, ns, "app", "data", pvName, image)
}

func dfKB(ctx context.Context, t *testing.T, ns, pod, path string) int64 {
	t.Helper()
	out, err := execIn(ctx, ns, pod, "df", "-k", "--output=size", path)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(out)
	n, err := strconv.ParseInt(f[len(f)-1], 10, 64)
	if err != nil {
		t.Fatalf("df output %q", out)
	}
	return n
}

// A block PVC used as a raw device by a pod, deleted with its image.
func TestBlockVolume(t *testing.T) {
	ctx := testCtx(t, 10*time.Minute)
	ns := makeNamespace(t, "e2e-block")
	if _, err := client.CoreV1().PersistentVolumeClaims(ns).Create(ctx, pvc("raw", "32Mi", corev1.PersistentVolumeBlock), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pvName, image := boundImage(ctx, t, ns, "raw")
	pod := appPod("app", []corev1.Volume{{Name: "raw", VolumeSource: corev1.VolumeSource{
		PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "raw"}}}},
		nil, []corev1.VolumeDevice{{Name: "raw", DevicePath: "/dev/xvda"}})
	if _, err := client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPodRunning(ctx, t, ns, "app")
	out, err := execIn(ctx, ns, "app", "sh", "-c",
		"blockdev --getsize64 /dev/xvda && head -c 1048576 /dev/urandom > /tmp/x && dd if=/tmp/x of=/dev/xvda bs=1M seek=3 conv=fsync status=none && "+
			"dd if=/dev/xvda bs=1M skip=3 count=1 status=none | cmp - /tmp/x && echo same")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(out)
	if len(lines) != 2 || lines[0] != strconv.Itoa(32<<20) || lines[1] != "same" {
		t.Fatalf("raw device: %q (want size %d, then the written MiB read back)", out, 32<<20)
	}
	deleteAndCheckGone(ctx, t, ns, "app", "raw", pvName, image)
}
