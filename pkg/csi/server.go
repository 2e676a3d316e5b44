package csi

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// CallObserver is told of every finished gRPC call, e.g. to record metrics.
type CallObserver func(method string, code codes.Code, d time.Duration)

// Server is a gRPC server on a unix socket (or TCP address) serving CSI services.
type Server struct {
	grpc     *grpc.Server
	listener net.Listener
	path     string
	calls    sync.WaitGroup // handlers running
}

// ParseEndpoint splits unix:///path.sock or tcp://host:port into network and address.
func ParseEndpoint(endpoint string) (network, addr string, err error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", "", fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	switch u.Scheme {
	case "unix":
		addr = u.Path
		if addr == "" {
			addr = u.Host + u.Path // unix://relative.sock
		}
		if addr == "" {
			return "", "", fmt.Errorf("endpoint %q: empty socket path", endpoint)
		}
		return "unix", addr, nil
	case "tcp":
		if u.Host == "" {
			return "", "", fmt.Errorf("endpoint %q: empty address", endpoint)
		}
		return "tcp", u.Host, nil
	}
	return "", "", fmt.Errorf("endpoint %q: scheme must be unix:// or tcp://", endpoint)
}

// Listen creates the listener (removing a stale unix socket) and a gRPC server
// whose calls are logged, secrets stripped, and recovered from panics. register
// adds the CSI services; Serve then blocks.
func Listen(endpoint string, observe CallObserver, register func(*grpc.Server)) (*Server, error) {
	network, addr, err := ParseEndpoint(endpoint)
	if err != nil {
		return nil, err
	}
	s := &Server{}
	if network == "unix" {
		if err := os.MkdirAll(filepath.Dir(addr), 0o750); err != nil {
			return nil, err
		}
		if err := os.Remove(addr); err != nil && !os.IsNotExist(err) {
			return nil, fmt.Errorf("removing stale socket %s: %w", addr, err)
		}
		s.path = addr
	}
	s.listener, err = net.Listen(network, addr)
	if err != nil {
		return nil, err
	}
	if s.path != "" {
		if err := os.Chmod(s.path, 0o600); err != nil {
			s.listener.Close()
			return nil, err
		}
	}
	s.grpc = grpc.NewServer(grpc.UnaryInterceptor(s.track(interceptor(observe))))
	register(s.grpc)
	return s, nil
}

// Serve answers calls until Stop.
func (s *Server) Serve() error { return s.grpc.Serve(s.listener) }

// Stop finishes running calls (at most grace long), then cancels the calls
// still running and waits for their handlers to return (at most grace
// again: what they use, e.g. the event bridge, is closed after Stop), and
// removes the socket.
func (s *Server) Stop(grace time.Duration) {
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		s.grpc.Stop() // cancels the calls' contexts; does not wait for handlers
	}
	handlers := make(chan struct{})
	go func() { s.calls.Wait(); close(handlers) }()
	select {
	case <-handlers:
	case <-time.After(grace):
		klog.InfoS("stopping with CSI calls still running", "waited", 2*grace)
	}
	if s.path != "" {
		os.Remove(s.path)
	}
}

// track counts the handlers running, for Stop.
func (s *Server) track(next grpc.UnaryServerInterceptor) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		s.calls.Add(1)
		defer s.calls.Done()
		return next(ctx, req, info, handler)
	}
}

func interceptor(observe CallObserver) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		start := time.Now()
		klog.V(4).InfoS("call", "method", info.FullMethod, "request", protosanitizer.StripSecrets(req))
		defer func() {
			if r := recover(); r != nil {
				klog.ErrorS(nil, "panic in CSI call", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
				err = status.Errorf(codes.Internal, "internal error in %s", info.FullMethod)
			}
			err = Status(err)
			code := status.Code(err)
			d := time.Since(start)
			if observe != nil {
				observe(info.FullMethod, code, d)
			}
			if err != nil {
				klog.ErrorS(err, "call failed", "method", info.FullMethod, "code", code, "duration", d)
			} else {
				klog.V(2).InfoS("call done", "method", info.FullMethod, "duration", d)
				klog.V(5).InfoS("reply", "method", info.FullMethod, "response", protosanitizer.StripSecrets(resp))
			}
		}()
		return handler(ctx, req)
	}
}
