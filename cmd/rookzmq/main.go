// Command rookzmq is the rookzmq CSI driver for Ceph (controller and/or node
// plugin in one binary) and its client subcommands.
//
//	rookzmq [flags]        serve the CSI driver
//	rookzmq demo [flags]   walk one volume through its life over the CSI API
//	rookzmq events ...     subscribe to, replay and flush node events
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"

	"github.com/rookzmq/rookzmq/pkg/cephfs"
	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
	"github.com/rookzmq/rookzmq/pkg/rbd"
	"github.com/rookzmq/rookzmq/pkg/zmqbridge"
)

// cephfsDriverName is the default driver name with --type=cephfs.
const cephfsDriverName = "cephfs.rookzmq.io"

// version is set at build time (-ldflags -X main.version=...).
var version = "dev"

func main() { os.Exit(run(os.Args[1:])) }

// run is the command line; it returns the exit status (0 for --help).
func run(args []string) int {
	if err := harden(); err != nil {
		fmt.Fprintf(os.Stderr, "rookzmq: %v\n", err)
		return 1
	}
	if len(args) > 0 {
		switch args[0] {
		case "demo":
			return runDemo(args[1:])
		case "events":
			return runEvents(args[1:])
		case "version", "--version":
			fmt.Println(version)
			return 0
		}
	}
	if err := serve(args); errors.Is(err, flag.ErrHelp) {
		return 0
	} else if err != nil {
		klog.ErrorS(err, "rookzmq failed")
		klog.Flush()
		return 1
	}
	return 0
}

type serveFlags struct {
	driverType, driverName, endpoint, nodeID, clusters string
	defaultMounter, stateDir, credentialsDir           string
	cephCSIInstance                                    string
	controller, node                                   bool
	eventsDir, eventsMode, eventsEndpoint              string
	eventsHeartbeat, eventsJournalAge                  time.Duration
	metricsAddress, registrationDir                    string
	eventsTCP, eventsServerKey, eventsClients          string
	eventsJournalBytes                                 int64
	eventsJournalKeep                                  int
	kubeconfig                                         string
	cephfsCapsRecheck                                  time.Duration
	fuseCgroup                                         string
	repairInterval                                     time.Duration
	eventsMaxEndpoints, eventsMaxPodEndpoints          int
}

