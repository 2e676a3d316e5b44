package zmqbridge

import (
	"fmt"
	"testing"
)

// The per-event work allocates little, whatever the number of endpoints:
// journaling an event allocates once (its topic and JSON share a buffer),
// and deciding which of 64 scoped endpoints see it reads the record once
// (no allocation for a PVC's event; one JSON decode in pod scope).
func TestHotPathAllocations(t *testing.T) {
	b := newBridge(t, t.TempDir())
	defer b.Close()
	ev := Event{Kind: KindPublish, VolumeID: "0001-0009-rook-ceph-0000000000000002", PVC: "data-db-0", Namespace: "team-a"}
	if n := testing.AllocsPerRun(500, func() {
		if _, err := b.append(ev); err != nil {
			t.Fatal(err)
		}
	}); n > 1 {
		t.Errorf("journaling an event: %v allocations, want 1", n)
	}
	rec, err := b.append(ev)
	if err != nil {
		t.Fatal(err)
	}
	scoped := func(pod bool) []*endpoint {
		var eps []*endpoint
		for i := 0; i < 64; i++ {
			sc := Scope{Namespace: fmt.Sprint("ns-", i%8)}
			if i == 0 {
				sc.Namespace = "team-a"
			}
			if pod {
				sc.PodUID = fmt.Sprint("uid-", i)
			}
			eps = append(eps, &endpoint{Endpoint: Endpoint{Scope: sc}, volumes: map[string]bool{}})
		}
		return eps
	}
	for _, tc := range []struct {
		name string
		eps  []*endpoint
		max  float64
	}{{"namespace scope", scoped(false), 0}, {"pod scope", scoped(true), 8}} {
		seen := 0
		n := testing.AllocsPerRun(200, func() {
			v, seen := recordView{Record: rec}, 0
			for _, ep := range tc.eps {
				if ep.observe(&v) {
					seen++
				}
			}
			_ = seen
		})
		if n > tc.max {
			t.Errorf("%s: %v allocations to check one event against 64 endpoints, want at most %v", tc.name, n, tc.max)
		}
		_ = seen
	}
}
