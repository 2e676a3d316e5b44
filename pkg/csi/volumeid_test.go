package csi

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

func TestVolumeIDRoundTrip(t *testing.T) {
	for _, v := range []VolumeID{
		{ClusterID: "c1", Pool: "rbd", Name: "csi-vol-0b7a1c1e-1d2e-4f3a-9b8c-7d6e5f4a3b2c"},
		{ClusterID: "a-b-c", Pool: "p-1", Namespace: "ns-2", Name: "x-y"},
		{ClusterID: "c", Pool: "p", Namespace: "", Name: "a-"},
		{ClusterID: "C_1.x", Pool: "P.o_o-l", Namespace: "n.s_9", Name: "I.m_g-0"},
	} {
		s := v.String()
		got, err := ParseVolumeID(s)
		if err != nil {
			t.Fatalf("ParseVolumeID(%q): %v", s, err)
		}
		if got != v {
			t.Fatalf("round trip of %+v gave %+v", v, got)
		}
	}
}

func TestVolumeIDFormat(t *testing.T) {
	v := VolumeID{ClusterID: "c1", Pool: "rbd", Namespace: "ns", Name: "img"}
	if got, want := v.String(), "1-02-c1-03-rbd-02-ns-img"; got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
}

func TestParseVolumeIDRejects(t *testing.T) {
	for _, s := range []string{
		"", "reallyfakevolumeid", "1-", "1-02-c1", "1-02-c1-03-rbd-00-", "2-02-c1-03-rbd-00--img",
		"1-0A-c1-03-rbd-00--img", "1-zz-c1-03-rbd-00--img", "1-05-c1-03-rbd-00--img",
		"1-00--03-rbd-00--img", "1-02-c1-00--00--img", "1-02-c1-03-rbd-00--a/b", "1-02-c1-16---log-file=/some/path-00--img", "1-02-c1-03-rbd-00---o",
		"1-02-c1-03-rbd-00--" + strings.Repeat("x", 120),
	} {
		if v, err := ParseVolumeID(s); err == nil {
			t.Errorf("ParseVolumeID(%q) = %+v, want an error", s, v)
		}
	}
}

// Every field reaches a Ceph tool's command line: only [A-Za-z0-9._-] without a
// leading '-' is accepted, so no field can be read as an option.
func TestVolumeIDFieldsRefused(t *testing.T) {
	for _, v := range []VolumeID{
		{ClusterID: "c1", Pool: "--log-file=/some/path", Name: "img"},
		{ClusterID: "c1", Pool: "-p", Name: "img"},
		{ClusterID: "-c", Pool: "rbd", Name: "img"},
		{ClusterID: "c1", Pool: "rbd", Namespace: "--namespace=x", Name: "img"},
		{ClusterID: "c1", Pool: "rbd", Name: "-o"},
		{ClusterID: "c1", Pool: "rbd", Name: "a b"},
		{ClusterID: "c1", Pool: "rbd", Name: "a/b"},
		{ClusterID: "c1", Pool: "rbd", Name: "a@snap"},
		{ClusterID: "c1", Pool: "rb=d", Name: "img"},
		{ClusterID: "c1", Pool: "rbd", Namespace: "n,s", Name: "img"},
		{ClusterID: "c/1", Pool: "rbd", Name: "img"},
		{ClusterID: "c1", Pool: "rbd", Name: "im\x00g"},
		{ClusterID: "c1", Pool: "rbd", Name: "imäg"},
	} {
		if err := v.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil, want an error", v)
		}
		if got, err := ParseVolumeID(v.String()); err == nil {
			t.Errorf("ParseVolumeID(%q) = %+v, want an error", v.String(), got)
		}
	}
}

func TestVolumeIDValidateLength(t *testing.T) {
	v := VolumeID{ClusterID: "c1", Pool: "rbd", Name: strings.Repeat("n", 120)}
	if err := v.Validate(); err == nil || !strings.Contains(err.Error(), "CSI limit") {
		t.Fatalf("Validate() = %v, want a length error", err)
	}
}

func FuzzParseVolumeID(f *testing.F) {
	f.Add("1-02-c1-03-rbd-00--csi-vol-1")
	f.Add("1-02-c1-03-rbd-02-ns-img")
	f.Add("1-ff-")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseVolumeID(s)
		if err != nil {
			return
		}
		// Whatever decodes must re-encode to exactly the same string.
		if got := v.String(); got != s {
			t.Fatalf("ParseVolumeID(%q) re-encodes as %q", s, got)
		}
	})
}

// docs/volume-id.md states how many bytes cluster ID, pool and namespace may
// use together with the default volumeNamePrefix: exactly what fits.
func TestVolumeIDDocumentedBudget(t *testing.T) {
	b, err := os.ReadFile("../../docs/volume-id.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`may use (\d+) bytes`).FindSubmatch(b)
	if m == nil {
		t.Fatal("docs/volume-id.md states no budget")
	}
	n, _ := strconv.Atoi(string(m[1]))
	name := "csi-vol-" + "0b7a1c1e-1d2e-4f3a-9b8c-7d6e5f4a3b2c" // 44 bytes
	fits := func(total int) bool {
		id := VolumeID{ClusterID: strings.Repeat("c", total/3), Pool: strings.Repeat("p", total/3), Namespace: strings.Repeat("n", total-2*(total/3)), Name: name}
		return id.Validate() == nil
	}
	if !fits(n) || fits(n+1) {
		t.Errorf("docs say %d bytes; %d fit: %v, %d fit: %v", n, n, fits(n), n+1, fits(n+1))
	}
}