func parseServeFlags(args []string) (*serveFlags, error) {
	fs := flag.NewFlagSet("rookzmq", flag.ContinueOnError)
	klog.InitFlags(fs)
	f := &serveFlags{}
	fs.StringVar(&f.driverType, "type", "rbd", "volume type to serve: rbd or cephfs")
	fs.StringVar(&f.driverName, "drivername", "rbd.rookzmq.io", "CSI driver name (default rbd.rookzmq.io, or cephfs.rookzmq.io with --type=cephfs)")
	fs.BoolVar(&f.controller, "controller", false, "serve the CSI Controller service")
	fs.BoolVar(&f.node, "node", false, "serve the CSI Node service")
	fs.StringVar(&f.endpoint, "endpoint", "", "CSI endpoint (unix:///path.sock or tcp://host:port; default unix:///var/lib/kubelet/plugins/<drivername>/csi.sock)")
	fs.StringVar(&f.nodeID, "nodeid", "", "this node's name (required with --node)")
	fs.StringVar(&f.clusters, "clusters", "/etc/rookzmq/config.json", "clusters file (ceph-csi config.json format)")
	fs.StringVar(&f.defaultMounter, "default-mounter", "", "mounter for volumes whose StorageClass names none: krbd (default), rbd-nbd or rbd-fuse; with --type=cephfs fuse (default) or kernel")
	fs.StringVar(&f.stateDir, "statedir", "", "node state directory that survives restarts (default /var/lib/rookzmq/<drivername>)")
	fs.StringVar(&f.credentialsDir, "credentials-dir", "", "directory of <clusterID>/userID and <clusterID>/userKey files for calls without secrets (ListVolumes, GetCapacity; with --type=cephfs the provisioning user, also used to resume promised removals at start)")
	fs.StringVar(&f.cephCSIInstance, "cephcsi-instance-id", rbd.DefaultCephCSIInstance, "--instanceid of the ceph-csi whose volumes are adopted (its journal is csi.volumes.<ID>)")
	fs.StringVar(&f.eventsDir, "events-dir", "", "node event endpoints and journal (default /var/lib/kubelet/plugins/<drivername>/events)")
	fs.StringVar(&f.eventsEndpoint, "events-endpoint", "unix:///var/lib/kubelet/plugins/events.rookzmq.io/csi.sock", "CSI endpoint of the per-pod event volume driver (events.rookzmq.io); empty disables it")
	fs.StringVar(&f.registrationDir, "registration-dir", rcsi.DefaultRegistrationDir, "kubelet's plugin registration directory, where the node plugin registers its drivers; empty disables")
	fs.StringVar(&f.metricsAddress, "metrics-address", "", "serve Prometheus /metrics and /healthz on this address (e.g. 127.0.0.1:9090); empty disables")
	fs.StringVar(&f.eventsTCP, "events-tcp", "", "HOST:PORT of the CURVE-encrypted TCP event endpoint (events on PORT, control on PORT+1); empty disables")
	fs.StringVar(&f.eventsServerKey, "events-curve-server-key", "", "file holding the TCP endpoint's Z85 CURVE secret key (a mounted Secret)")
	fs.StringVar(&f.eventsClients, "events-curve-clients", "", "file listing authorised client keys and their namespaces (a mounted Secret; reloaded on change)")
	fs.StringVar(&f.eventsMode, "events-mode", "0600", "mode of the node-wide event socket files (a pod's sockets are always 0666)")
	fs.DurationVar(&f.eventsHeartbeat, "events-heartbeat", time.Second, "event heartbeat interval")
	fs.Int64Var(&f.eventsJournalBytes, "events-journal-bytes", 256<<20, "event journal size limit (oldest segments dropped)")
	fs.DurationVar(&f.eventsJournalAge, "events-journal-age", 7*24*time.Hour, "event journal age limit")
	fs.IntVar(&f.eventsJournalKeep, "events-journal-keep", zmqbridge.DefaultKeepPerNamespace, "newest events of each namespace kept when retention drops their journal segment (0: none)")
	fs.IntVar(&f.eventsMaxEndpoints, "events-max-endpoints", zmqbridge.DefaultMaxEndpoints, "most per-pod event endpoints (events.rookzmq.io volumes) on this node")
	fs.IntVar(&f.eventsMaxPodEndpoints, "events-max-pod-endpoints", rcsi.DefaultMaxPodEndpoints, "most event endpoints (events.rookzmq.io volumes) of one pod")
	fs.DurationVar(&f.cephfsCapsRecheck, "cephfs-caps-recheck", cephfs.DefaultCapsRecheck, "with --type=cephfs: how long a provisioner user without the MDS caps of the fast path (ceph-csi's caps) provisions through the mgr volumes module before its caps are probed again")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig to verify pods with the API server before serving their event endpoints (default: in-cluster config when running in a cluster; none outside)")
	fs.StringVar(&f.fuseCgroup, "fuse-cgroup", "", "cgroup (a directory at the root of every cgroup hierarchy) the node plugin moves its FUSE daemons (rbd-fuse, ceph-fuse) into, so they outlive its container; needs the host's PID namespace and /sys/fs/cgroup. Empty: they stay in the plugin's cgroup and die with its container")
	fs.DurationVar(&f.repairInterval, "repair-interval", 30*time.Second, "how often the node plugin checks its staged volumes while it runs: one whose FUSE daemon died is mounted again in place (CephFS) and its pods' targets bound again, daemons are kept in --fuse-cgroup; 0 disables (the check at start still runs)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	switch f.driverType {
	case "rbd":
	case "cephfs":
		if !set["drivername"] {
			f.driverName = cephfsDriverName
		}
	default:
		return nil, fmt.Errorf("--type=%s is not supported (rbd or cephfs)", f.driverType)
	}
	if !f.controller && !f.node {
		return nil, errors.New("nothing to serve: give --controller, --node or both")
	}
	if f.node && f.nodeID == "" {
		return nil, errors.New("--nodeid is required with --node")
	}
	if f.endpoint == "" {
		f.endpoint = "unix://" + filepath.Join("/var/lib/kubelet/plugins", f.driverName, "csi.sock")
	}
	if f.eventsDir == "" {
		f.eventsDir = filepath.Join("/var/lib/kubelet/plugins", f.driverName, "events")
	}
	if _, err := strconv.ParseUint(f.eventsMode, 8, 32); err != nil {
		return nil, fmt.Errorf("--events-mode=%s is not an octal mode", f.eventsMode)
	}
	if f.repairInterval < 0 {
		return nil, errors.New("--repair-interval must not be negative")
	}
	if f.eventsJournalKeep < 0 {
		return nil, errors.New("--events-journal-keep must not be negative")
	}
	if f.eventsMaxEndpoints < 1 || f.eventsMaxPodEndpoints < 1 {
		return nil, errors.New("--events-max-endpoints and --events-max-pod-endpoints must be at least 1")
	}
	if f.cephfsCapsRecheck <= 0 {
		return nil, fmt.Errorf("--cephfs-caps-recheck=%s must be positive", f.cephfsCapsRecheck)
	}
	if f.eventsTCP != "" && (f.eventsServerKey == "" || f.eventsClients == "") {
		return nil, errors.New("--events-tcp needs --events-curve-server-key and --events-curve-clients")
	}
	if f.stateDir == "" {
		f.stateDir = filepath.Join("/var/lib/rookzmq", f.driverName)
	}
	if err := rbd.CheckCephCSIInstance(f.cephCSIInstance); err != nil {
		return nil, fmt.Errorf("--cephcsi-instance-id: %w", err)
	}
	switch {
	case f.driverType == "rbd":
		if f.defaultMounter == "" {
			f.defaultMounter = rbd.MounterKRBD
		}
		if _, err := rbd.ParseMounterName(f.defaultMounter); err != nil {
			return nil, fmt.Errorf("--default-mounter: %w", err)
		}
	case f.node: // a CephFS controller alone mounts nothing
		m, err := cephfs.ParseMounterName(f.defaultMounter)
		if err != nil {
			return nil, fmt.Errorf("--default-mounter: %w (--type=cephfs: fuse or kernel)", err)
		}
		if m == "" {
			m = cephfs.MounterFuse
		}
		f.defaultMounter = m
	}
	if err := rcsi.CheckDaemonCgroupName(f.fuseCgroup); err != nil {
		return nil, fmt.Errorf("--fuse-cgroup: %w", err)
	}
	if f.fuseCgroup != "" && f.node && os.Getpid() == 1 {
		// PID 1 of its own PID namespace: the kernel kills every process in
		// it when this one exits, whatever their cgroup.
		return nil, errors.New("--fuse-cgroup: the node plugin is PID 1 of its own PID namespace, so its FUSE daemons would die with it: run it in the host's (hostPID: true)")
	}
	return f, nil
}

