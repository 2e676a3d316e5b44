package main

import (
	"context"
	"fmt"

	"k8s.io/klog/v2"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// registerWithKubelet serves kubelet's plugin registration for the node
// plugin's drivers (see registrations) in the background until ctx ends. An
// empty --registration-dir disables it.
func registerWithKubelet(ctx context.Context, f *serveFlags) error {
	if !f.node || f.registrationDir == "" {
		return nil
	}
	for _, d := range registrations(f) {
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

// registrations lists the drivers (name, endpoint) this node plugin serves:
// its own and, with --type=rbd and an --events-endpoint, events.rookzmq.io.
// A CephFS node plugin serves no event volumes, so it must not register (and
// so replace) the name an RBD node plugin on the same node registered.
func registrations(f *serveFlags) [][2]string {
	drivers := [][2]string{{f.driverName, f.endpoint}}
	if f.eventsEndpoint != "" && f.driverType == "rbd" {
		drivers = append(drivers, [2]string{rcsi.PodEventsDriverName, f.eventsEndpoint})
	}
	return drivers
}
