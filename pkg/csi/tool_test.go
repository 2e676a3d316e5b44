package csi

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

// testKey is a well-formed cephx key (not a real one).
const testKey = "AQBSdFhlAAAAABAAtZkGmFNzrBc9t6FGiTFU1w=="

// A tool that fails is Internal naming it and its stderr (the key stripped);
// one that hangs is Unavailable within its timeout; the key reaches it as a
// memfd at fd 3 and is readable through KeyFileArg.
func TestToolRun(t *testing.T) {
	dir := t.TempDir()
	tool := filepath.Join(dir, "tool")
	script := `#!/bin/bash
case "$1" in
fail) echo "bad key $(cat /proc/self/fd/3)" >&2; exit 3;;
hang) exec sleep 100;;
key) readlink /proc/self/fd/3; cat /proc/self/fd/3;;
esac
`
	if err := os.WriteFile(tool, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	creds := &Credentials{ID: "u", Key: testKey}
	_, err := Tool{Name: tool, Args: []string{"fail", "--x"}, Creds: creds, Timeout: 10 * time.Second}.Run(context.Background())
	if Code(err) != codes.Internal || !strings.Contains(err.Error(), "tool fail failed") || !strings.Contains(err.Error(), "bad key <redacted>") {
		t.Fatalf("failing tool: %v", err)
	}
	if strings.Contains(err.Error(), testKey) {
		t.Fatalf("the key is in the error: %v", err)
	}
	start := time.Now()
	_, err = Tool{Name: tool, Args: []string{"hang"}, Timeout: 300 * time.Millisecond}.Run(context.Background())
	if Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "did not answer") || time.Since(start) > 3*time.Second {
		t.Fatalf("hung tool after %s: %v", time.Since(start), err)
	}
	out, err := Tool{Name: tool, Args: []string{"key"}, Creds: creds, Timeout: 10 * time.Second}.Run(context.Background())
	if err != nil || !regexp.MustCompile(`^/memfd:rookzmq-key \(deleted\)\n`+regexp.QuoteMeta(testKey)+`\n$`).Match(out) {
		t.Fatalf("key as seen by the tool: %q %v", out, err)
	}
}

// For tools that close inherited descriptors before running a helper (rbd
// with rbd-nbd), the key goes to a 0600 file on tmpfs, named in place of
// KeyFileArg and removed when the tool returns; a directory on disk is refused.
func TestToolRunTmpfsKey(t *testing.T) {
	dir := t.TempDir()
	tool := filepath.Join(dir, "tool")
	script := `#!/bin/bash
f=${2#--keyfile=}
echo "$f"; stat -f -c %T "$f"; stat -c %a "$f"; cat "$f"
`
	if err := os.WriteFile(tool, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	keys := filepath.Join("/dev/shm", fmt.Sprintf("rookzmq-test-%d", os.Getpid()))
	defer os.RemoveAll(keys)
	creds := &Credentials{ID: "u", Key: testKey}
	out, err := Tool{Name: tool, Args: []string{"map", KeyFileArg}, Creds: creds, Timeout: 10 * time.Second, TmpfsKeys: keys}.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], keys+"/") || lines[1] != "tmpfs" || lines[2] != "600" || lines[3] != testKey {
		t.Fatalf("tool saw %q", lines)
	}
	if _, err := os.Stat(lines[0]); !os.IsNotExist(err) {
		t.Fatalf("key file %s left after the tool returned: %v", lines[0], err)
	}
	var st unix.Statfs_t
	if unix.Statfs(dir, &st) == nil && st.Type != unix.TMPFS_MAGIC {
		_, err := Tool{Name: tool, Args: []string{"map", KeyFileArg}, Creds: creds, Timeout: 10 * time.Second, TmpfsKeys: dir}.Run(context.Background())
		if err == nil || !strings.Contains(err.Error(), "not on tmpfs") {
			t.Fatalf("key file on a disk directory: %v, want a refusal", err)
		}
	}
}
