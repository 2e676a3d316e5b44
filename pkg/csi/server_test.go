package csi

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// slowProbe blocks until its call is canceled, then takes a while to return.
type slowProbe struct {
	Identity
	started, returned atomic.Bool
}

func (p *slowProbe) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	p.started.Store(true)
	<-ctx.Done()
	time.Sleep(150 * time.Millisecond) // e.g. an event being journaled
	p.returned.Store(true)
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

// Stop returns only once the handlers of canceled calls have returned, so
// what they use can be closed after it.
func TestStopWaitsForHandlers(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "csi.sock")
	p := &slowProbe{}
	s, err := Listen("unix://"+sock, nil, func(g *grpc.Server) { csi.RegisterIdentityServer(g, p) })
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	go csi.NewIdentityClient(conn).Probe(context.Background(), &csi.ProbeRequest{})
	for deadline := time.Now().Add(5 * time.Second); !p.started.Load(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the call never reached the handler")
		}
	}
	s.Stop(300 * time.Millisecond)
	if !p.returned.Load() {
		t.Fatal("Stop returned while a handler was still running")
	}
}
