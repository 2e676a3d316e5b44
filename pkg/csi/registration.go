package csi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// DefaultRegistrationDir is the directory kubelet's plugin watcher scans.
const DefaultRegistrationDir = "/var/lib/kubelet/plugins_registry"

// Registrar registers one CSI driver with kubelet, as node-driver-registrar
// would: it serves kubelet's plugin-registration API on <Dir>/<Driver>-reg.sock.
type Registrar struct {
	// Dir is kubelet's plugin registration directory.
	Dir string
	// Driver is the CSI driver name kubelet registers.
	Driver string
	// Endpoint is the CSI socket path kubelet dials for this driver.
	Endpoint string
	// Check is how often the socket is checked for removal (default 2s).
	Check time.Duration

	mu     sync.Mutex
	status *RegistrationStatus
}

// RegistrationStatus is what kubelet last reported through NotifyRegistrationStatus.
type RegistrationStatus struct {
	Registered bool
	Error      string
	At         time.Time
}

// SocketPath is where the registration socket lives.
func (r *Registrar) SocketPath() string {
	return filepath.Join(r.Dir, r.Driver+"-reg.sock")
}

// Status returns kubelet's last report, or nil before the first one.
func (r *Registrar) Status() *RegistrationStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.status == nil {
		return nil
	}
	s := *r.status
	return &s
}

// Run serves the registration socket until ctx ends, then removes it. A stale
// socket is replaced; when the socket or kubelet's directory disappears (kubelet
// reset), it is created again once kubelet's directory exists, so that kubelet
// registers the driver anew.
func (r *Registrar) Run(ctx context.Context) error {
	if r.Dir == "" || r.Driver == "" || r.Endpoint == "" {
		return errors.New("registrar: Dir, Driver and Endpoint are required")
	}
	every := r.Check
	if every <= 0 {
		every = 2 * time.Second
	}
	for {
		if !r.waitDir(ctx, every) {
			return nil
		}
		srv, ino, err := r.listen()
		if err != nil {
			return err
		}
		klog.InfoS("kubelet registration socket ready", "driver", r.Driver, "socket", r.SocketPath(), "endpoint", r.Endpoint)
		gone := r.waitGone(ctx, ino, every)
		srv.Stop()
		if !gone {
			if err := os.Remove(r.SocketPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
				klog.ErrorS(err, "removing the registration socket", "socket", r.SocketPath())
			}
			return nil
		}
		klog.InfoS("kubelet registration socket disappeared: creating it again", "driver", r.Driver, "socket", r.SocketPath())
	}
}

// waitDir waits for kubelet's directory: the registrar never creates it, so
// a node plugin started where no kubelet runs leaves nothing behind.
func (r *Registrar) waitDir(ctx context.Context, every time.Duration) bool {
	logged := false
	for {
		if fi, err := os.Stat(r.Dir); err == nil && fi.IsDir() {
			return true
		}
		if !logged {
			klog.InfoS("waiting for kubelet's plugin registration directory", "dir", r.Dir, "driver", r.Driver)
			logged = true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(every):
		}
	}
}

// listen removes a stale socket and serves a new one; it returns the socket's
// identity so that waitGone can tell it from a replacement.
func (r *Registrar) listen() (*grpc.Server, os.FileInfo, error) {
	path := r.SocketPath()
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, nil, fmt.Errorf("registrar: %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, nil, fmt.Errorf("registrar: removing stale socket: %w", err)
		}
		klog.V(2).InfoS("removed stale registration socket", "socket", path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, nil, fmt.Errorf("registrar: %w", err)
	}
	// Run removes the file itself, and only when it is still ours.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	fi, err := os.Lstat(path)
	if err != nil {
		l.Close()
		return nil, nil, fmt.Errorf("registrar: %w", err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registrationServer{r: r})
	go func() {
		if err := srv.Serve(l); err != nil {
			klog.ErrorS(err, "registration socket stopped serving", "socket", path)
		}
	}()
	return srv, fi, nil
}

// waitGone returns true when the socket file stops being the one listened on,
// false when ctx ends first.
func (r *Registrar) waitGone(ctx context.Context, ino os.FileInfo, every time.Duration) bool {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			fi, err := os.Lstat(r.SocketPath())
			if err != nil || !os.SameFile(fi, ino) {
				return true
			}
		}
	}
}

type registrationServer struct {
	registerapi.UnimplementedRegistrationServer
	r *Registrar
}

// GetInfo tells kubelet the driver's name and CSI socket.
func (s *registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	klog.V(4).InfoS("kubelet asked for plugin info", "driver", s.r.Driver)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.r.Driver,
		Endpoint:          s.r.Endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

// NotifyRegistrationStatus records and logs kubelet's verdict.
func (s *registrationServer) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	s.r.mu.Lock()
	s.r.status = &RegistrationStatus{Registered: st.GetPluginRegistered(), Error: st.GetError(), At: time.Now()}
	s.r.mu.Unlock()
	if st.GetPluginRegistered() {
		klog.InfoS("kubelet registered the driver", "driver", s.r.Driver)
	} else {
		klog.ErrorS(errors.New(st.GetError()), "kubelet refused to register the driver", "driver", s.r.Driver)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}
