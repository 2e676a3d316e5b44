package main

import (
	"strings"
	"testing"
)

// --fuse-cgroup takes one directory name; a path is refused.
func TestFuseCgroupFlag(t *testing.T) {
	for _, bad := range []string{"../x", "a/b", "."} {
		if _, err := parseServeFlags([]string{"--node", "--nodeid", "n", "--fuse-cgroup=" + bad}); err == nil || !strings.Contains(err.Error(), "--fuse-cgroup") {
			t.Errorf("--fuse-cgroup=%s: %v, want an error naming the flag", bad, err)
		}
	}
	f, err := parseServeFlags([]string{"--node", "--nodeid", "n", "--fuse-cgroup=rookzmq-fuse"})
	if err != nil || f.fuseCgroup != "rookzmq-fuse" {
		t.Fatalf("--fuse-cgroup=rookzmq-fuse: %v %v", f, err)
	}
}
