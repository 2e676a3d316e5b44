// Package k8s is rookzmq's end-to-end suite on a real Kubernetes cluster: it
// installs charts/rookzmq with helm and drives volumes through kubelet, the
// sidecars and the driver against the throwaway Ceph cluster.
//
// E2E_CLUSTER=local (default) brings up e2e/k8s/cluster.sh and imports the
// images; E2E_CLUSTER=kind creates a kind cluster and loads them (needs
// Docker; not run in CI); E2E_CLUSTER=existing uses $KUBECONFIG as it is.
package k8s

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fsadmin "github.com/ceph/go-ceph/cephfs/admin"
	"github.com/ceph/go-ceph/rados"
	"github.com/ceph/go-ceph/rbd"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/remotecommand"
)

const (
	namespace   = "rookzmq-e2e"
	release     = "rookzmq"
	scFS        = "rookzmq-e2e-fuse"
	scXFS       = "rookzmq-e2e-fuse-xfs"
	namePrefix  = "k8se2e-"
	secretName  = "rookzmq-e2e-ceph"
	provisioner = "rbd.rookzmq.io"
	// The CephFS driver, its StorageClass (ceph-fuse) and Secret.
	cephfsDriver     = "cephfs.rookzmq.io"
	scCephFS         = "rookzmq-e2e-cephfs"
	cephfsSecretName = "rookzmq-e2e-cephfs"
)

var (
	root       string // repository root
	client     *kubernetes.Clientset
	restConfig *rest.Config
	cephEnv    = map[string]string{}
	pool       *rados.IOContext
	fsAdmin    *fsadmin.FSAdmin // CephFS subvolumes, through the mgr
	appImage   string           // the rookzmq image doubles as the app image (sh, dd, blockdev)
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

// logf prefixes every line, so that multi-line output (diagnostics) passes
// the Makefile's filter on "k8s-e2e:".
func logf(format string, args ...any) {
	now := time.Now().Format("15:04:05")
	for _, line := range strings.Split(strings.TrimRight(fmt.Sprintf(format, args...), "\n"), "\n") {
		fmt.Fprintf(os.Stderr, "[%s] k8s-e2e: %s\n", now, line)
	}
}

func run(m *testing.M) int {
	var err error
	root, err = filepath.Abs("../..")
	if err != nil {
		return fail(err)
	}
	if err := loadCephEnv(); err != nil {
		return fail(err)
	}
	tag := os.Getenv("ROOKZMQ_IMAGE_TAG")
	if tag == "" {
		return fail(fmt.Errorf("ROOKZMQ_IMAGE_TAG is not set (make k8s-e2e sets it)"))
	}
	appImage = "rookzmq:" + tag
	start := time.Now()
	if err := bringUp(); err != nil {
		return fail(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", os.Getenv("KUBECONFIG"))
	if err != nil {
		return fail(err)
	}
	restConfig = cfg
	if client, err = kubernetes.NewForConfig(cfg); err != nil {
		return fail(err)
	}
	if err := connectCeph(); err != nil {
		return fail(err)
	}
	if err := installChart(tag); err != nil {
		return fail(err)
	}
	if err := clearLeftovers(); err != nil {
		return fail(err)
	}
	logf("cluster, images and chart ready in %s", time.Since(start).Round(100*time.Millisecond))
	code := m.Run()
	if code == 0 {
		if err := checkNoOrphans(); err != nil {
			logf("ERROR: %v", err)
			code = 1
		}
	}
	if code != 0 {
		dumpDiagnostics()
	}
	if os.Getenv("ROOKZMQ_K8S_KEEP") == "" {
		uninstallChart()
	}
	return code
}

func fail(err error) int {
	logf("ERROR: %v", err)
	return 1
}

func sh(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Dir = root
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out.String())
	}
	return out.String(), nil
}

// exportsInto runs script env and keeps its exports.
func exportsInto(dst map[string]string, script string) error {
	out, err := sh("bash", "-c", `eval "$(`+script+` env)" && env`)
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			dst[k] = v
		}
	}
	return nil
}

