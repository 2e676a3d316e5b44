package rbd

import (
	"bytes"
	"encoding/json"
	"fmt"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// findMapped picks the device of spec's image from `rbd device list` JSON
// output ("" if the image is not in it); output that does not parse is an
// error, never "not mapped".
func findMapped(out []byte, spec ImageSpec) (string, error) {
	var list []struct {
		Pool      string `json:"pool"`
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
		Image     string `json:"image"`
		Snap      string `json:"snap"`
		Device    string `json:"device"`
	}
	if len(bytes.TrimSpace(out)) == 0 {
		return "", nil // nothing mapped: some versions print nothing at all
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return "", fmt.Errorf("cannot parse the device list %q: %v", rcsi.LastLine(out), err)
	}
	for _, d := range list {
		name := d.Name
		if name == "" {
			name = d.Image
		}
		if d.Pool == spec.Pool && d.Namespace == spec.Namespace && name == spec.Image && (d.Snap == "" || d.Snap == "-") {
			return d.Device, nil
		}
	}
	return "", nil
}

// spec names the mapped image (for finding its device).
func (m Mapping) spec() ImageSpec {
	return ImageSpec{Pool: m.Pool, Namespace: m.Namespace, Image: m.Image}
}
