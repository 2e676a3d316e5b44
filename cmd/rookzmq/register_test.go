package main

import (
	"reflect"
	"testing"
)

// The RBD node plugin registers its driver and events.rookzmq.io; a CephFS
// node plugin (which serves no event volumes) only its own driver.
func TestRegistrations(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want [][2]string
	}{
		{[]string{"--node", "--nodeid", "n"}, [][2]string{
			{"rbd.rookzmq.io", "unix:///var/lib/kubelet/plugins/rbd.rookzmq.io/csi.sock"},
			{"events.rookzmq.io", "unix:///var/lib/kubelet/plugins/events.rookzmq.io/csi.sock"},
		}},
		{[]string{"--node", "--nodeid", "n", "--events-endpoint", ""}, [][2]string{
			{"rbd.rookzmq.io", "unix:///var/lib/kubelet/plugins/rbd.rookzmq.io/csi.sock"},
		}},
		{[]string{"--node", "--nodeid", "n", "--type", "cephfs"}, [][2]string{
			{"cephfs.rookzmq.io", "unix:///var/lib/kubelet/plugins/cephfs.rookzmq.io/csi.sock"},
		}},
	} {
		f, err := parseServeFlags(tc.args)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if got := registrations(f); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%v: registers %v, want %v", tc.args, got, tc.want)
		}
	}
}
