package zmqbridge

// Raw ZeroMQ PUB/SUB against the bridge, side by side on this machine:
//
//	go test -run '^$' -bench BridgeVsRaw -benchtime 1x ./pkg/zmqbridge/
//
// The publisher (raw XPUB, or the bridge) runs in the benchmark's process; the
// subscriber of every run is a child process (bench_child_test.go), as in
// production, where subscribers are other pods. They talk over ipc in a
// temporary directory; the bridge's journal lives there too, so its fsyncs hit
// that file system. Each socket is owned by one goroutine. Latencies compare
// wall-clock (UnixNano) times taken in the two processes.

import (
	"bytes"
	"cmp"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	zmq "github.com/pebbe/zmq4"
	"golang.org/x/sys/unix"
)

const (
	benchN       = 200000          // messages in the throughput runs
	benchRate    = 10000           // messages/s in the latency runs
	benchLatTime = 5 * time.Second // length of the latency runs
	benchWait    = 20 * time.Second
	benchRounds  = 3 // each measurement runs this often; the median round is shown
	benchNode    = "node-1"
	benchDriver  = "rbd.csi.rookzmq.io"
)

// benchEvent is a publish event of about 210 bytes of JSON once the bridge
// has filled in seq, time, node and driver.
func benchEvent() Event {
	return Event{Kind: KindPublish, VolumeID: "0001-0009-rook-ceph-0000000000000002",
		PVC: "data-db-0", Namespace: "team-a"}
}

// pacer sleeps until message i of a run at rate/s is due (rate 0: never).
// time.Sleep rounds up to ~1 ms here, so it uses nanosleep(2): no spinning.
func pacer(start time.Time, i, rate int) {
	if rate == 0 {
		return
	}
	if d := time.Until(start.Add(time.Duration(i) * time.Second / time.Duration(rate))); d > 0 {
		sleepPrecise(d)
	}
}

// sleepPrecise waits d on a timerfd read through Go's netpoller: the goroutine
// parks and its processor runs others meanwhile. time.Sleep is ~1 ms coarse
// here; nanosleep(2) would hold the processor, stranding goroutines the
// sender just readied (the bridge's committer) until sysmon takes it back.
func sleepPrecise(d time.Duration) {
	timerOnce.Do(func() {
		fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
		if err == nil {
			timerFile = os.NewFile(uintptr(fd), "timerfd")
		}
	})
	if timerFile == nil {
		ts := syscall.NsecToTimespec(int64(d))
		syscall.Nanosleep(&ts, nil)
		return
	}
	spec := unix.ItimerSpec{Value: unix.NsecToTimespec(int64(d))}
	if unix.TimerfdSettime(int(timerFile.Fd()), 0, &spec, nil) != nil {
		return
	}
	var buf [8]byte
	timerFile.Read(buf[:])
}

var (
	timerOnce sync.Once
	timerFile *os.File // one timer: pacing runs in one goroutine at a time
)

// runResult is what one run measured.
type runResult struct {
	n                    int
	elapsed              time.Duration   // first send to last receipt
	emitted              time.Duration   // bridge: first to last EmitAsync returned
	lat                  []time.Duration // per message, paced runs only
	live, replayed, dups int             // bridge: how events reached the subscriber
	replays              int             // bridge: replay requests made
	syncs                []time.Duration // bridge: each group commit (one fsync)
	syncEnd              []int64         // bridge: when (UnixNano) each group commit ended; fsync alone: each fsync
	mallocs              float64         // bridge: heap allocations in this process per event
	toPub, fromPub       []time.Duration // bridge, paced: emit -> PUB send -> SUB receipt
	// inCommit is, per event of a paced bridge run, how long it waited for
	// the group commit in flight when it was emitted (0: none was).
	inCommit []time.Duration
}

func (r *runResult) rate() float64 { return float64(r.n) / r.elapsed.Seconds() }

