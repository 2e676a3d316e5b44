package k8s

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// Upstream test selections (ROOKZMQ_UPSTREAM): which of Kubernetes' External
// Storage specs run against rbd.rookzmq.io, besides what the driver file
// (upstream/rbd.rookzmq.io.yaml) declares unsupported, which skip.
var upstreamFocus = map[string]string{
	// make test: the patterns the issue names, in the time make test has.
	"quick": `External.Storage \[Driver: rbd\.rookzmq\.io\].*\] (provisioning|volumes|volumeMode|volume-expand|volumeIO) `,
	// make e2e-upstream: every External Storage spec of the driver.
	"all": `External.Storage \[Driver: rbd\.rookzmq\.io\]`,
}

// upstreamSkip is left out of every selection, with the reason:
//   - [Disruptive]: restarts kubelet or the node, or kills the driver, in
//     ways that assume a node-driver-registrar sidecar and ssh to the node
//     (our own suite covers kubelet and plugin restarts);
//   - [Serial]: expects the whole cluster to itself (volume limits, stress);
//   - [Feature:...]: features the driver lacks (snapshots, group snapshots,
//     VolumeAttributesClass modification) or alpha gates the cluster lacks.
const upstreamSkip = `\[Disruptive\]|\[Serial\]|\[Feature:`

// upstreamResult is what one e2e.test run did with the specs its focus
// selects: passed, failed, skipped at run time (a capability the driver file
// declares false, or a second node the cluster lacks), or excluded by the
// skip list.
type upstreamResult struct {
	passed, failed, skipped, excluded int
	failures                          []string
	skipReasons                       map[string]int
	took                              time.Duration
}

// Kubernetes' own External Storage tests (e2e.test from k8s.io/kubernetes at
// the cluster's version) against the installed driver: zero failures for
// what the driver file declares. Runs when ROOKZMQ_E2E_TEST names the binary
// (make k8s-e2e, make e2e-upstream); ROOKZMQ_UPSTREAM picks the selection.
func TestUpstreamStorage(t *testing.T) {
	bin := os.Getenv("ROOKZMQ_E2E_TEST")
	if bin == "" {
		t.Skip("ROOKZMQ_E2E_TEST is not set (make k8s-e2e and make e2e-upstream set it)")
	}
	sel := os.Getenv("ROOKZMQ_UPSTREAM")
	if sel == "" {
		sel = "quick"
	}
	focus, ok := upstreamFocus[sel]
	if !ok {
		t.Fatalf("ROOKZMQ_UPSTREAM=%s: want quick or all", sel)
	}
	skip := upstreamSkip
	if m := os.Getenv("E2E_CLUSTER"); m == "" || m == "local" {
		// The node is this machine. Some specs check the node's mounts from a
		// "hostexec" pod that enters PID 1's mount namespace with nsenter; the
		// CI machine's PID 1 (a sandbox supervisor) refuses that even to root.
		if _, err := os.Readlink("/proc/1/ns/mnt"); err != nil {
			t.Logf("skipping the specs that enter PID 1's mount namespace (this machine refuses it: %v)", err)
			skip += `|should not mount / map unused volumes in a pod`
		}
	}
	r := runUpstream(t, bin, focus, skip)
	for reason, n := range r.skipReasons {
		t.Logf("skipped at run time (%d): %s", n, reason)
	}
	t.Logf("k8s-e2e: upstream External Storage (%s): %d passed, %d failed, %d skipped at run time, %d excluded by the skip list, in %s",
		sel, r.passed, r.failed, r.skipped, r.excluded, r.took.Round(time.Second))
	if r.failed > 0 {
		t.Fatalf("upstream specs failed (log /tmp/rookzmq-upstream-e2e.log):\n  %s", strings.Join(r.failures, "\n  "))
	}
	if r.passed == 0 {
		t.Fatal("no upstream spec passed: the selection ran nothing")
	}
}

// runUpstream runs e2e.test with the driver file and reads its JSON report.
func runUpstream(t *testing.T, bin, focus, skip string) upstreamResult {
	t.Helper()
	dir := t.TempDir()
	report := filepath.Join(dir, "report.json")
	args := []string{
		"-kubeconfig=" + os.Getenv("KUBECONFIG"),
		"-storage.testdriver=" + filepath.Join(root, "e2e/k8s/upstream/rbd.rookzmq.io.yaml"),
		"-ginkgo.focus=" + focus, "-ginkgo.skip=" + skip,
		"-ginkgo.no-color", "-ginkgo.timeout=55m",
		"-ginkgo.json-report=" + report,
		"-report-dir=" + dir,
	}
	logPath := "/tmp/rookzmq-upstream-e2e.log"
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "KUBE_TEST_REPO_LIST="+filepath.Join(root, "e2e/k8s/upstream/repo-list.yaml"))
	cmd.Stdout, cmd.Stderr = logFile, logFile
	start := time.Now()
	runErr := cmd.Run()
	r := upstreamResult{took: time.Since(start), skipReasons: map[string]int{}}
	focusRe, skipRe := regexp.MustCompile(focus), regexp.MustCompile(skip)
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("e2e.test wrote no report (%v; exit: %v); its log, %s:\n%s", err, runErr, logPath, tailFile(logPath, 40))
	}
	var reports []struct {
		SpecReports []struct {
			LeafNodeType            string
			LeafNodeText            string
			ContainerHierarchyTexts []string
			State                   string
			Failure                 struct{ Message string }
		}
	}
	if err := json.Unmarshal(b, &reports); err != nil {
		t.Fatalf("e2e.test report %s: %v", report, err)
	}
	for _, rep := range reports {
		for _, s := range rep.SpecReports {
			if s.LeafNodeType != "It" {
				if s.State != "passed" && s.State != "skipped" {
					r.failed++
					r.failures = append(r.failures, fmt.Sprintf("%s %s: %s", s.LeafNodeType, s.State, firstLine(s.Failure.Message)))
				}
				continue
			}
			name := strings.Join(append(s.ContainerHierarchyTexts, s.LeafNodeText), " ")
			if !focusRe.MatchString(name) {
				continue
			}
			switch {
			case skipRe.MatchString(name):
				r.excluded++
			case s.State == "passed":
				r.passed++
			case s.State == "skipped":
				r.skipped++
				r.skipReasons[skipReason(s.Failure.Message)]++
			default:
				r.failed++
				r.failures = append(r.failures, fmt.Sprintf("%s: %s: %s", name, s.State, firstLine(s.Failure.Message)))
			}
		}
	}
	if runErr != nil && r.failed == 0 {
		t.Fatalf("e2e.test failed (%v) with no failed spec; its log, %s:\n%s", runErr, logPath, tailFile(logPath, 40))
	}
	return r
}

// skipReason shortens a skip message to its kind (names of generated
// objects left out), to count skips by reason.
func skipReason(msg string) string {
	l := firstLine(msg)
	l = regexp.MustCompile(`"[^"]*"`).ReplaceAllString(l, `"…"`)
	return l
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	if len(l) > 300 {
		l = l[:300] + "..."
	}
	return l
}

func tailFile(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}
