package zmqbridge

// The durable-append floor: what the disk alone makes an event stream wait
// before its events are durable, at the bench's arrival rate.

import (
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// durableRun is the least any journal that makes each event durable before
// it is published can do on this disk: n records of benchRecord bytes arrive
// paced at rate/s; one goroutine writes whatever has arrived in one write(2)
// into a preallocated file and fdatasyncs it, in a loop. Each record's
// latency runs from its arrival to the end of the fdatasync that made it
// durable: no encoding, no sequence numbers, no ZeroMQ. Unlike the
// fsync-alone run, which times each fsync once, it weighs a slow fsync by the
// records that arrive while it runs, as the bridge's events are.
func durableRun(dir string, n, rate int) (*runResult, error) {
	f, err := os.Create(filepath.Join(dir, "durable-floor"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(n*benchRecord)); err != nil {
		return nil, err
	}
	var (
		mu      sync.Mutex
		arrived = make([]int64, 0, n)
		wake    = make(chan struct{}, 1)
	)
	go func() {
		start := time.Now()
		for i := 0; i < n; i++ {
			pacer(start, i, rate)
			mu.Lock()
			arrived = append(arrived, time.Now().UnixNano())
			mu.Unlock()
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}()
	res, buf := &runResult{n: n}, make([]byte, n*benchRecord)
	for done := 0; done < n; {
		mu.Lock()
		upto := len(arrived)
		mu.Unlock()
		if upto == done {
			<-wake
			continue
		}
		t := time.Now()
		if _, err := f.WriteAt(buf[done*benchRecord:upto*benchRecord], int64(done*benchRecord)); err != nil {
			return nil, err
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return nil, err
		}
		end := time.Now()
		res.syncs = append(res.syncs, end.Sub(t))
		mu.Lock()
		for _, at := range arrived[done:upto] {
			res.lat = append(res.lat, time.Duration(end.UnixNano()-at))
		}
		mu.Unlock()
		done = upto
	}
	return res, nil
}

// durableRatio is the bridge's p99 over raw ZeroMQ's p99 plus the durable
// appender's p99, all from one round.
func durableRatio(rawL, duL, brL *runResult) float64 {
	return float64(pct(brL.lat, 0.99)) / float64(pct(rawL.lat, 0.99)+pct(duL.lat, 0.99))
}
