package zmqbridge

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
)

// An endpoint holds at most MaxSubscriptions subscriptions: 10,000 asked,
// the first 1,000 apply. A peer that leaves gives its subscriptions back.
func TestSubscriptionsCapped(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	podEvents, _ := addPodEndpoint(t, b, "pod", Scope{Namespace: "a"})
	zctx := newContext(t)
	sub, _ := zctx.NewSocket(zmq.SUB)
	sub.SetLinger(0)
	sub.SetSndhwm(0) // unlimited: every one of the 10,000 reaches the bridge
	if err := sub.Connect(podEvents); err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for i := 0; i < 10000; i++ {
		sub.SetSubscribe(fmt.Sprintf("attach/a/p%05d", i))
	}
	time.Sleep(time.Second)
	for _, pvc := range []string{"p00010", "p09000"} {
		if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: pvc, PVC: pvc, Namespace: "a"}); err != nil {
			t.Fatal(err)
		}
	}
	got := recvTopics(sub, time.Second)
	if len(got) != 1 || got[0] != "attach/a/p00010" {
		t.Fatalf("got %q, want only attach/a/p00010 (subscriptions past 1,000 refused)", got)
	}
	sub.Close()
	time.Sleep(300 * time.Millisecond) // its subscriptions come back as it goes
	sub2 := rawSocket(t, zctx, zmq.SUB, podEvents)
	sub2.SetSubscribe("attach/")
	time.Sleep(500 * time.Millisecond)
	if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: "v", PVC: "p09001", Namespace: "a"}); err != nil {
		t.Fatal(err)
	}
	if got := recvTopics(sub2, time.Second); len(got) != 1 {
		t.Fatalf("a new subscriber after the first left got %q (subscriptions not given back?)", got)
	}
}