func loadCephEnv() error {
	if err := exportsInto(cephEnv, "e2e/ceph/cluster.sh"); err != nil {
		return fmt.Errorf("the Ceph cluster is not up (make cluster-up): %w", err)
	}
	return nil
}

// bringUp makes the cluster E2E_CLUSTER names reachable through $KUBECONFIG
// with the images loaded.
func bringUp() error {
	images := []string{"bin/rookzmq-image.tar", "bin/csi-provisioner-image.tar", "bin/csi-resizer-image.tar"}
	if os.Getenv("ROOKZMQ_E2E_TEST") != "" {
		// What Kubernetes' storage tests start (e2e/image/build.sh e2e-images).
		images = append(images, "bin/e2e-busybox-image.tar", "bin/e2e-agnhost-image.tar", "bin/e2e-nginx-image.tar")
	}
	switch mode := os.Getenv("E2E_CLUSTER"); mode {
	case "", "local":
		if _, err := sh("e2e/k8s/cluster.sh", "up"); err != nil {
			return err
		}
		k8sEnv := map[string]string{}
		if err := exportsInto(k8sEnv, "e2e/k8s/cluster.sh"); err != nil {
			return err
		}
		os.Setenv("KUBECONFIG", k8sEnv["KUBECONFIG"])
		os.Setenv("PATH", k8sEnv["PATH"])
		if _, err := sh("e2e/k8s/cluster.sh", append([]string{"import"}, images...)...); err != nil {
			return err
		}
	case "kind":
		// For users with Docker: the same suite on a kind cluster.
		if out, _ := sh("kind", "get", "clusters"); !strings.Contains(out, "rookzmq-e2e") {
			if _, err := sh("kind", "create", "cluster", "--name", "rookzmq-e2e"); err != nil {
				return err
			}
		}
		for _, img := range images {
			if _, err := sh("kind", "load", "image-archive", "--name", "rookzmq-e2e", img); err != nil {
				return err
			}
		}
		kc := filepath.Join(os.TempDir(), "rookzmq-e2e-kind.kubeconfig")
		out, err := sh("kind", "get", "kubeconfig", "--name", "rookzmq-e2e")
		if err != nil {
			return err
		}
		if err := os.WriteFile(kc, []byte(out), 0o600); err != nil {
			return err
		}
		os.Setenv("KUBECONFIG", kc)
	case "existing":
	default:
		return fmt.Errorf("E2E_CLUSTER=%s: want local, kind or existing", mode)
	}
	return nil
}

func connectCeph() error {
	conn, err := rados.NewConnWithUser("admin")
	if err != nil {
		return err
	}
	conn.SetConfigOption("mon_host", cephEnv["ROOKZMQ_CEPH_MONITORS"])
	conn.SetConfigOption("key", cephEnv["ROOKZMQ_CEPH_ADMIN_KEY"])
	conn.SetConfigOption("admin_socket", "")
	if err := conn.Connect(); err != nil {
		return fmt.Errorf("admin connection to Ceph: %w", err)
	}
	fsAdmin = fsadmin.NewFromConn(conn)
	pool, err = conn.OpenIOContext(cephEnv["ROOKZMQ_CEPH_RBD_POOL"])
	return err
}