func serve(args []string) error {
	f, err := parseServeFlags(args)
	if err != nil {
		return err
	}
	clusters, err := rcsi.NewClusters(f.clusters)
	if err != nil {
		return err
	}
	conns := &rcsi.Conns{}
	defer conns.Close()
	metrics := rcsi.NewMetrics()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var controller *rbd.Controller
	var cephfsController *cephfs.Controller
	if f.controller && f.driverType == "cephfs" {
		// The MDS session a killed process left is reclaimed by its
		// restart (same pod: same host name and endpoint), never by
		// another replica, whose live session a reclaim would reset.
		host, _ := os.Hostname()
		mounts := &cephfs.Mounts{Conns: conns, Instance: f.driverName + "\x00" + host + "\x00" + f.endpoint}
		defer mounts.Close()
		cephfsController = &cephfs.Controller{Clusters: clusters, Conns: conns, Mounts: mounts, Known: &rcsi.KnownCredentials{Dir: f.credentialsDir},
			CapsRecheck: f.cephfsCapsRecheck}
		go cephfsController.ResumePurges()
	} else if f.controller {
		controller = &rbd.Controller{Clusters: clusters, Conns: conns, Known: &rcsi.KnownCredentials{Dir: f.credentialsDir},
			CephCSIInstance: f.cephCSIInstance}
	}
	var node nodeService
	healthy := func() error { return nil }
	if f.node {
		sink := &rcsi.BridgeSink{Driver: f.driverName, Metrics: metrics}
		var daemons *rcsi.DaemonCgroup
		if f.fuseCgroup != "" {
			daemons = &rcsi.DaemonCgroup{Name: f.fuseCgroup}
		}
		if f.driverType == "cephfs" {
			mounts := &cephfs.Mounts{Conns: conns}
			if cephfsController != nil {
				mounts = cephfsController.Mounts
			} else {
				defer mounts.Close()
			}
			node, err = cephfs.NewNode(cephfs.NodeConfig{NodeID: f.nodeID, Clusters: clusters, DefaultMounter: f.defaultMounter,
				StateDir: f.stateDir, Events: sink, Mounts: mounts, Daemons: daemons})
		} else {
			node, err = rbd.NewNode(rbd.NodeConfig{NodeID: f.nodeID, Clusters: clusters, DefaultMounter: f.defaultMounter, StateDir: f.stateDir,
				Events: sink, Conns: conns, Daemons: daemons})
		}
		if err != nil {
			return err
		}
		mode, _ := strconv.ParseUint(f.eventsMode, 8, 32)
		curve, err := curveOptions(f)
		if err != nil {
			return err
		}
		sink.Volumes = node
		sink.Seed() // before the bridge serves flushes
		bridge, err := zmqbridge.New(zmqbridge.Options{
			MaxEndpoints: f.eventsMaxEndpoints,
			Curve:        curve,
			Dir:          f.eventsDir, SocketMode: os.FileMode(mode), Node: f.nodeID, Driver: f.driverName,
			Heartbeat: f.eventsHeartbeat, Flusher: sink, Metrics: metrics,
			Journal: zmqbridge.JournalOptions{MaxBytes: f.eventsJournalBytes, MaxAge: f.eventsJournalAge, KeepPerClass: keepPerClass(f.eventsJournalKeep)},
		})
		if err != nil {
			return err
		}
		defer bridge.Close()
		healthy = func() error {
			if err := bridge.Healthy(); err != nil {
				return err
			}
			return node.Ready()
		}
		sink.Bridge = bridge
		node.ResumeAckTimers()
		// Before the node reports ready: ceph-fuse mounts whose daemon died
		// while the driver was down are remounted and their targets bound
		// again; the rbd-fuse daemons of working stages are moved into
		// --fuse-cgroup if a plugin that stopped early left them elsewhere.
		recovered := node.RecoverInBackground(ctx)
		if f.repairInterval > 0 {
			go func() {
				<-recovered
				node.RepairEvery(ctx, f.repairInterval)
			}()
		}

		// One plugin per node serves events.rookzmq.io (its socket and
		// driver name are the node's): the RBD one. CephFS volumes have the
		// node-wide endpoints only, so far.
		if f.eventsEndpoint != "" && f.driverType == "rbd" {
			pods, err := rcsi.NewAPIPods(f.kubeconfig, f.nodeID)
			if err != nil {
				return err
			}
			if pods == nil {
				klog.InfoS("not in a cluster and no --kubeconfig: pods are not verified with the API server before their event endpoints are served")
			}
			podEvents := &rcsi.PodEvents{NodeID: f.nodeID, Bridge: bridge, Dir: filepath.Join(f.eventsDir, "p"), PodVolumes: node.PodVolumes,
				MaxPerPod: f.eventsMaxPodEndpoints}
			if pods != nil {
				podEvents.Pods = pods
			}
			if err := podEvents.Start(); err != nil {
				return err
			}
			evSrv, err := rcsi.Listen(f.eventsEndpoint, metrics.ObserveCall, func(s *grpc.Server) {
				csi.RegisterIdentityServer(s, &rcsi.Identity{Name: rcsi.PodEventsDriverName, Version: version})
				csi.RegisterNodeServer(s, podEvents)
			})
			if err != nil {
				return err
			}
			go evSrv.Serve()
			defer evSrv.Stop(5 * time.Second)
		}
	}
	identity := &rcsi.Identity{Name: f.driverName, Version: version, Controller: f.controller, Expansion: true}
	if node != nil {
		identity.Ready = func(context.Context) error { return node.Ready() }
	}
	srv, err := rcsi.Listen(f.endpoint, metrics.ObserveCall, func(s *grpc.Server) {
		csi.RegisterIdentityServer(s, identity)
		if controller != nil {
			csi.RegisterControllerServer(s, controller)
		}
		if cephfsController != nil {
			csi.RegisterControllerServer(s, cephfsController)
		}
		if node != nil {
			csi.RegisterNodeServer(s, node)
		}
	})
	if err != nil {
		return err
	}
	if err := registerWithKubelet(ctx, f); err != nil {
		srv.Stop(0)
		return err
	}
	if controller != nil {
		controller.ScanAtStart()
	}
	klog.InfoS("rookzmq serving", "version", version, "driver", f.driverName, "endpoint", f.endpoint,
		"controller", f.controller, "node", f.node, "nodeID", f.nodeID, "defaultMounter", f.defaultMounter)

	errc := make(chan error, 1)
	if f.metricsAddress != "" {
		go func() {
			ready := func() error {
				if err := healthy(); err != nil {
					return err
				}
				cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
				defer cancel()
				if err := conns.Check(cctx); err != nil {
					return err
				}
				return probe(ctx, f.endpoint)
			}
			if err := metrics.Serve(ctx, f.metricsAddress, ready); err != nil {
				errc <- fmt.Errorf("metrics: %w", err)
			}
		}()
	}
	go func() { errc <- srv.Serve() }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		klog.InfoS("shutting down")
		srv.Stop(10 * time.Second)
		if controller != nil {
			controller.Drain(5 * time.Second)
		}
		return nil
	}
}

