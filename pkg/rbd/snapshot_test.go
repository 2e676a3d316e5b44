package rbd

import (
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// A snapshot record reads back as written, made or not; other values are
// errors, never a record with made-up fields.
func TestSnapRecord(t *testing.T) {
	made := snapRecord{Source: "1-02-c1-03-rbd-00--csi-vol-x", Name: "snapshot-1", Ready: true, Size: 64 << 20, Created: time.Unix(1700000000, 123456789)}
	for _, r := range []snapRecord{made, {Source: made.Source, Name: made.Name}} {
		got, err := decodeSnapRecord(r.encode())
		if err != nil || got.Source != r.Source || got.Name != r.Name || got.Ready != r.Ready || got.Size != r.Size || !got.Created.Equal(r.Created) {
			t.Errorf("decode(encode(%+v)) = %+v, %v", r, got, err)
		}
	}
	for _, bad := range []string{"", "only-a-source", "a\nb\nc", "a\nb\nx\n1", "a\nb\n1\ny", "a\nb\n1\n2\n3"} {
		if r, err := decodeSnapRecord(bad); err == nil {
			t.Errorf("decode(%q) = %+v, want an error", bad, r)
		}
	}
}

// Snapshot class parameters: a name prefix, the source's cluster and pool,
// the provisioner's keys; anything else is refused, naming it.
func TestSnapshotPrefix(t *testing.T) {
	src := rcsi.VolumeID{ClusterID: "c1", Pool: "rbd", Name: "img"}
	for _, tc := range []struct {
		params map[string]string
		want   string // prefix, or a fragment of the error
		ok     bool
	}{
		{nil, DefaultSnapshotNamePrefix, true},
		{map[string]string{"snapshotNamePrefix": "team-a-", "clusterID": "c1", "pool": "rbd",
			"csi.storage.k8s.io/snapshotter-secret-name": "s"}, "team-a-", true},
		{map[string]string{"pool": "other"}, "cluster and pool", false},
		{map[string]string{"clusterID": "c2"}, "cluster and pool", false},
		{map[string]string{"snapshotNamePrefix": "-x"}, "not starting with '-'", false},
		{map[string]string{"snapshotNamePrefix": "a/b"}, "[A-Za-z0-9._-]", false},
		{map[string]string{"snapshotNamePrefix": ""}, "snapshotNamePrefix", false},
		{map[string]string{"zeta": "1", "alpha": "2"}, "unknown parameters alpha, zeta", false},
	} {
		got, err := snapshotPrefix(tc.params, src)
		switch {
		case tc.ok && (err != nil || got != tc.want):
			t.Errorf("snapshotPrefix(%v) = %q, %v; want %q", tc.params, got, err, tc.want)
		case !tc.ok && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("snapshotPrefix(%v) = %q, %v; want an error naming %q", tc.params, got, err, tc.want)
		}
	}
}

// Content sources: a malformed ID names nothing (NotFound), a source in
// another cluster or of no kind is InvalidArgument.
func TestParseContentSource(t *testing.T) {
	snap := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
	}
	vol := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	ok := rcsi.VolumeID{ClusterID: "c1", Pool: "rbd", Name: "csi-snap-1"}.String()
	for _, tc := range []struct {
		cs   *csi.VolumeContentSource
		code codes.Code
	}{
		{snap(ok), codes.OK},
		{vol(ok), codes.OK},
		{snap("garbage"), codes.NotFound},
		{vol("garbage"), codes.NotFound},
		{snap(""), codes.InvalidArgument},
		{snap(rcsi.VolumeID{ClusterID: "c2", Pool: "rbd", Name: "x"}.String()), codes.InvalidArgument},
		{&csi.VolumeContentSource{}, codes.InvalidArgument},
	} {
		src, err := parseContentSource(tc.cs, "c1")
		if status.Code(err) != tc.code || (err == nil && (src == nil || src.id.Name == "")) {
			t.Errorf("parseContentSource(%v) = %+v, %v; want %v", tc.cs, src, err, tc.code)
		}
	}
	if src, err := parseContentSource(nil, "c1"); src != nil || err != nil {
		t.Errorf("no content source: %+v, %v", src, err)
	}
}