// installChart installs (or upgrades to) charts/rookzmq with the CI images,
// tagged tag, and the rbd-fuse StorageClasses, with extra helm arguments; it
// waits until the pods are ready and kubelet has registered both drivers.
func installChart(tag string, extra ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	if _, err := client.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{}); err != nil {
			return err
		}
	}
	secret := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: secretName, Namespace: namespace},
		StringData: map[string]string{"userID": cephEnv["ROOKZMQ_CEPH_RBD_USER"], "userKey": cephEnv["ROOKZMQ_CEPH_RBD_KEY"]},
	}
	// Update one an earlier run left: the Ceph cluster (and its keys) may
	// have been made anew since.
	// The CephFS user provisions and mounts (ceph-csi's secret keys).
	fsUser, fsKey := cephEnv["ROOKZMQ_CEPH_CEPHFS_USER"], cephEnv["ROOKZMQ_CEPH_CEPHFS_KEY"]
	fsSecret := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: cephfsSecretName, Namespace: namespace},
		StringData: map[string]string{"adminID": fsUser, "adminKey": fsKey, "userID": fsUser, "userKey": fsKey},
	}
	for _, sec := range []*corev1.Secret{secret, fsSecret} {
		_, err := client.CoreV1().Secrets(namespace).Create(ctx, sec, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			_, err = client.CoreV1().Secrets(namespace).Update(ctx, sec, metav1.UpdateOptions{})
		}
		if err != nil {
			return fmt.Errorf("writing secret %s: %w", sec.Name, err)
		}
	}
	values := filepath.Join(os.TempDir(), "rookzmq-e2e-values.yaml")
	v := fmt.Sprintf(`image: {repository: rookzmq, tag: %q, pullPolicy: Never}
kubernetesAPI: {host: "127.0.0.1", port: "6443"}
logLevel: 4
clusters:
  - {clusterID: e2e, monitors: [%q], rbd: {radosNamespace: ""}, cephFS: {subvolumeGroup: %q}}
storageClasses:
  - {name: %s, clusterID: e2e, pool: %q, mounter: rbd-fuse, secretName: %s,
     parameters: {volumeNamePrefix: %q}}
  # Online growth of ext4 needs CAP_SYS_RESOURCE, which root lacks on the CI
  # machine (the driver says so with FailedPrecondition); XFS grows without it.
  - {name: %s, clusterID: e2e, pool: %q, mounter: rbd-fuse, fsType: xfs, secretName: %s,
     parameters: {volumeNamePrefix: %q}}
controller:
  # The API listens on loopback only, so the controller runs in the host
  # network; there every replica has the node's hostname, which the sidecars
  # use as leader-election identity: one replica per node.
  replicas: 1
  hostNetwork: true
  metrics: {enabled: false}
  provisioner: {image: "rookzmq.local/csi-provisioner:v6.3.0", pullPolicy: Never}
  resizer: {image: "rookzmq.local/csi-resizer:v2.3.0", pullPolicy: Never}
node:
  defaultMounter: rbd-fuse
  metrics: {host: 127.0.0.1, port: 19091, probeHost: 127.0.0.1}
cephfs:
  enabled: true
  controller: {metricsPort: 19093}
  node: {metricsPort: 19092}
  storageClasses:
    - {name: %s, clusterID: e2e, fsName: %q, mounter: fuse, secretName: %s,
       parameters: {volumeNamePrefix: %q}}
`, tag, cephEnv["ROOKZMQ_CEPH_MONITORS"], cephEnv["ROOKZMQ_CEPH_SUBVOLUMEGROUP"], scFS, cephEnv["ROOKZMQ_CEPH_RBD_POOL"], secretName, namePrefix,
		scXFS, cephEnv["ROOKZMQ_CEPH_RBD_POOL"], secretName, namePrefix,
		scCephFS, cephEnv["ROOKZMQ_CEPH_FS_NAME"], cephfsSecretName, namePrefix)
	if err := os.WriteFile(values, []byte(v), 0o600); err != nil {
		return err
	}
	if _, err := sh("helm", append([]string{"upgrade", "--install", release, "charts/rookzmq", "--namespace", namespace,
		"--values", values, "--wait", "--timeout", "3m"}, extra...)...); err != nil {
		return err
	}
	logf("helm install done in %s", time.Since(start).Round(100*time.Millisecond))
	// kubelet lists a driver in CSINode only after the node plugin registered it.
	return poll(ctx, 2*time.Minute, func() (bool, error) {
		nodes, err := client.StorageV1().CSINodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, n := range nodes.Items {
			got := map[string]bool{}
			for _, d := range n.Spec.Drivers {
				got[d.Name] = true
			}
			if !got[provisioner] || !got["events.rookzmq.io"] || !got[cephfsDriver] {
				return false, nil
			}
		}
		return len(nodes.Items) > 0, nil
	})
}

