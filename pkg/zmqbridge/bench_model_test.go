package zmqbridge

// Tests of the models BenchmarkBridgeVsRaw prints its figures with.

import (
	"testing"
	"time"
)

// TestCommitInFlight checks the bench's attribution of an emit to the group
// commit in flight at that moment.
func TestCommitInFlight(t *testing.T) {
	took := []time.Duration{10, 20, 5}
	end := []int64{110, 140, 200} // commits [100,110], [120,140], [195,200]
	for _, c := range []struct {
		at   int64
		want time.Duration
	}{{99, 0}, {100, 10}, {105, 5}, {110, 0}, {115, 0}, {120, 20}, {139, 1}, {150, 0}, {196, 4}, {200, 0}, {300, 0}} {
		if got := commitInFlight(took, end, c.at); got != c.want {
			t.Errorf("emit at %d: %d left of a commit in flight, want %d", c.at, got, c.want)
		}
	}
}

// TestBehindFsync checks the model: fsyncs back to back of 100 us, every
// tenth 1 ms. An arrival waits for the rest of the one in flight, then the
// next one: the slow ones hold 10/19 of the time, so an arrival waits 0.1-1.1
// ms with probability 0.53 (during a slow one) and 1.0-1.1 ms with 0.05
// (during the fast one before it), else 0.1-0.2 ms: p50 0.25 ms, p99 1.09 ms
// (arrivals 10 us apart: within 20 us).
func TestBehindFsync(t *testing.T) {
	r := &runResult{}
	end := int64(0)
	for i := 0; i < 1000; i++ {
		d := 100 * time.Microsecond
		if i%10 == 9 {
			d = time.Millisecond
		}
		end += int64(d)
		r.lat, r.syncEnd = append(r.lat, d), append(r.syncEnd, end)
	}
	near := func(got, want time.Duration) bool {
		return got >= want-20*time.Microsecond && got <= want+20*time.Microsecond
	}
	if p50 := behindFsync(r, 0.5); !near(p50, 250*time.Microsecond) {
		t.Errorf("p50 %v behind the fsync in flight, want 0.25 ms", p50)
	}
	if p99 := behindFsync(r, 0.99); !near(p99, 1090*time.Microsecond) {
		t.Errorf("p99 %v behind the fsync in flight, want 1.09 ms", p99)
	}
}

// TestDurableRun checks the durable-append floor's bookkeeping: every record
// gets one latency, measured to the fdatasync after its arrival, and the
// records share fdatasyncs (never more syncs than records).
func TestDurableRun(t *testing.T) {
	const n = 500
	start := time.Now()
	r, err := durableRun(t.TempDir(), n, 10000)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if len(r.lat) != n || len(r.syncs) == 0 || len(r.syncs) > n {
		t.Fatalf("%d latencies and %d fdatasyncs for %d records", len(r.lat), len(r.syncs), n)
	}
	for i, d := range r.lat {
		if d <= 0 || d > took {
			t.Fatalf("record %d: latency %v outside (0, %v]", i, d, took)
		}
	}
	// A record arrives before the write and fdatasync that carry it begin.
	if pct(r.lat, 0) < pct(r.syncs, 0) {
		t.Errorf("shortest latency %v below the fastest fdatasync %v: not measured to durability", pct(r.lat, 0), pct(r.syncs, 0))
	}
}
