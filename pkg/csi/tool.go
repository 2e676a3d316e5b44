package csi

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

// QuietArgs keep every Ceph tool from making an admin socket or a log file
// (either could outlive the call or, for a log, hold what the tool saw).
var QuietArgs = []string{"--admin-socket=", "--log-file="}

// KeyFileArg is how a tool finds the key: the memfd (Credentials.KeyMemfd)
// that Tool.Run passes as its fd 3.
const KeyFileArg = "--keyfile=/proc/self/fd/3"

// Tool is one invocation of a Ceph command-line tool (rbd, rbd-fuse,
// ceph-fuse): the node services shell out only where a CLI is the only interface.
type Tool struct {
	Name string
	Args []string
	// Creds, when set, passes the key as a memfd at fd 3 (KeyFileArg).
	Creds   *Credentials
	Timeout time.Duration
	// TmpfsKeys, when set, is a directory on tmpfs where the key goes as a
	// short-lived file instead (KeyFileArg then names that file): for tools
	// that hand the key to a child of their own after closing every other
	// descriptor, as `rbd device map -t nbd` does with rbd-nbd.
	TmpfsKeys string
}

// ToolEnv is the environment for Ceph CLI tools: the driver's own, less any
// Ceph settings that could override the arguments (CEPH_ARGS, CEPH_CONF,
// CEPH_KEYRING), plus an empty configuration file.
func ToolEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CEPH_") {
			env = append(env, kv)
		}
	}
	return append(env, "CEPH_CONF=/dev/null")
}

// Run runs the tool within its timeout (and ctx) and returns its stdout. A
// failure is an error naming the tool and its (redacted) stderr: Unavailable
// when the tool did not answer in time, Internal otherwise.
func (t Tool) Run(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, t.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, t.Name, t.Args...)
	cmd.Env = ToolEnv()
	cmd.WaitDelay = time.Second // a child holding our pipes cannot hold us
	redact := func(s string) string { return s }
	switch {
	case t.Creds != nil && t.TmpfsKeys != "":
		path, err := tmpfsKeyFile(*t.Creds, t.TmpfsKeys)
		if err != nil {
			return nil, Coded(codes.Internal, "%v", err)
		}
		defer os.Remove(path)
		cmd.Args = slices.Clone(cmd.Args)
		for i, a := range cmd.Args {
			if a == KeyFileArg {
				cmd.Args[i] = "--keyfile=" + path
			}
		}
		redact = t.Creds.Redact
	case t.Creds != nil:
		key, err := t.Creds.KeyMemfd()
		if err != nil {
			return nil, Coded(codes.Internal, "%v", err)
		}
		defer key.Close()
		cmd.ExtraFiles = []*os.File{key}
		redact = t.Creds.Redact
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	out, err := cmd.Output()
	what := t.Name + " " + t.verb()
	detail := redact(LastLine(stderr.Bytes()))
	if detail != "" {
		detail = ": " + detail
	}
	if err == nil {
		return out, nil
	}
	if ctx.Err() != nil {
		return nil, Coded(codes.Unavailable, "%s did not answer within %s%s", what, time.Since(start).Round(time.Millisecond), detail)
	}
	return nil, Coded(codes.Internal, "%s failed: %v%s", what, err, detail)
}

// tmpfsKeyFile writes the key to a new 0600 file in dir, which must be on
// tmpfs (never a persistent disk), and returns its path; the caller removes it.
func tmpfsKeyFile(c Credentials, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("key directory %s: %w", dir, err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "", fmt.Errorf("key directory %s: %w", dir, err)
	}
	if st.Type != unix.TMPFS_MAGIC {
		return "", fmt.Errorf("key directory %s is not on tmpfs: keys are never written to disk", dir)
	}
	f, err := os.CreateTemp(dir, "key-*")
	if err != nil {
		return "", err
	}
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.WriteString(c.Key + "\n")
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("writing a key file in %s: %w", dir, err)
	}
	return f.Name(), nil
}

// verb is the tool's subcommand words (e.g. "device list"), for messages.
func (t Tool) verb() string {
	var words []string
	for _, a := range t.Args {
		if strings.HasPrefix(a, "-") {
			break
		}
		words = append(words, a)
	}
	return strings.Join(words, " ")
}

// LastLine is the last non-blank line of a tool's output, for messages.
func LastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return lines[len(lines)-1]
}
