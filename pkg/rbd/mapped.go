package rbd

import (
	"encoding/json"
	"os"
	"strings"
)

// findMapped picks the device of spec's image from `rbd device list` or
// `rbd-nbd list-mapped` JSON output.
func findMapped(out []byte, spec ImageSpec) string {
	var list []struct {
		Pool      string `json:"pool"`
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
		Image     string `json:"image"`
		Snap      string `json:"snap"`
		Device    string `json:"device"`
	}
	if json.Unmarshal(out, &list) != nil {
		return ""
	}
	for _, d := range list {
		name := d.Name
		if name == "" {
			name = d.Image
		}
		if d.Pool == spec.Pool && d.Namespace == spec.Namespace && name == spec.Image && (d.Snap == "" || d.Snap == "-") {
			return d.Device
		}
	}
	return ""
}

// toolEnv is the environment for Ceph CLI tools: the driver's own, less any
// Ceph settings that could override the arguments (CEPH_ARGS, CEPH_CONF,
// CEPH_KEYRING), plus an empty configuration file.
func toolEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CEPH_") {
			env = append(env, kv)
		}
	}
	return append(env, "CEPH_CONF=/dev/null")
}

// spec names the mapped image (for finding its device).
func (m Mapping) spec() ImageSpec {
	return ImageSpec{Pool: m.Pool, Namespace: m.Namespace, Image: m.Image}
}

// bootID identifies this boot of the node: mappings and mounts do not
// survive a reboot, stage records do.
func bootID() string {
	b, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	return strings.TrimSpace(string(b))
}
