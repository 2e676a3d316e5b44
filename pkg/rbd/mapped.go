package rbd

import "encoding/json"

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
