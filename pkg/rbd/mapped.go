package rbd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// findMapped picks the device of spec's image from `rbd device list` JSON
// output ("" if the image is not in it); output that does not parse is an
// error, never "not mapped".
func findMapped(out []byte, spec ImageSpec) (string, error) {
	var list []struct {
		Pool      string `json:"pool"`
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
		Image     string `json:"image"`
		Snap      string `json:"snap"`
		Device    string `json:"device"`
	}
	if len(bytes.TrimSpace(out)) == 0 {
		return "", nil // nothing mapped: some versions print nothing at all
	}
	if err := json.Unmarshal(out, &list); err != nil {
		return "", fmt.Errorf("cannot parse the device list %q: %v", lastLine(out), err)
	}
	for _, d := range list {
		name := d.Name
		if name == "" {
			name = d.Image
		}
		if d.Pool == spec.Pool && d.Namespace == spec.Namespace && name == spec.Image && (d.Snap == "" || d.Snap == "-") {
			return d.Device, nil
		}
	}
	return "", nil
}

// toolEnv is the environment for Ceph CLI tools: the driver's own, less any
// Ceph settings that could override the arguments (CEPH_ARGS, CEPH_CONF,
// CEPH_KEYRING), plus an empty configuration file.
func toolEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CEPH_") {
			env = append(env, kv)
		}
	}
	return append(env, "CEPH_CONF=/dev/null")
}

// quietArgs keep every Ceph tool from making an admin socket or a log file
// (either could outlive the call or, for a log, hold what the tool saw).
var quietArgs = []string{"--admin-socket=", "--log-file="}

// keyFileArg is how a tool finds the key: the memfd (Credentials.KeyMemfd)
// passed as its fd 3.
const keyFileArg = "--keyfile=/proc/self/fd/3"

// toolRun is one invocation of a Ceph CLI tool.
type toolRun struct {
	name    string
	args    []string
	creds   *rcsi.Credentials // key passed as a memfd when set
	timeout time.Duration
	// tmpfsKeys, when set, is a directory on tmpfs where the key goes as a
	// short-lived file instead (keyFileArg then names that file): for tools
	// that hand the key to a child of their own after closing every other
	// descriptor, as `rbd device map -t nbd` does with rbd-nbd.
	tmpfsKeys string
}

// run runs the tool within its timeout (and ctx) and returns its stdout. A
// failure is an error naming the tool and its (redacted) stderr: Unavailable
// when the tool did not answer in time, Internal otherwise.
func (t toolRun) run(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, t.name, t.args...)
	cmd.Env = toolEnv()
	cmd.WaitDelay = time.Second // a child holding our pipes cannot hold us
	redact := func(s string) string { return s }
	switch {
	case t.creds != nil && t.tmpfsKeys != "":
		path, err := tmpfsKeyFile(*t.creds, t.tmpfsKeys)
		if err != nil {
			return nil, coded(codes.Internal, "%v", err)
		}
		defer os.Remove(path)
		cmd.Args = slices.Clone(cmd.Args)
		for i, a := range cmd.Args {
			if a == keyFileArg {
				cmd.Args[i] = "--keyfile=" + path
			}
		}
		redact = t.creds.Redact
	case t.creds != nil:
		key, err := t.creds.KeyMemfd()
		if err != nil {
			return nil, coded(codes.Internal, "%v", err)
		}
		defer key.Close()
		cmd.ExtraFiles = []*os.File{key}
		redact = t.creds.Redact
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	out, err := cmd.Output()
	what := t.name + " " + t.verb()
	detail := redact(lastLine(stderr.Bytes()))
	if detail != "" {
		detail = ": " + detail
	}
	if err == nil {
		return out, nil
	}
	if ctx.Err() != nil {
		return nil, coded(codes.Unavailable, "%s did not answer within %s%s", what, time.Since(start).Round(time.Millisecond), detail)
	}
	return nil, coded(codes.Internal, "%s failed: %v%s", what, err, detail)
}

// tmpfsKeyFile writes the key to a new 0600 file in dir, which must be on
// tmpfs (never a persistent disk), and returns its path; the caller removes it.
func tmpfsKeyFile(c rcsi.Credentials, dir string) (string, error) {
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
func (t toolRun) verb() string {
	var words []string
	for _, a := range t.args {
		if strings.HasPrefix(a, "-") {
			break
		}
		words = append(words, a)
	}
	return strings.Join(words, " ")
}

// codedError is an error with a gRPC code whose text is just its message,
// so wrapping it (%v, %w) reads well and rcsi.Code still finds the code.
type codedError struct {
	code codes.Code
	msg  string
}

func (e *codedError) Error() string { return e.msg }

// GRPCStatus gives the error's code to status.FromError and rcsi.Code.
func (e *codedError) GRPCStatus() *status.Status { return status.New(e.code, e.msg) }

func coded(code codes.Code, format string, args ...any) error {
	return &codedError{code: code, msg: fmt.Sprintf(format, args...)}
}

// goneError is positive evidence that a mapping or mount no longer exists (as
// opposed to a check that could not tell).
type goneError struct{ reason string }

func (e *goneError) Error() string { return e.reason }

func gone(format string, args ...any) error { return &goneError{fmt.Sprintf(format, args...)} }

// isGone tells positive evidence of a lost mapping from a failed check.
func isGone(err error) bool {
	var g *goneError
	return errors.As(err, &g)
}

// spec names the mapped image (for finding its device).
func (m Mapping) spec() ImageSpec {
	return ImageSpec{Pool: m.Pool, Namespace: m.Namespace, Image: m.Image}
}

// bootID identifies this boot of the node: mappings and mounts do not
// survive a reboot, stage records do.
func bootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", coded(codes.Internal, "reading the boot ID: %v", err)
	}
	return strings.TrimSpace(string(b)), nil
}
