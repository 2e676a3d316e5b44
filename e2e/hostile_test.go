package e2e

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/google/uuid"
	zmq "github.com/pebbe/zmq4"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// podEventsReq is a NodePublishVolume of the events volume for a pod.
func podEventsReq(target, ns, podUID string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{VolumeId: "csi-" + uuid.NewString()[:8], TargetPath: target, VolumeCapability: mountCap("", rwo),
		VolumeContext: map[string]string{"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "app",
			"csi.storage.k8s.io/pod.namespace": ns, "csi.storage.k8s.io/pod.uid": podUID, "scope": "namespace"}}
}

// podTargetN is the target of a pod's n-th events volume.
func podTargetN(root, podUID string, n int) string {
	return filepath.Join(root, "var/lib/kubelet/pods", podUID, fmt.Sprintf("volumes/kubernetes.io~csi/events-%d/mount", n))
}

// shortDir opens a long directory path and returns a short path to it.
func shortDir(t *testing.T, dir string) string {
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return fmt.Sprintf("/proc/self/fd/%d", f.Fd())
}

// The events volume: bad requests are refused precisely; the pod's
// directory is mounted read-only from a directory only root can write, and
// a client still connects to its sockets.
func TestPodEventsVolumeChecks(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil)
	target, uid := podTarget(t)
	for name, tc := range map[string]struct {
		mut  func(*csi.NodePublishVolumeRequest)
		want string
	}{
		"fsType":             {func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability = mountCap("ext4", rwo) }, "fsGroupPolicy: None"},
		"volume_mount_group": {func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().VolumeMountGroup = "1000" }, "fsGroupPolicy: None"},
		"UID not the target's": {func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext["csi.storage.k8s.io/pod.uid"] = uuid.NewString()
		}, "not the one in the target path"},
		"no pod name": {func(r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, "csi.storage.k8s.io/pod.name") }, "needs podInfoOnMount: true"},
	} {
		req := podEventsReq(target, "team-a", uid)
		tc.mut(req)
		_, err := d.podEvents.NodePublishVolume(ctx(t), req)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want InvalidArgument saying %q", name, err, tc.want)
		}
	}
	if _, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(target, "team-a", uid)); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "planted"), nil, 0o644); !errorsIs(err, syscall.EROFS) {
		t.Errorf("creating a file through the pod's target: %v, want EROFS", err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(target, &st); err != nil || st.Uid != 0 || st.Mode&0o777 != 0o755 {
		t.Errorf("the pod's socket directory: uid %d mode %o (%v), want root's, 0755", st.Uid, st.Mode&0o777, err)
	}
	if fi, err := os.Stat(filepath.Join(target, "control.sock")); err != nil || fi.Mode().Perm() != 0o666 {
		t.Errorf("control.sock: %v %v, want mode 0666", fi.Mode(), err)
	}
	if _, _, err := podClient(t, target).Replay(0, 1); err != nil {
		t.Errorf("replay through the read-only mount: %v", err)
	}
	if _, err := d.podEvents.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: "x", TargetPath: target}); err != nil {
		t.Fatal(err)
	}
}

func errorsIs(err error, errno syscall.Errno) bool {
	var pe *os.PathError
	if e, ok := err.(*os.PathError); ok {
		pe = e
	}
	return pe != nil && pe.Err == errno
}

