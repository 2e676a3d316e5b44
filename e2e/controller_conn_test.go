package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ceph/go-ceph/rbd"
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// silentMon accepts TCP connections and never says a word, as a monitor host
// whose daemon hangs does; it returns its address.
func silentMon(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return l.Addr().String()
}

// closedPort is an address nothing listens on.
func closedPort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// With its monitors unreachable (a closed port; a host that accepts and never
// answers), every controller call answers Unavailable naming the monitors
// before its deadline, also a call that waits for a connection another call
// started.
func TestUnreachableMonitors(t *testing.T) {
	dir := t.TempDir()
	closed, silent := closedPort(t), silentMon(t)
	cfg := fmt.Sprintf(`[{"clusterID":"closed","monitors":[%q]},{"clusterID":"silent","monitors":[%q]}]`, closed, silent)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, cluster := range []string{"closed", "silent"} { // for GetCapacity and ListVolumes
		creds := filepath.Join(dir, "creds", cluster)
		os.MkdirAll(creds, 0o700)
		os.WriteFile(filepath.Join(creds, "userID"), []byte(env["ROOKZMQ_CEPH_RBD_USER"]), 0o600)
		os.WriteFile(filepath.Join(creds, "userKey"), []byte(env["ROOKZMQ_CEPH_RBD_KEY"]), 0o600)
	}
	d := startDriver(t, dir, nil, "--node=false", "--credentials-dir", filepath.Join(dir, "creds"))
	prefix := uniquePrefix(t)
	for cluster, mon := range map[string]string{"closed": closed, "silent": silent} {
		t.Run(cluster, func(t *testing.T) {
			calls := map[string]func(ctx context.Context) error{
				"CreateVolume": func(ctx context.Context) error {
					r := createReq(prefix+cluster, prefix, 64<<20)
					r.Parameters["clusterID"] = cluster
					_, err := d.ctrl.CreateVolume(ctx, r)
					return err
				},
				"DeleteVolume": func(ctx context.Context) error {
					id := fmt.Sprintf("1-%02x-%s-03-rbd-00--%svol", len(cluster), cluster, prefix)
					_, err := d.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id, Secrets: secrets()})
					return err
				},
				"ValidateVolumeCapabilities": func(ctx context.Context) error {
					id := fmt.Sprintf("1-%02x-%s-03-rbd-00--%svol", len(cluster), cluster, prefix)
					_, err := d.ctrl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: id,
						VolumeCapabilities: []*csi.VolumeCapability{mountCap("", rwo)}, Secrets: secrets()})
					return err
				},
				"GetCapacity": func(ctx context.Context) error {
					_, err := d.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"clusterID": cluster, "pool": "rbd"}})
					return err
				},
				"ControllerExpandVolume": func(ctx context.Context) error {
					id := fmt.Sprintf("1-%02x-%s-03-rbd-00--%svol", len(cluster), cluster, prefix)
					_, err := d.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
						CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, Secrets: secrets()})
					return err
				},
			}
			// The same calls twice at once: the second waits for the
			// connection the first started.
			var wg sync.WaitGroup
			for name, call := range calls {
				for i := 0; i < 2; i++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						deadline := 3*time.Second + time.Duration(i)*time.Second
						c, cancel := context.WithTimeout(context.Background(), deadline)
						defer cancel()
						start := time.Now()
						err := call(c)
						took := time.Since(start)
						if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), mon) {
							t.Errorf("%s #%d: %v after %s, want Unavailable naming monitor %s", name, i, err, took, mon)
						}
						if took >= deadline {
							t.Errorf("%s #%d answered after %s, its deadline was %s", name, i, took, deadline)
						}
					}()
				}
			}
			wg.Wait()
		})
	}
	c, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	_, err := d.ctrl.ListVolumes(c, &csi.ListVolumesRequest{})
	if took := time.Since(start); status.Code(err) != codes.Unavailable || took >= 3*time.Second ||
		!(strings.Contains(err.Error(), closed) || strings.Contains(err.Error(), silent)) {
		t.Errorf("ListVolumes: %v after %s, want Unavailable naming a monitor within 3s", err, took)
	}
	if !d.alive() {
		t.Fatal("the driver died")
	}
}

