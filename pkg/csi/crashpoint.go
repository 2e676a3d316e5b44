package csi

import (
	"os"
	"syscall"
	"time"

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

// PausePointEnv names the environment variable that makes the process stop
// for PauseFor at a named point, so tests can change the cluster (blocklist a
// client, stop a daemon) while an operation is between two steps. Unset in
// production.
const PausePointEnv = "ROOKZMQ_PAUSE_AT"

// PauseFor is how long PausePoint waits.
const PauseFor = 3 * time.Second

var pauseAt = os.Getenv(PausePointEnv)

// PausePoint logs "pause point reached" and sleeps PauseFor if name is the
// configured pause point.
func PausePoint(name string) {
	if pauseAt != "" && pauseAt == name {
		klog.InfoS("pause point reached", "point", name, "for", PauseFor)
		time.Sleep(PauseFor)
	}
}