// nodeService is what serve needs of a driver's node service (rbd.Node,
// cephfs.Node: both the shared skeleton, rcsi.Node).
type nodeService interface {
	csi.NodeServer
	rcsi.FlushableVolumes
	PodVolumes(podUID string) []string
	ResumeAckTimers()
	Ready() error
	RecoverInBackground(ctx context.Context) <-chan struct{}
	RepairEvery(ctx context.Context, every time.Duration)
}

// probe calls the driver's own Identity.Probe, so /healthz reflects whether
// CSI calls are answered.
func probe(ctx context.Context, endpoint string) error {
	network, addr, err := rcsi.ParseEndpoint(endpoint)
	if err != nil {
		return err
	}
	target := addr
	if network == "unix" {
		target = "unix://" + addr
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	r, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		return err
	}
	if !r.GetReady().GetValue() {
		return errors.New("not ready")
	}
	return nil
}

// curveOptions turns --events-tcp and the key flags into the bridge's options.
func curveOptions(f *serveFlags) (*zmqbridge.CurveOptions, error) {
	if f.eventsTCP == "" {
		return nil, nil
	}
	host, portStr, err := net.SplitHostPort(f.eventsTCP)
	port, perr := strconv.Atoi(portStr)
	if err != nil || perr != nil || port < 1 || port > 65534 {
		return nil, fmt.Errorf("--events-tcp=%s: want HOST:PORT (PORT+1 is the control port)", f.eventsTCP)
	}
	return &zmqbridge.CurveOptions{Host: host, Port: port, ServerKeyFile: f.eventsServerKey, ClientsFile: f.eventsClients}, nil
}

// keepPerClass maps --events-journal-keep to JournalOptions.KeepPerClass, in
// which 0 means the default and a negative value none.
func keepPerClass(n int) int {
	if n == 0 {
		return -1
	}
	return n
}