// pct is the p-quantile of xs (0 when empty).
func pct(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// rawRun sends n messages [topic, json] from an XPUB (XPUB_NODROP, so a full
// queue blocks the sender instead of dropping) to one subscriber process. The
// JSON is the bench event's with the send time (UnixNano) in place of "time".
func rawRun(dir string, n, rate int) (*runResult, error) {
	ev := benchEvent()
	topic := []byte(ev.Topic())
	ev.Node, ev.Driver = benchNode, benchDriver
	tail := ev.Marshal()
	tail = tail[bytes.Index(tail, []byte(`,"node"`)):] // what follows "seq" and "time"
	addr := "ipc://" + filepath.Join(dir, "raw.sock")

	zctx, err := zmq.NewContext()
	if err != nil {
		return nil, err
	}
	defer zctx.Term()
	pub, err := zctx.NewSocket(zmq.XPUB)
	if err != nil {
		return nil, err
	}
	defer pub.Close()
	pub.SetLinger(0)
	pub.SetXpubNodrop(true)
	pub.SetSndhwm(100000)
	pub.SetSndtimeo(benchWait) // never block forever if the subscriber died
	pub.SetRcvtimeo(5 * time.Second)
	if err := pub.Bind(addr); err != nil {
		return nil, err
	}

	sp, err := startSubscriber(subParams{Mode: "raw", Events: addr, N: n})
	if err != nil {
		return nil, err
	}
	defer sp.stop()
	if err := sp.ready(benchWait); err != nil { // its SUB is connecting
		return nil, err
	}
	// XPUB delivers the subscription: from then on nothing is missed.
	if _, err := pub.RecvBytes(0); err != nil {
		return nil, sp.fail(fmt.Errorf("no subscription on the XPUB: %w", err))
	}
	sentAt, buf, start := make([]int64, n), make([]byte, 0, 512), time.Now()
	for i := 0; i < n; i++ {
		pacer(start, i, rate)
		sentAt[i] = time.Now().UnixNano()
		buf = append(strconv.AppendUint(append(buf[:0], `{"v":1,"seq":`...), uint64(i+1), 10), `,"sent_ns":`...)
		buf = append(strconv.AppendInt(buf, sentAt[i], 10), tail...)
		if _, err = pub.SendBytes(topic, zmq.SNDMORE); err == nil {
			_, err = pub.SendBytes(buf, 0)
		}
		if err != nil {
			return nil, sp.fail(fmt.Errorf("raw XPUB: message %d of %d: %w", i+1, n, err))
		}
	}
	sub, err := sp.result(benchWait + 5*time.Second)
	if err != nil {
		return nil, err
	}
	res := &runResult{n: n, elapsed: time.Duration(sub.RecvAt[n-1] - sentAt[0])}
	for i := 0; rate > 0 && i < n; i++ {
		res.lat = append(res.lat, time.Duration(sub.RecvAt[i]-sentAt[i]))
	}
	return res, nil
}

// benchMetrics records the bridge's group commits (one journal fsync each)
// and when (UnixNano) each event left the PUB socket (published in order).
type benchMetrics struct {
	mu      sync.Mutex
	syncs   []time.Duration
	syncEnd []int64
	pubAt   []int64
}

func (m *benchMetrics) ReplayServed()   {}
func (m *benchMetrics) Subscribers(int) {}
func (m *benchMetrics) EventPublished(string) {
	now := time.Now().UnixNano()
	m.mu.Lock()
	m.pubAt = append(m.pubAt, now)
	m.mu.Unlock()
}
func (m *benchMetrics) JournalSynced(d time.Duration, _ int64) {
	now := time.Now().UnixNano()
	m.mu.Lock()
	m.syncs = append(m.syncs, d)
	m.syncEnd = append(m.syncEnd, now)
	m.mu.Unlock()
}

// bridgeRun EmitAsyncs n events (paced at rate/s, or as fast as possible when
// rate is 0) while a subscriber process receives them on events.sock; events
// the PUB dropped it fetches with Client.Replay, so every one of the n arrives.
func bridgeRun(dir string, n, rate int) (*runResult, error) {
	m := &benchMetrics{}
	br, err := New(Options{Dir: dir, Node: benchNode, Driver: benchDriver,
		Heartbeat: 50 * time.Millisecond, Metrics: m})
	if err != nil {
		return nil, err
	}
	defer br.Close()
	base := br.Last()
	sp, err := startSubscriber(subParams{Mode: "bridge", N: n, Base: base,
		Events: "ipc://" + filepath.Join(dir, "events.sock"), Control: "ipc://" + filepath.Join(dir, "control.sock")})
	if err != nil {
		return nil, err
	}
	defer sp.stop()
	if err := sp.ready(benchWait); err != nil { // it has received a heartbeat
		return nil, err
	}

	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	ev, emitAt, start := benchEvent(), make([]int64, n), time.Now()
	for i := 0; i < n; i++ {
		pacer(start, i, rate)
		emitAt[i] = time.Now().UnixNano()
		seq, err := br.EmitAsync(ev)
		if err == nil && seq != base+uint64(i)+1 {
			err = fmt.Errorf("EmitAsync returned seq %d, want %d", seq, base+uint64(i)+1)
		}
		if err != nil {
			return nil, sp.fail(err)
		}
	}
	res := &runResult{n: n, emitted: time.Duration(time.Now().UnixNano() - emitAt[0])}
	sub, err := sp.result(benchWait + 5*time.Second)
	if err != nil {
		return nil, err
	}
	runtime.ReadMemStats(&ms1) // every event was journaled and published
	res.mallocs = float64(ms1.Mallocs-ms0.Mallocs) / float64(n)
	br.Close() // the publisher has told m of every event
	m.mu.Lock()
	res.syncs, res.syncEnd = slices.Clone(m.syncs), slices.Clone(m.syncEnd)
	pubAt := slices.Clone(m.pubAt)
	m.mu.Unlock()
	res.live, res.replayed, res.dups, res.replays = sub.Live, sub.Replayed, sub.Dups, sub.Replays
	res.elapsed = time.Duration(slices.Max(sub.RecvAt) - emitAt[0])
	for i := 0; rate > 0 && i < n; i++ {
		res.lat = append(res.lat, time.Duration(sub.RecvAt[i]-emitAt[i]))
		if len(pubAt) == n { // split at the PUB send
			res.toPub = append(res.toPub, time.Duration(pubAt[i]-emitAt[i]))
			res.fromPub = append(res.fromPub, time.Duration(sub.RecvAt[i]-pubAt[i]))
			res.inCommit = append(res.inCommit, commitInFlight(res.syncs, res.syncEnd, emitAt[i]))
		}
	}
	return res, nil
}

// commitInFlight returns how long a group commit in flight at t (UnixNano)
// still ran after t, or 0 if none was. Commits are serial: ends ascend.
func commitInFlight(took []time.Duration, end []int64, t int64) time.Duration {
	k, _ := slices.BinarySearch(end, t+1) // the first commit ending after t
	if k == len(end) || end[k]-int64(took[k]) > t {
		return 0
	}
	return time.Duration(end[k] - t)
}

// commitSplit says where the slowest events of a paced bridge run spent
// their time before the PUB send: the share of all events emitted while a
// group commit was in flight, and the mean, over the events at or above the
// p99 of emit -> PUB send, of the wait for that commit and of the rest (their
// own write and commit, and the publish loop).
func commitSplit(r *runResult) (share float64, wait, rest time.Duration) {
	if len(r.inCommit) == 0 {
		return 0, 0, 0
	}
	n, p99 := 0, pct(r.toPub, 0.99)
	var tail int
	for i, w := range r.inCommit {
		if w > 0 {
			n++
		}
		if r.toPub[i] >= p99 {
			tail++
			wait += w
			rest += r.toPub[i] - w
		}
	}
	return float64(n) / float64(len(r.inCommit)), wait / time.Duration(tail), rest / time.Duration(tail)
}

// medianIndex returns the index of the median of xs (the lower one of an
// even count), or -1 for none.
func medianIndex(xs []float64) int {
	if len(xs) == 0 {
		return -1
	}
	idx := make([]int, len(xs))
	for i := range idx {
		idx[i] = i
	}
	slices.SortFunc(idx, func(a, b int) int { return cmp.Compare(xs[a], xs[b]) })
	return idx[(len(xs)-1)/2]
}

func ms1(d time.Duration) float64 { return d.Seconds() * 1e3 }

// settle flushes dirty pages and lets the disk go quiet.
func settle() {
	unix.Sync()
	time.Sleep(time.Second)
}

// benchRecord is about the size of one journal record of benchEvent.
const benchRecord = 256

// fsyncRun measures the disk's floor under the bridge: n paced appends of a
// journal-record-sized buffer, each followed by an fsync, timed alone.
func fsyncRun(dir string, n, rate int) (*runResult, error) {
	f, err := os.Create(filepath.Join(dir, "fsync-floor"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf, res, start := make([]byte, benchRecord), &runResult{n: n}, time.Now()
	for i := 0; i < n; i++ {
		pacer(start, i, rate)
		t := time.Now()
		if _, err := f.Write(buf); err != nil {
			return nil, err
		}
		if err := f.Sync(); err != nil {
			return nil, err
		}
		res.lat = append(res.lat, time.Since(t))
		res.syncEnd = append(res.syncEnd, time.Now().UnixNano())
	}
	return res, nil
}

// behindFsync is the p-quantile of a model of the fsync-alone run (r): an
// event arriving at a random moment (every 10 us) waits for the rest of the
// fsync in flight, if any, then for one more (the next one's time), as under
// one group committer, which has only one fsync in flight.
func behindFsync(r *runResult, p float64) time.Duration {
	if len(r.syncEnd) < 2 {
		return 0
	}
	var w []time.Duration
	k, last := 0, r.syncEnd[len(r.syncEnd)-2] // the one after k exists
	for t := r.syncEnd[0] - int64(r.lat[0]); t < last; t += 10000 {
		for r.syncEnd[k] <= t {
			k++
		}
		if r.syncEnd[k]-int64(r.lat[k]) <= t {
			w = append(w, time.Duration(r.syncEnd[k]-t)+r.lat[k+1])
		} else {
			w = append(w, r.lat[k]) // none in flight: its own
		}
	}
	return pct(w, p)
}

// fsType names the file system holding dir, and for ext4 whether it has a
// journal: where it has, an fdatasync that changed metadata (a size, an
// extent of a fallocated file written first) waits for a journal commit.
func fsType(dir string) string {
	var st syscall.Statfs_t
	syscall.Statfs(dir, &st)
	name := cmp.Or(map[int64]string{0xEF53: "ext4", 0x01021994: "tmpfs", 0x58465342: "xfs"}[st.Type], fmt.Sprintf("fs 0x%x", st.Type))
	if name == "ext4" {
		return name + ext4Journal(dir)
	}
	return name
}

// ext4Journal says whether the ext4 file system holding dir has a journal,
// as its journal thread in /sys shows ("" if that cannot be told).
func ext4Journal(dir string) string {
	var st unix.Stat_t
	if unix.Stat(dir, &st) != nil {
		return ""
	}
	dev, err := filepath.EvalSymlinks(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev)))
	if err != nil {
		return ""
	}
	task, err := os.ReadFile(filepath.Join("/sys/fs/ext4", filepath.Base(dev), "journal_task"))
	switch {
	case err != nil:
		return ""
	case strings.TrimSpace(string(task)) == "<none>":
		return " without a journal"
	default:
		return " with a journal"
	}
}

// ms formats a duration; 0 (not measured) is "-".
func ms(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3f ms", d.Seconds()*1e3)
}

var verdict = map[bool]string{true: "met", false: "MISSED"}

// latencyRatio is the bridge's p99 over the floor under it measured in the
// same round: raw ZeroMQ's p99 plus a bare fsync's p99.
func latencyRatio(rawL, fsL, brL *runResult) float64 {
	return float64(pct(brL.lat, 0.99)) / float64(pct(rawL.lat, 0.99)+pct(fsL.lat, 0.99))
}

// BenchmarkBridgeVsRaw runs the four measurements and prints them as a table.
// Each measures a fixed workload; run it with -benchtime 1x.
func BenchmarkBridgeVsRaw(b *testing.B) {
	goroutines := runtime.NumGoroutine()
	var rawT, brT, rawL, fsL, duL, brL *runResult
	var fs string
	run := func(name string, out **runResult, n, rate int, f func(string, int, int) (*runResult, error)) {
		b.Run(name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				dir := b.TempDir()
				fs = fsType(dir)
				r, err := f(dir, n, rate)
				if err != nil {
					b.Fatal(err)
				}
				*out = r
			}
			if r := *out; r.lat == nil {
				b.ReportMetric(r.rate(), "msg/s")
			} else {
				b.ReportMetric(float64(pct(r.lat, 0.50).Microseconds()), "p50-us")
				b.ReportMetric(float64(pct(r.lat, 0.99).Microseconds()), "p99-us")
			}
			if r := *out; len(r.syncs) > 0 {
				b.ReportMetric(float64(r.n)/float64(len(r.syncs)), "events/fsync")
			}
		})
	}
	// Three rounds, each pair side by side; the table shows the median round
	// (this VM's CPU steal and disk hiccups move single runs a lot) and lists all.
	nLat := benchRate * int(benchLatTime/time.Second)
	var ratios, latRatios []float64
	var rounds []struct{ rawT, brT, rawL, fsL, duL, brL *runResult }
	for i := 0; i < benchRounds; i++ {
		run("raw-throughput", &rawT, benchN, 0, rawRun)
		run("bridge-throughput", &brT, benchN, 0, bridgeRun)
		settle() // the latency runs must not pay for the throughput runs' writeback
		run("raw-latency", &rawL, nLat, benchRate, rawRun)
		run("fsync-latency", &fsL, nLat/5, benchRate, fsyncRun)
		settle()
		run("durable-latency", &duL, nLat, benchRate, durableRun)
		settle()
		run("bridge-latency", &brL, nLat, benchRate, bridgeRun)
		rounds = append(rounds, struct{ rawT, brT, rawL, fsL, duL, brL *runResult }{rawT, brT, rawL, fsL, duL, brL})
		if rawT != nil && brT != nil {
			ratios = append(ratios, brT.rate()/rawT.rate()*100)
		}
		if rawL != nil && brL != nil && fsL != nil {
			latRatios = append(latRatios, latencyRatio(rawL, fsL, brL))
		}
	}
	if m := medianIndex(ratios); m >= 0 {
		rawT, brT = rounds[m].rawT, rounds[m].brT
	}
	if m := medianIndex(latRatios); m >= 0 {
		rawL, fsL, duL, brL = rounds[m].rawL, rounds[m].fsL, rounds[m].duL, rounds[m].brL
	}

	ev := benchEvent()
	ev.V, ev.Seq, ev.Time, ev.Node, ev.Driver = Version, benchN, time.Now().UTC().Format(time.RFC3339Nano), benchNode, benchDriver
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Printf("\nmedian of %d rounds; raw ZeroMQ vs bridge over ipc; publisher in the benchmark process, subscriber a separate process; GOMAXPROCS %d, "+
		"load avg %s\nmessages [topic %d B, JSON %d B]; bridge journal on %s\n",
		benchRounds, runtime.GOMAXPROCS(0), bytes.Fields(load)[0], len(ev.Topic()), len(ev.Marshal()), fs)
	row := func(name, raw, br, note string) { fmt.Printf("  %-36s %12s %12s   %s\n", name, raw, br, note) }
	bridgeRows := func(r *runResult) {
		row("  bridge live/replayed/duplicate", "", fmt.Sprintf("%d/%d/%d", r.live, r.replayed, r.dups), fmt.Sprintf("%d replay requests", r.replays))
		row("  bridge events per fsync", "", fmt.Sprintf("%.1f", float64(r.n)/float64(max(len(r.syncs), 1))),
			fmt.Sprintf("%d fsyncs, each p50 %s, p99 %s", len(r.syncs), ms(pct(r.syncs, 0.5)), ms(pct(r.syncs, 0.99))))
		row("  bridge heap allocations per event", "", fmt.Sprintf("%.1f", r.mallocs), "in the publishing process (with the benchmark's own records)")
	}
	row("", "raw PUB/SUB", "bridge", "")
	if rawT != nil && brT != nil {
		ratio := brT.rate() / rawT.rate() * 100
		row(fmt.Sprintf("lossless %d msgs, msg/s", benchN), fmt.Sprintf("%.0f", rawT.rate()), fmt.Sprintf("%.0f", brT.rate()),
			fmt.Sprintf("bridge/raw %.0f %% (goal >= 50 %%): %s", ratio, verdict[ratio >= 50]))
		row("  first send -> last receipt", ms(rawT.elapsed), ms(brT.elapsed),
			fmt.Sprintf("EmitAsync loop alone: %.0f/s", float64(brT.n)/brT.emitted.Seconds()))
		bridgeRows(brT)
	}
	if brL != nil {
		rawL = cmp.Or(rawL, &runResult{}) // "-" if the raw run was filtered out
		fmt.Printf("paced %d/s for %s, one-way latency (send -> receipt)\n", benchRate, benchLatTime)
		for _, q := range []float64{0.5, 0.99, 0.999, 1} {
			note := ""
			if q == 0.99 {
				note = "goal: bridge < 1 ms: " + verdict[pct(brL.lat, q) < time.Millisecond]
			}
			row(fmt.Sprintf("  p%g", q*100), ms(pct(rawL.lat, q)), ms(pct(brL.lat, q)), note)
		}
		for _, q := range []float64{0.5, 0.99} {
			row(fmt.Sprintf("  bridge p%g: emit -> PUB send", q*100), "", ms(pct(brL.toPub, q)), "journal write + group-commit fsync + publish loop")
			row(fmt.Sprintf("  bridge p%g: PUB send -> receipt", q*100), "", ms(pct(brL.fromPub, q)), "ZeroMQ + subscriber")
		}
		if share, wait, rest := commitSplit(brL); share > 0 {
			row("  bridge events emitted during a commit", "", fmt.Sprintf("%.0f %%", share*100),
				"each waits for the end of the commit in flight, then for its own")
			row("  bridge slowest 1 %: wait / rest", "", ms(wait)+" / "+ms(rest),
				"mean emit -> PUB send of events >= its p99: the commit in flight, then own write + commit + publish")
		}
		bridgeRows(brL)
		if fsL != nil {
			row("  floor: fsync alone, p50 / p99", "", ms(pct(fsL.lat, 0.5))+" / "+ms(pct(fsL.lat, 0.99)),
				fmt.Sprintf("paced %d B append + fsync, same file system; the bridge publishes only fsynced events", benchRecord))
			row("  floor model: fsync in flight + one, p99", "", ms(behindFsync(fsL, 0.99)),
				"same run: an arrival every 10 us waits for the rest of the fsync in flight, then the next one (information, not the goal's floor)")
			r := latencyRatio(rawL, fsL, brL)
			row("  p99 bridge / (raw + fsync)", "", fmt.Sprintf("%.2f", r),
				fmt.Sprintf("%s / (%s + %s); goal <= 1.2: %s", ms(pct(brL.lat, 0.99)), ms(pct(rawL.lat, 0.99)), ms(pct(fsL.lat, 0.99)), verdict[r <= 1.2]))
		}
		if duL != nil {
			row("  floor: durable appender, p50 / p99", "", ms(pct(duL.lat, 0.5))+" / "+ms(pct(duL.lat, 0.99)),
				fmt.Sprintf("same arrivals: one loop writes what arrived and fdatasyncs, %.1f records per fdatasync; arrival -> durable", float64(duL.n)/float64(max(len(duL.syncs), 1))))
			row("  p99 bridge / (raw + durable appender)", "", fmt.Sprintf("%.2f", durableRatio(rawL, duL, brL)),
				"what the bridge adds to what the disk and ZeroMQ force on events at this rate (information)")
		}
	}
	fmt.Printf("all %d rounds: bridge/raw throughput", len(rounds))
	for _, r := range ratios {
		fmt.Printf(" %.0f %%", r)
	}
	fmt.Print("; paced p99 raw / fsync alone / bridge (ratio):")
	for _, r := range rounds {
		if r.rawL != nil && r.fsL != nil && r.brL != nil {
			fmt.Printf("  %.2f / %.2f / %.2f ms (%.2f)", ms1(pct(r.rawL.lat, 0.99)), ms1(pct(r.fsL.lat, 0.99)), ms1(pct(r.brL.lat, 0.99)),
				latencyRatio(r.rawL, r.fsL, r.brL))
		}
	}
	fmt.Print("; durable appender p99 (bridge / (raw + it)):")
	for _, r := range rounds {
		if r.rawL != nil && r.duL != nil && r.brL != nil {
			fmt.Printf("  %.2f ms (%.2f)", ms1(pct(r.duL.lat, 0.99)), durableRatio(r.rawL, r.duL, r.brL))
		}
	}
	fmt.Println()
	fmt.Println("(notes, separate processes: raw ipc 1.41M msg/s at 64 B, 0.96M at 512 B; paced 10k/s p50 55 us, p99 0.79 ms)")

	// Every goroutine started here (and by the bridges) must have ended.
	for i := 0; i < 50 && runtime.NumGoroutine() > goroutines; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > goroutines {
		b.Errorf("goroutine leak: %d before, %d after", goroutines, g)
	}
}