// On a pod (guarded) endpoint subscriptions are capped per connection: 10
// hostile connections ask 1,000 each (10,000 in all, ten times the cap other
// endpoints have in all); each holds its first MaxConnSubscriptions, and a
// well-behaved subscriber connecting after them on the same endpoint still
// receives live events. A connection's own unsubscribe gives it room back.
func TestSubscriptionsPerConnection(t *testing.T) {
	dir := t.TempDir()
	b := newBridge(t, dir)
	defer b.Close()
	pod := filepath.Join(t.TempDir(), "pod")
	os.MkdirAll(pod, 0o755)
	events := "ipc://" + pod + "/events.sock"
	if err := b.AddEndpoint("pod", Endpoint{Events: events, Control: "ipc://" + pod + "/control.sock", Scope: Scope{Namespace: "a"},
		Mode: 0o666, SendHWM: 1000, Guard: true}); err != nil {
		t.Fatal(err)
	}
	zctx := newContext(t)
	sub := func() *zmq.Socket {
		s, _ := zctx.NewSocket(zmq.SUB)
		s.SetLinger(0)
		s.SetSndhwm(0) // unlimited: every subscription reaches the relay
		if err := s.Connect(events); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	var hostile []*zmq.Socket
	for c := 0; c < 10; c++ {
		s := sub()
		for i := 0; i < 1000; i++ {
			s.SetSubscribe(fmt.Sprintf("attach/a/c%d-%04d-%s", c, i, strings.Repeat("x", 200)))
		}
		hostile = append(hostile, s)
	}
	time.Sleep(500 * time.Millisecond)
	good := sub()
	good.SetSubscribe("attach/")
	emit := func(pvc string) {
		t.Helper()
		if _, err := b.Emit(context.Background(), Event{Kind: KindAttach, VolumeID: pvc, PVC: pvc, Namespace: "a"}); err != nil {
			t.Fatal(err)
		}
	}
	// The well-behaved subscriber gets live events (within a few seconds:
	// 10,000 subscriptions go through the relay first).
	got := false
	for deadline := time.Now().Add(10 * time.Second); !got && time.Now().Before(deadline); {
		emit("probe")
		got = len(recvTopics(good, 200*time.Millisecond)) > 0
	}
	if !got {
		t.Fatal("a well-behaved subscriber on the endpoint receives nothing after 10,000 hostile subscriptions")
	}
	time.Sleep(200 * time.Millisecond)
	for _, h := range hostile {
		recvTopics(h, 50*time.Millisecond) // drain
	}
	recvTopics(good, 50*time.Millisecond)
	first, past := "c0-0000-"+strings.Repeat("x", 200), fmt.Sprintf("c0-%04d-%s", MaxConnSubscriptions, strings.Repeat("x", 200))
	emit(first)
	emit(past)
	emit("live")
	if got, want := fmt.Sprint(recvTopics(good, time.Second)), fmt.Sprint([]string{"attach/a/" + first, "attach/a/" + past, "attach/a/live"}); got != want {
		t.Errorf("the well-behaved subscriber got %s, want %s", got, want)
	}
	if got := recvTopics(hostile[0], 300*time.Millisecond); len(got) != 1 || got[0] != "attach/a/"+first {
		t.Errorf("a hostile connection got %q, want only its first subscription's event (past the first %d refused)", got, MaxConnSubscriptions)
	}
	// Its own unsubscribe gives the connection room back.
	hostile[0].SetUnsubscribe("attach/a/" + first)
	hostile[0].SetSubscribe("attach/a/" + past)
	time.Sleep(300 * time.Millisecond)
	emit(first)
	emit(past)
	if got := recvTopics(hostile[0], 300*time.Millisecond); len(got) != 1 || got[0] != "attach/a/"+past {
		t.Errorf("after unsubscribing one, the hostile connection got %q, want only %s", got, past)
	}
}

func recvTopics(s *zmq.Socket, d time.Duration) []string {
	var out []string
	s.SetRcvtimeo(d)
	for deadline := time.Now().Add(d); time.Now().Before(deadline); {
		f, err := s.RecvMessage(0)
		if err != nil {
			return out
		}
		if !strings.HasPrefix(f[0], "hb/") {
			out = append(out, f[0])
		}
	}
	return out
}

// The relay reads both forms of (un)subscription: ZMTP 3.0's one-frame
// messages (0x01/0x00 and the topic) and ZMTP 3.1's SUBSCRIBE/CANCEL
// commands, which libzmq 4.3 sends, and forwards exactly what keeps the
// connection's subscriptions within MaxConnSubscriptions.
func TestGuardSubscriptionFrames(t *testing.T) {
	g := &guard{maxFrame: maxSubscriptionBytes}
	subs := map[string]bool{}
	cmd := func(name, topic string) []byte { return append(append([]byte{byte(len(name))}, name...), topic...) }
	const data, more, command = 0x00, 0x01, 0x04
	steps := []struct {
		flags byte
		body  []byte
		fwd   bool
	}{
		{data, []byte("\x01a"), true},
		{data, []byte("\x01a"), false}, // held already
		{command, cmd("SUBSCRIBE", "a"), false},
		{data, []byte("\x00a"), true},
		{data, []byte("\x00a"), false}, // not held
		{command, cmd("CANCEL", "a"), false},
		{command, cmd("SUBSCRIBE", "a"), true},
		{command, cmd("CANCEL", "a"), true},
		{command, cmd("READY", "\x0bSocket-Type\x00\x00\x00\x03SUB"), true},
		{command, cmd("PING", "\x00\x00"), true},
		{more, []byte("\x01b"), false}, // the first frame of a multipart message
		{data, []byte("\x02b"), false}, // not a subscription
		{data, nil, false},
	}
	for i, s := range steps {
		if fwd, err := g.subscription(subs, s.flags, s.body); err != nil || fwd != s.fwd {
			t.Fatalf("step %d (%q): forwarded %v, %v; want %v", i, s.body, fwd, err, s.fwd)
		}
	}
	for i := 0; i < MaxConnSubscriptions; i++ {
		if fwd, _ := g.subscription(subs, command, cmd("SUBSCRIBE", fmt.Sprint(i))); !fwd {
			t.Fatalf("subscription %d refused", i)
		}
	}
	if fwd, _ := g.subscription(subs, data, []byte("\x01x")); fwd {
		t.Fatalf("subscription %d forwarded", MaxConnSubscriptions+1)
	}
	if fwd, _ := g.subscription(subs, data, []byte("\x000")); !fwd {
		t.Fatal("an unsubscription of a held topic not forwarded")
	}
	if fwd, _ := g.subscription(subs, data, []byte("\x01x")); !fwd {
		t.Fatal("no room given back by an unsubscription")
	}
	if _, err := g.subscription(subs, command, cmd("SUBSCRIBE", strings.Repeat("x", maxSubscriptionBytes))); err == nil {
		t.Fatal("a SUBSCRIBE command over the subscription size limit is not an error")
	}
}
