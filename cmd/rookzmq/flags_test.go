package main

import (
	"strings"
	"testing"
	"time"
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

// --repair-interval: 30 s by default, 0 turns the loop off, negative is refused.
func TestRepairIntervalFlag(t *testing.T) {
	base := []string{"--node", "--nodeid", "n"}
	for arg, want := range map[string]time.Duration{"": 30 * time.Second, "--repair-interval=0": 0, "--repair-interval=5s": 5 * time.Second} {
		args := base
		if arg != "" {
			args = append(args, arg)
		}
		f, err := parseServeFlags(args)
		if err != nil || f.repairInterval != want {
			t.Errorf("%q: %v %v, want %s", arg, f, err, want)
		}
	}
	if _, err := parseServeFlags(append(base, "--repair-interval=-1s")); err == nil {
		t.Error("a negative --repair-interval is accepted")
	}
}
