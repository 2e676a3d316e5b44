package main

import (
	"context"
	"fmt"

	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// registerWithKubelet serves kubelet's plugin registration for the node
// plugin's drivers (the RBD driver and, when served, events.rookzmq.io) in
// the background until ctx ends. An empty --registration-dir disables it.
func registerWithKubelet(ctx context.Context, f *serveFlags) error {
	if !f.node || f.registrationDir == "" {
		return nil
	}
	drivers := [][2]string{{f.driverName, f.endpoint}}
	if f.eventsEndpoint != "" {
		drivers = append(drivers, [2]string{rcsi.PodEventsDriverName, f.eventsEndpoint})
	}
	for _, d := range drivers {
		network, path, err := rcsi.ParseEndpoint(d[1])
		if err != nil {
			return err
		}
		if network != "unix" {
			return fmt.Errorf("--registration-dir: kubelet needs a unix socket for %s, not %s", d[0], d[1])
		}
		r := &rcsi.Registrar{Dir: f.registrationDir, Driver: d[0], Endpoint: path}
		go func() {
			if err := r.Run(ctx); err != nil {
				klog.ErrorS(err, "kubelet registration stopped", "driver", r.Driver)
			}
		}()
	}
	return nil
}