// checkNoOrphans waits until every PV is gone and then wants no RBD image
// or CephFS subvolume with the suite's prefix left: a second image made for one PVC
// (e.g. two provisioners acting at once) would remain there.
func checkNoOrphans() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var left, pvsLeft []string
	err := poll(ctx, 3*time.Minute, func() (bool, error) {
		var err error
		if _, pvsLeft, err = ourPVs(ctx); err != nil || len(pvsLeft) > 0 {
			return false, err
		}
		names, err := rbd.GetImageNames(pool)
		if err != nil {
			return false, err
		}
		left = left[:0]
		for _, n := range names {
			if strings.HasPrefix(n, namePrefix) {
				left = append(left, n)
			}
		}
		subs, err := suiteSubvolumes()
		if err != nil {
			return false, err
		}
		for n := range subs {
			left = append(left, "subvolume "+n)
		}
		return len(left) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("after the suite, PVs or images are left (PVs %v, images %v): %w", pvsLeft, left, err)
	}
	if m := os.Getenv("E2E_CLUSTER"); m == "" || m == "local" {
		// The node is this machine: no rbd-fuse of the suite's images may run.
		if pids := fuseDaemons(namePrefix); len(pids) > 0 {
			return fmt.Errorf("after the suite, rbd-fuse daemons of its images still run: pids %v", pids)
		}
	}
	return nil
}

func uninstallChart() {
	if out, err := sh("helm", "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "2m"); err != nil {
		logf("helm uninstall: %v %s", err, out)
	}
}

func dumpDiagnostics() {
	out, _ := sh("kubectl", "get", "pods,pvc,pv,csinode", "-A", "-o", "wide")
	logf("state at failure:\n%s", out)
	for _, c := range []string{"node", "node-cephfs"} {
		out, _ = sh("kubectl", "-n", namespace, "logs", "-l", "app.kubernetes.io/component="+c, "--tail", "40", "--all-containers")
		logf("%s plugin log tail:\n%s", c, clip(out))
	}
	out, _ = sh("kubectl", "-n", namespace, "logs", "-l", "app.kubernetes.io/component=controller", "--tail", "20", "-c", "rookzmq")
	logf("controller log tail:\n%s", clip(out))
}

// clip shortens each line to 300 bytes: sidecars log whole objects.
func clip(s string) string {
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		if len(l) > 300 {
			lines[i] = l[:300] + "..."
		}
	}
	return strings.Join(lines, "\n")
}

// poll calls f every 500ms until it returns true, an error, or d passes.
func poll(ctx context.Context, d time.Duration, f func() (bool, error)) error {
	deadline := time.Now().Add(d)
	for {
		ok, err := f()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s", d)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// execIn runs cmd in the pod's first container and returns its stdout.
func execIn(ctx context.Context, ns, pod string, cmd ...string) (string, error) {
	req := client.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Command: cmd, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ex, err := remotecommand.NewSPDYExecutor(restConfig, "POST", req.URL())
	if err != nil {
		return "", err
	}
	var stdout, stderr bytes.Buffer
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		return stdout.String(), fmt.Errorf("exec %v in %s/%s: %w (stderr: %s)", cmd, ns, pod, err, stderr.String())
	}
	return stdout.String(), nil
}

// rbdImages lists the pool's images with the suite's prefix.
func rbdImages(t *testing.T) map[string]bool {
	t.Helper()
	names, err := rbd.GetImageNames(pool)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, n := range names {
		if strings.HasPrefix(n, namePrefix) {
			m[n] = true
		}
	}
	return m
}
