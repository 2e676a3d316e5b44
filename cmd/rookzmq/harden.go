package main

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// harden keeps this process's memory, which holds cephx keys, out of core
// files: no core at all (RLIMIT_CORE 0, so a crash in cgo code such as librbd
// writes none) and not dumpable (PR_SET_DUMPABLE 0: no core even if the
// limit is raised, and no ptrace attach or /proc/<pid>/mem read by other
// users). Tools the driver runs start dumpable again after exec; they get the
// key as a memfd, never in a file.
func harden() error {
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		return fmt.Errorf("setting RLIMIT_CORE to 0: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w", err)
	}
	return nil
}