// A connection the cluster blocklisted (EBLOCKLISTED) is dropped from the
// cache: the next call connects again and succeeds.
func TestBlocklistedConnection(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil, "--node=false")
	c := ctx(t)
	prefix := uniquePrefix(t)
	r, err := d.ctrl.CreateVolume(c, createReq(prefix+"a", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	addr := clientAddr(t, d)
	monCommand(t, map[string]any{"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
	t.Cleanup(func() { monCommand(t, map[string]any{"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}) })

	// The first call may find the connection blocklisted (Unavailable); the
	// next one runs on a new connection.
	var ok bool
	var errs []error
	for i := 0; i < 3 && !ok; i++ {
		c5, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := d.ctrl.CreateVolume(c5, createReq(fmt.Sprintf("%sb%d", prefix, i), prefix, 64<<20))
		cancel()
		if err == nil {
			ok = true
		} else {
			errs = append(errs, err)
			if status.Code(err) != codes.Unavailable {
				t.Errorf("call %d on the blocklisted connection: %v, want Unavailable", i, err)
			}
		}
	}
	if !ok || len(errs) > 1 {
		t.Fatalf("after blocklisting the driver's client %s: %d failures before a success (%v), want at most 1", addr, len(errs), errs)
	}
	if newAddr := clientAddr(t, d); newAddr == addr {
		t.Errorf("the driver still uses client %s", addr)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		r, err := d.ctrl.CreateVolume(c, createReq(fmt.Sprintf("%sb%d", prefix, i), prefix, 64<<20))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: secrets()}); err != nil {
			t.Fatal(err)
		}
	}
	assertNoOrphans(t, prefix)
}

// A connection blocklisted while it holds the journal's reservation lock
// cannot unlock; the next CreateVolume, on a new connection, breaks that lock
// at once instead of failing with Aborted until the lock's TTL (30 s) ends.
func TestBlocklistedWhileHoldingReserveLock(t *testing.T) {
	d := startDriver(t, newDriverDir(t), []string{"ROOKZMQ_PAUSE_AT=create-reserve-locked"}, "--node=false")
	prefix := uniquePrefix(t)
	first := make(chan error, 1)
	go func() {
		c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := d.ctrl.CreateVolume(c, createReq(prefix+"a", prefix, 64<<20))
		first <- err
	}()
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(readFileString(d.log), `"pause point reached"`) {
		if time.Now().After(deadline) {
			t.Fatalf("the driver never paused holding the lock:\n%s", tail(d.log, 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
	addr := clientAddr(t, d)
	monCommand(t, map[string]any{"prefix": "osd blocklist", "blocklistop": "add", "addr": addr})
	t.Cleanup(func() { monCommand(t, map[string]any{"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr}) })
	if err := <-first; status.Code(err) != codes.Unavailable {
		t.Fatalf("CreateVolume whose connection was blocklisted holding the lock: %v, want Unavailable", err)
	}

	c, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	start := time.Now()
	r, err := d.ctrl.CreateVolume(c, createReq(prefix+"a", prefix, 64<<20))
	if err != nil {
		t.Fatalf("CreateVolume after the holder was blocklisted: %v after %s (the lock's TTL is 30 s)", err, time.Since(start))
	}
	t.Logf("the next CreateVolume took %s (incl. a 3s pause)", time.Since(start))
	if newAddr := clientAddr(t, d); newAddr == addr {
		t.Errorf("the driver still uses client %s", addr)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: secrets()}); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, prefix)
}

var clientAddrRE = regexp.MustCompile(`"connected to Ceph".* clientAddr="([^"]+)"`)

// clientAddr is the address of the driver's latest Ceph connection, from its log.
func clientAddr(t *testing.T, d *driver) string {
	t.Helper()
	b, err := os.ReadFile(d.log)
	if err != nil {
		t.Fatal(err)
	}
	m := clientAddrRE.FindAllStringSubmatch(string(b), -1)
	if len(m) == 0 {
		t.Fatalf("no client address in the driver's log:\n%s", tail(d.log, 20))
	}
	return m[len(m)-1][1]
}

func monCommand(t *testing.T, cmd map[string]any) {
	t.Helper()
	b, _ := json.Marshal(cmd)
	if _, info, err := adminConn.MonCommand(b); err != nil {
		t.Fatalf("%s: %v %s", b, err, info)
	}
}

// DeleteVolume of an image a client still has open is refused with
// FailedPrecondition naming the client, and leaves image and journal alone;
// once the client is gone the delete goes through, and the mgr purges the
// image from the trash. With nobody watching, the check takes the fast path
// (the id object and a notify of the header, no librbd open).
func TestDeleteWatchedImage(t *testing.T) {
	d := startDriver(t, newDriverDir(t), nil, "--node=false")
	c := ctx(t)
	prefix := uniquePrefix(t)
	r, err := d.ctrl.CreateVolume(c, createReq(prefix+"w", prefix, 64<<20))
	if err != nil {
		t.Fatal(err)
	}
	image := images(t, prefix)[0]
	img, err := rbd.OpenImage(admin, image, rbd.NoSnapshot) // a watcher, as a mapping is
	if err != nil {
		t.Fatal(err)
	}
	me, _ := adminConn.GetAddrs()
	req := &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: secrets()}
	_, err = d.ctrl.DeleteVolume(c, req)
	img.Close()
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), me) {
		t.Errorf("delete of a watched image: %v, want FailedPrecondition naming watcher %s", err, me)
	}
	if len(images(t, prefix)) != 1 || len(journal(t, image)) != 2 || len(trashed(t, prefix)) != 0 {
		t.Fatalf("a refused delete changed something: images %v, journal %v, trash %v", images(t, prefix), journal(t, image), trashed(t, prefix))
	}
	if _, err := d.ctrl.DeleteVolume(c, req); err != nil {
		t.Fatal(err)
	}
	if len(images(t, prefix)) != 0 || len(journal(t, "i:"+image)) != 0 || len(journal(t, "n:"+prefix)) != 0 {
		t.Errorf("after DeleteVolume: images %v, journal %v", images(t, prefix), journal(t, image))
	}
	log, _ := os.ReadFile(d.log)
	if !regexp.MustCompile(`"image moved to the trash" image="` + image + `" trashID="[0-9a-f]+" fastCheck=true`).Match(log) {
		t.Errorf("the delete of an unwatched image did not take the fast watcher check:\n%s", tail(d.log, 10))
	}
	assertNoOrphans(t, prefix)
}

// A user without mgr caps cannot queue the trash removal with the mgr: the
// driver then removes the image from the trash itself.
func TestDeleteWithoutMgrCaps(t *testing.T) {
	user := fmt.Sprintf("rookzmq-ctrl-nomgr-%d", time.Now().UnixNano()%1e9)
	out, info, err := adminConn.MonCommand([]byte(fmt.Sprintf(
		`{"prefix":"auth get-or-create","entity":"client.%s","caps":["mon","profile rbd","osd","profile rbd pool=rbd"],"format":"json"}`, user)))
	if err != nil {
		t.Fatalf("creating user %s: %v %s", user, err, info)
	}
	t.Cleanup(func() { monCommand(t, map[string]any{"prefix": "auth rm", "entity": "client." + user}) })
	var keys []struct {
		Key string `json:"key"`
	}
	if err := json.Unmarshal(out, &keys); err != nil || len(keys) != 1 {
		t.Fatalf("auth get-or-create answered %q: %v", out, err)
	}
	sec := map[string]string{"userID": user, "userKey": keys[0].Key}
	d := startDriver(t, newDriverDir(t), nil, "--node=false")
	c := ctx(t)
	prefix := uniquePrefix(t)
	req := createReq(prefix+"n", prefix, 64<<20)
	req.Secrets = sec
	r, err := d.ctrl.CreateVolume(c, req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.ctrl.DeleteVolume(c, &csi.DeleteVolumeRequest{VolumeId: r.GetVolume().GetVolumeId(), Secrets: sec}); err != nil {
		t.Fatal(err)
	}
	assertNoOrphans(t, prefix)
	if b, _ := os.ReadFile(d.log); !strings.Contains(string(b), "the mgr refused the trash-remove task") {
		t.Errorf("no log line says the mgr refused the task")
	}
}