// With an API server (--kubeconfig), a pod is verified before it is served.
func TestPodEventsVerifiedWithAPIServer(t *testing.T) {
	uid := uuid.NewString()
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v1/namespaces/team-a/pods/app" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}`)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"kind":"Pod","apiVersion":"v1","metadata":{"name":"app","namespace":"team-a","uid":%q},"spec":{"nodeName":"e2e-node"}}`, uid)
	}))
	defer api.Close()
	dir := newDriverDir(t)
	kc := filepath.Join(dir, "kubeconfig")
	os.WriteFile(kc, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: %q}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`, api.URL)), 0o600)
	d := startDriver(t, dir, nil, "--kubeconfig", kc)
	root := t.TempDir()
	if _, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(podTargetN(root, uid, 0), "team-a", uid)); err != nil {
		t.Fatalf("the pod the API server knows: %v", err)
	}
	other := uuid.NewString()
	if _, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(podTargetN(root, other, 0), "team-a", other)); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "has UID "+uid) {
		t.Errorf("a spoofed UID: %v, want PermissionDenied", err)
	}
	if _, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(podTargetN(root, other, 1), "team-b", other)); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a pod the API server does not know: %v, want PermissionDenied", err)
	}
	api.Close()
	if _, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(podTargetN(root, uid, 1), "team-a", uid)); status.Code(err) != codes.Unavailable {
		t.Errorf("API server down: %v, want Unavailable", err)
	}
	d.podEvents.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: "x", TargetPath: podTargetN(root, uid, 0)})
}

// Per-node cap: past --events-max-endpoints, NodePublishVolume says so.
func TestPodEventsNodeCap(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil, "--events-max-endpoints", "2")
	root := t.TempDir()
	var targets []string
	t.Cleanup(func() { unpublishPodEvents(t, d, targets) })
	for i := 0; i < 3; i++ {
		uid := uuid.NewString()
		target := podTargetN(root, uid, 0)
		_, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(target, "a", uid))
		if i < 2 && err != nil {
			t.Fatalf("pod %d: %v", i, err)
		}
		if i == 2 && (status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--events-max-endpoints")) {
			t.Fatalf("pod 3 of a 2-endpoint node: %v, want ResourceExhausted naming --events-max-endpoints", err)
		}
		targets = append(targets, target)
	}
	d.podEvents.NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: "x", TargetPath: targets[0]})
	if _, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(targets[2], "a", filepath.Base(filepath.Dir(filepath.Dir(filepath.Dir(filepath.Dir(targets[2]))))))); err != nil {
		t.Fatalf("after an unpublish: %v", err)
	}
}

// vmRSS is a process's resident set in bytes.
func vmRSS(t *testing.T, pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			var kb int64
			fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb)
			return kb << 10
		}
	}
	return 0
}

// streamMultipart connects to a ZeroMQ ipc socket as a DEALER speaking ZMTP
// 3.0 itself and sends one multipart message of total bytes that never ends
// (every frame has MORE set), from one reused buffer.
func streamMultipart(path string, total int64) error {
	c, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	defer c.Close()
	greeting := make([]byte, 64)
	greeting[0], greeting[9], greeting[10] = 0xff, 0x7f, 3
	copy(greeting[12:], "NULL")
	if _, err := c.Write(greeting); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, make([]byte, 64)); err != nil {
		return err
	}
	ready := append([]byte{5}, "READY"...)
	ready = append(append(ready, 11), "Socket-Type"...)
	ready = append(binary.BigEndian.AppendUint32(ready, 6), "DEALER"...)
	if _, err := c.Write(append([]byte{0x04, byte(len(ready))}, ready...)); err != nil {
		return err
	}
	go io.Copy(io.Discard, c)
	frame := make([]byte, 64<<10)
	head := binary.BigEndian.AppendUint64([]byte{0x03}, uint64(len(frame))) // MORE | LONG
	for sent := int64(0); sent < total; sent += int64(len(frame)) {
		if _, err := c.Write(append(head, frame...)); err != nil {
			return err
		}
	}
	return nil
}

// The hostile pod of issue 10: 400 events volumes in one pod spec, 10,000
// subscriptions, 1,000 concurrent replays and a flush loop on its endpoint.
// Meanwhile another pod's endpoint and the node-wide endpoint keep
// delivering live events and answering replays, the node plugin's RSS stays
// bounded, and it never exits.
func TestHostilePod(t *testing.T) {
	dir := newDriverDir(t)
	d := startDriver(t, dir, nil)
	prefix := uniquePrefix(t)
	root := t.TempDir()

	// 400 events volumes in one pod: the first 4 (--events-max-pod-endpoints)
	// are served, the rest refused naming the flag; another pod still gets one.
	hostileUID := uuid.NewString()
	served := 0
	var hostileTargets []string
	t.Cleanup(func() { unpublishPodEvents(t, d, hostileTargets) })
	for i := 0; i < 400; i++ {
		target := podTargetN(root, hostileUID, i)
		_, err := d.podEvents.NodePublishVolume(ctx(t), podEventsReq(target, "hostile", hostileUID))
		switch {
		case err == nil:
			served++
			hostileTargets = append(hostileTargets, target)
		case status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--events-max-pod-endpoints"):
			t.Fatalf("events volume %d of one pod: %v, want ResourceExhausted naming --events-max-pod-endpoints", i, err)
		}
	}
	if served != 4 {
		t.Fatalf("%d of 400 events volumes of one pod served, want 4", served)
	}
	otherTarget, otherUID := podTarget(t)
	publishPodEvents(t, d, otherTarget, "team-o", otherUID, "namespace")
	t.Cleanup(func() { unpublishPodEvents(t, d, []string{otherTarget}) })

	other := stagePVC(t, d, prefix, "team-o", "data", otherUID)
	mine := stagePVC(t, d, prefix, "hostile", "data", hostileUID)
	defer unpublishUnstageDelete(t, d, other)
	defer unpublishUnstageDelete(t, d, mine)
	// Let the fresh ext4 of the hostile pod's volume finish writing after its
	// mount (lazy inode table init, one block group at a time): its flushes
	// then find nothing written. Settled: the same ack for 5 s.
	settled, same := uint64(0), 0
	for deadline := time.Now().Add(90 * time.Second); same < 17; time.Sleep(300 * time.Millisecond) {
		seq, _, err := eventsClient(t, dir).Flush(mine.id, "", "")
		if err != nil || time.Now().After(deadline) {
			t.Fatalf("the idle volume's flushes never settled: seq %d, %v", seq, err)
		}
		if seq == settled {
			same++
		} else {
			settled, same = seq, 0
		}
	}
	nodeRec := record(t, dir, 0)
	otherRec := recordFrom(t, podClient(t, otherTarget), 0)
	baseline := vmRSS(t, d.cmd.Process.Pid)

	hostile := shortDir(t, hostileTargets[0])
	zctx, _ := zmq.NewContext()
	zctx.SetMaxSockets(4000)
	defer zctx.Term()
	var stop atomic.Bool
	var wg sync.WaitGroup
	var busy, answered atomic.Int64

	// 10,000 subscriptions.
	sub, _ := zctx.NewSocket(zmq.SUB)
	sub.SetLinger(0)
	sub.SetSndhwm(0) // every subscription reaches the node plugin
	sub.Connect("ipc://" + hostile + "/events.sock")
	defer sub.Close()
	for i := 0; i < 10000; i++ {
		sub.SetSubscribe(fmt.Sprintf("attach/hostile/%05d-%s", i, strings.Repeat("x", 200)))
	}
	// A well-behaved subscriber on the same endpoint, after them: its
	// subscription applies (the cap is per connection).
	good, _ := zctx.NewSocket(zmq.SUB)
	good.SetLinger(0)
	good.SetSubscribe("ack/hostile/")
	good.Connect("ipc://" + hostile + "/events.sock")
	defer good.Close()
	// 1,000 concurrent replays, again and again.
	var dealers []*zmq.Socket
	for i := 0; i < 1000; i++ {
		s, err := zctx.NewSocket(zmq.DEALER)
		if err != nil {
			t.Fatal(err)
		}
		s.SetLinger(0)
		s.Connect("ipc://" + hostile + "/control.sock")
		dealers = append(dealers, s)
	}
	closeDealers := sync.OnceFunc(func() {
		for _, s := range dealers {
			s.Close()
		}
	})
	defer closeDealers()
	wg.Add(1)
	go func() { // one goroutine owns all the dealers
		defer wg.Done()
		poller := zmq.NewPoller()
		for _, s := range dealers {
			poller.Add(s, zmq.POLLIN)
		}
		for !stop.Load() {
			for _, s := range dealers {
				s.SendMessage("", `{"op":"replay","since":0}`)
			}
			deadline := time.Now().Add(3 * time.Second)
			for n := 0; n < len(dealers) && time.Now().Before(deadline); {
				ready, _ := poller.Poll(100 * time.Millisecond)
				for _, p := range ready {
					for {
						f, err := p.Socket.RecvMessage(zmq.DONTWAIT)
						if err != nil {
							break
						}
						n++
						if strings.Contains(f[len(f)-1], `"busy"`) {
							busy.Add(1)
						} else {
							answered.Add(1)
						}
					}
				}
			}
		}
	}()
	// A flush loop: its own volume (idle: no new ack) and another namespace's.
	var flushes atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, _ := zmqbridge.Dial("ipc://unused", "ipc://"+shortDir(t, hostileTargets[1])+"/control.sock")
		defer c.Close()
		c.Timeout = 5 * time.Second
		for !stop.Load() {
			c.Flush(mine.id, "", "")
			c.Flush(other.id, "", "")
			flushes.Add(2)
		}
	}()

	// Meanwhile: live events and replays elsewhere, RSS bounded.
	ocli := podClient(t, otherTarget)
	ncli := eventsClient(t, dir)
	var peak int64
	start := time.Now()
	for i := 0; time.Since(start) < 20*time.Second; i++ {
		if err := os.WriteFile(filepath.Join(other.target, "f"), []byte(fmt.Sprint(i)), 0o644); err != nil {
			t.Fatal(err)
		}
		seq, _, err := ocli.Flush(other.id, "", "")
		if err != nil {
			t.Fatalf("the other pod's flush under attack: %v", err)
		}
		for _, r := range []*recorder{nodeRec, otherRec} {
			waitSeq(t, r, seq)
		}
		for name, c := range map[string]*zmqbridge.Client{"other pod": ocli, "node": ncli} {
			if _, _, err := c.Replay(seq-1, 1); err != nil {
				t.Fatalf("%s replay under attack: %v", name, err)
			}
		}
		peak = max(peak, vmRSS(t, d.cmd.Process.Pid)-baseline)
	}
	stop.Store(true)
	wg.Wait()
	closeDealers() // the hostile connections go: the next one is let in
	t.Logf("under attack for 20s: %d replays busy, %d answered, %d hostile flushes; RSS growth peak %d MiB",
		busy.Load(), answered.Load(), flushes.Load(), peak>>20)
	if peak > 256<<20 {
		t.Errorf("node plugin RSS grew %d MiB under attack", peak>>20)
	}
	if busy.Load() == 0 {
		t.Errorf("no replay was refused busy: the queue is not bounded")
	}
	var acks []uint64
	for _, ev := range nodeRec.snapshot() {
		if ev.Kind == "ack" && ev.VolumeID == mine.id && ev.Seq > settled {
			acks = append(acks, ev.Seq)
		}
	}
	// Without the check every flush journals an ack. With it, an idle
	// volume's flush journals none; the few seen under this load come from
	// ext4's own background writes to the fresh file system.
	t.Logf("%d flushes of the hostile pod's idle volume journaled acks %v", flushes.Load()/2, acks)
	if int64(len(acks))*10 > flushes.Load()/2 {
		t.Errorf("%d flushes of an idle volume journaled %d acks, want fewer than 1 in 10", flushes.Load()/2, len(acks))
	}

	// The hostile pod's own well-behaved subscriber, on the endpoint
	// holding the 10,000 subscriptions, gets its live events.
	if err := os.WriteFile(filepath.Join(mine.target, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	ack, _, err := ncli.Flush(mine.id, "", "")
	if err != nil {
		t.Fatal(err)
	}
	good.SetRcvtimeo(5 * time.Second)
	for {
		f, err := good.RecvMessage(0)
		if err != nil {
			t.Fatalf("a well-behaved subscriber on the endpoint with 10,000 hostile subscriptions did not get ack %d: %v", ack, err)
		}
		var ev zmqbridge.Event
		if json.Unmarshal([]byte(f[len(f)-1]), &ev) == nil && ev.Seq >= ack {
			break
		}
	}

	// A 1 GiB multipart message, streamed raw (libzmq itself would keep an
	// unfinished multipart message whole): the relay in front of the pod's
	// sockets cuts it at its third frame.
	time.Sleep(500 * time.Millisecond)
	before := vmRSS(t, d.cmd.Process.Pid)
	errc := make(chan error, 1)
	go func() { errc <- streamMultipart(hostile+"/control.sock", 1<<30) }()
	var streamErr error
	for done := false; !done; {
		select {
		case streamErr = <-errc:
			done = true
		case <-time.After(500 * time.Millisecond):
		}
		if _, _, err := ncli.Replay(0, 1); err != nil {
			t.Fatalf("node replay during the 1 GiB message: %v", err)
		}
	}
	grown := vmRSS(t, d.cmd.Process.Pid) - before
	t.Logf("a raw 1 GiB unfinished multipart message: %v; RSS growth %d MiB", streamErr, grown>>20)
	if streamErr == nil || !strings.Contains(streamErr.Error(), "write") || grown > 64<<20 {
		t.Errorf("a raw 1 GiB multipart message: %v, RSS +%d MiB; want the connection cut early", streamErr, grown>>20)
	}
	if !d.alive() {
		t.Fatalf("the node plugin exited:\n%s", tail(d.log, 20))
	}
}

// unpublishPodEvents unpublishes events volumes (a test's cleanup).
func unpublishPodEvents(t *testing.T, d *driver, targets []string) {
	for _, tgt := range targets {
		if _, err := d.podEvents.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "x", TargetPath: tgt}); err != nil {
			t.Errorf("unpublishing %s: %v", tgt, err)
		}
	}
}

// waitSeq waits until r has the event seq.
func waitSeq(t *testing.T, r *recorder, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, ev := range r.snapshot() {
			if ev.Seq == seq {
				return
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("event %d not delivered within 10s under attack", seq)
}
