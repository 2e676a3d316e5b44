package csi

import (
	"os"
	"syscall"

	"k8s.io/klog/v2"
)

// CrashPointEnv names the environment variable that makes the process kill
// itself (SIGKILL) at a named point, so tests can prove that a crash anywhere
// leaves nothing a retry would not clean up. Unset in production.
const CrashPointEnv = "ROOKZMQ_CRASH_AT"

var crashAt = os.Getenv(CrashPointEnv)

// CrashPoint SIGKILLs the process if name is the configured crash point.
func CrashPoint(name string) {
	if crashAt != "" && crashAt == name {
		klog.InfoS("crash point reached: killing myself", "point", name)
		klog.Flush()
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // never continue past the crash point
	}
}
