package csi

import (
	"slices"
	"testing"
)

func TestMountOptionsReadOnlyLast(t *testing.T) {
	for _, c := range []struct {
		flags []string
		ro    bool
		want  []string
	}{
		{[]string{"rw", "noatime"}, true, []string{"noatime", "ro"}},
		{[]string{"noatime", "rw"}, true, []string{"noatime", "ro"}},
		{nil, true, []string{"ro"}},
		{[]string{"rw", "noatime"}, false, []string{"rw", "noatime"}},
	} {
		got := MountOptions(c.flags, c.ro)
		if !slices.Equal(got, c.want) {
			t.Errorf("MountOptions(%v, %v) = %v, want %v", c.flags, c.ro, got, c.want)
		}
	}
}
