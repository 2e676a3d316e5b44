package main

import (
	"os"
	"os/exec"
	"testing"

	"golang.org/x/sys/unix"
)

// harden leaves the process without core files and not dumpable. It runs in a
// child (this test binary again) so the test process itself is untouched.
func TestHarden(t *testing.T) {
	if os.Getenv("ROOKZMQ_HARDEN_CHILD") == "1" {
		if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}); err != nil {
			t.Skipf("cannot raise RLIMIT_CORE to start from a dumping process: %v", err)
		}
		if err := harden(); err != nil {
			t.Fatal(err)
		}
		var lim unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_CORE, &lim); err != nil || lim.Cur != 0 || lim.Max != 0 {
			t.Fatalf("RLIMIT_CORE after harden: %+v %v, want 0/0", lim, err)
		}
		d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
		if err != nil || d != 0 {
			t.Fatalf("PR_GET_DUMPABLE after harden: %d %v, want 0", d, err)
		}
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestHarden$", "-test.v")
	cmd.Env = append(os.Environ(), "ROOKZMQ_HARDEN_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Logf("%s", out)
}
