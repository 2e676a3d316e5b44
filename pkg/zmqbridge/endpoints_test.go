package zmqbridge

import (
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
)

// gaugeMetrics counts subscribers; the rest is ignored.
type gaugeMetrics struct{ subs atomic.Int64 }

func (*gaugeMetrics) EventPublished(string)              {}
func (*gaugeMetrics) ReplayServed()                      {}
func (*gaugeMetrics) JournalSynced(time.Duration, int64) {}
func (m *gaugeMetrics) Subscribers(d int)                { m.subs.Add(int64(d)) }

// An endpoint whose binding fails half-way must not leave its socket monitor
// closed before the monitored socket (libzmq reports the socket's end with a
// blocking send, which would stall the context's reaper: every socket closed
// afterwards would keep its address bound, and the subscriber count stuck).
func TestFailedEndpointLeavesContextWorking(t *testing.T) {
	for _, failing := range []string{"events", "control"} {
		t.Run(failing, func(t *testing.T) {
			dir := t.TempDir()
			m := &gaugeMetrics{}
			b, err := New(Options{Dir: dir, Node: "n1", Metrics: m})
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			e := Endpoint{Events: "ipc://" + filepath.Join(dir, "p-events.sock"), Control: "ipc://" + filepath.Join(dir, "p-control.sock")}
			bad := "ipc://" + filepath.Join(dir, "no-such-dir", "x.sock")
			if failing == "events" {
				e.Events = bad
			} else {
				e.Control = bad
			}
			if err := b.AddEndpoint("pod", e); err == nil {
				t.Fatal("binding into a missing directory succeeded")
			}

			// A working endpoint with a subscriber, then removed: the count
			// goes back to zero once its socket is really destroyed.
			ok := Endpoint{Events: "ipc://" + filepath.Join(dir, "q-events.sock"), Control: "ipc://" + filepath.Join(dir, "q-control.sock")}
			if err := b.AddEndpoint("q", ok); err != nil {
				t.Fatal(err)
			}
			zctx, _ := zmq.NewContext()
			defer zctx.Term()
			sub, _ := zctx.NewSocket(zmq.SUB)
			sub.SetLinger(0)
			sub.Connect(ok.Events)
			defer sub.Close()
			waitFor(t, "one subscriber counted", func() bool { return m.subs.Load() == 1 })
			b.RemoveEndpoint("q")
			waitFor(t, "the removed endpoint's subscriber uncounted", func() bool { return m.subs.Load() == 0 })

			// And a closed TCP socket of the bridge's context frees its port.
			addr := fmt.Sprintf("tcp://127.0.0.1:%d", freePort(t))
			s1, _ := b.zctx.NewSocket(zmq.PUB)
			s1.SetLinger(0)
			if err := s1.Bind(addr); err != nil {
				t.Fatal(err)
			}
			s1.Close()
			waitFor(t, "the closed socket's port free again", func() bool {
				s2, _ := b.zctx.NewSocket(zmq.PUB)
				defer s2.Close()
				s2.SetLinger(0)
				return s2.Bind(addr) == nil
			})
		})
	}
}
