package csi

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
)

// Metrics are the driver's Prometheus metrics: CSI call latencies by method
// and code, and the event bridge's counters. It implements zmqbridge.Metrics.
type Metrics struct {
	reg         *prometheus.Registry
	calls       *prometheus.HistogramVec
	published   *prometheus.CounterVec
	subscribers prometheus.Gauge
	replays     prometheus.Counter
	journal     prometheus.Gauge
	fsync       prometheus.Histogram
	flush       prometheus.Histogram
	curveFile   prometheus.Counter
	curveRefuse prometheus.Counter
}

// NewMetrics registers the metrics.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		calls: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "rookzmq_csi_call_seconds",
			Help: "CSI call latency by method and gRPC code.", Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10)},
			[]string{"method", "code"}),
		published: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rookzmq_events_published_total",
			Help: "Node events published, by kind."}, []string{"kind"}),
		subscribers: prometheus.NewGauge(prometheus.GaugeOpts{Name: "rookzmq_event_subscribers",
			Help: "Connections to the event PUB sockets."}),
		replays: prometheus.NewCounter(prometheus.CounterOpts{Name: "rookzmq_event_replay_requests_total",
			Help: "Replay requests served."}),
		journal: prometheus.NewGauge(prometheus.GaugeOpts{Name: "rookzmq_event_journal_bytes",
			Help: "Size of the event journal on disk."}),
		fsync: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "rookzmq_event_journal_fsync_seconds",
			Help: "Event journal group-commit fsync latency.", Buckets: prometheus.ExponentialBuckets(0.00005, 2, 14)}),
		flush: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "rookzmq_volume_flush_seconds",
			Help: "Volume flush (write acknowledgement) latency.", Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10)}),
		curveFile: prometheus.NewCounter(prometheus.CounterOpts{Name: "rookzmq_event_curve_clients_file_failures_total",
			Help: "Times the CURVE clients file could not be read or parsed (every client key was revoked)."}),
		curveRefuse: prometheus.NewCounter(prometheus.CounterOpts{Name: "rookzmq_event_curve_refused_total",
			Help: "CURVE handshakes refused (unknown client key)."}),
	}
	m.reg.MustRegister(m.calls, m.published, m.subscribers, m.replays, m.journal, m.fsync, m.flush, m.curveFile, m.curveRefuse,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveCall records a finished CSI call (a CallObserver).
func (m *Metrics) ObserveCall(method string, code codes.Code, d time.Duration) {
	m.calls.WithLabelValues(method, code.String()).Observe(d.Seconds())
}

// EventPublished counts a published event.
func (m *Metrics) EventPublished(kind string) { m.published.WithLabelValues(kind).Inc() }

// ReplayServed counts a replay request.
func (m *Metrics) ReplayServed() { m.replays.Inc() }

// JournalSynced records a journal fsync and the journal's size.
func (m *Metrics) JournalSynced(d time.Duration, bytes int64) {
	m.fsync.Observe(d.Seconds())
	m.journal.Set(float64(bytes))
}

// CurveClientsFileFailed counts a clients file that revoked every key.
func (m *Metrics) CurveClientsFileFailed() { m.curveFile.Inc() }

// CurveRefused counts a refused CURVE handshake.
func (m *Metrics) CurveRefused() { m.curveRefuse.Inc() }

// Subscribers adds delta to the subscriber count.
func (m *Metrics) Subscribers(delta int) { m.subscribers.Add(float64(delta)) }

// FlushDone records a volume flush.
func (m *Metrics) FlushDone(d time.Duration) { m.flush.Observe(d.Seconds()) }

// Serve answers /metrics and /healthz on addr until ctx ends. ready reports
// health (nil: healthy).
func (m *Metrics) Serve(ctx context.Context, addr string, ready func() error) error {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := ready(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	klog.InfoS("serving metrics and health", "address", ln.Addr().String())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
