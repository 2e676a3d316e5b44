package cephfs

import (
	"reflect"
	"testing"
)

// What the mgr volumes module (Python configparser) writes for a subvolume
// with user metadata, byte for byte.
const mgrMeta = `[GLOBAL]
version = 2
type = subvolume
path = /volumes/csi/sv1/9b5c4f0e-4bd4-4a55-9d0b-7c38d0d1f6a8
state = complete

[USER_METADATA]
csi.storage.k8s.io/pv/name = pvc-1
csi.storage.k8s.io/pvc/name = data

`

func TestMetaMatchesConfigparser(t *testing.T) {
	meta := map[string]map[string]string{
		metaGlobal: {"state": "complete", "path": "/volumes/csi/sv1/9b5c4f0e-4bd4-4a55-9d0b-7c38d0d1f6a8", "version": "2", "type": "subvolume"},
		metaUser:   {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pv/name": "pvc-1"},
		"EMPTY":    {},
	}
	if got := formatMeta(meta); got != mgrMeta {
		t.Fatalf("formatMeta:\n%s\nwant:\n%s", got, mgrMeta)
	}
	delete(meta, "EMPTY")
	if got := parseMeta(mgrMeta); !reflect.DeepEqual(got, meta) {
		t.Fatalf("parseMeta = %v, want %v", got, meta)
	}
	// configparser also accepts ':' and lower-cases keys; continuation lines
	// and comments are skipped.
	got := parseMeta("[GLOBAL]\nVersion: 2\n  continued\n# c\n; c\nstate=complete\n")
	if got[metaGlobal]["version"] != "2" || got[metaGlobal]["state"] != "complete" || len(got[metaGlobal]) != 2 {
		t.Fatalf("parseMeta = %v", got)
	}
}

func TestRel(t *testing.T) {
	if p, err := rel("/volumes/csi/a/b"); err != nil || p != "/csi/a/b" {
		t.Fatalf("rel = %q, %v", p, err)
	}
	if _, err := rel("/elsewhere/a"); err == nil {
		t.Fatal("rel accepted a path outside /volumes")
	}
}
