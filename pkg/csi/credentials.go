package csi

import (
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Credentials are a cephx user and key taken from a CSI request's secrets. The
// key never appears in String, logs, errors or command lines.
type Credentials struct {
	ID  string
	Key string
}

// String names the user and hides the key.
func (c Credentials) String() string { return "client." + c.ID + " (key redacted)" }

// CredentialsFromSecrets reads the user ID and key under the given secret names
// (ceph-csi's userID/userKey or adminID/adminKey).
func CredentialsFromSecrets(secrets map[string]string, idName, keyName string) (Credentials, error) {
	c := Credentials{ID: secrets[idName], Key: secrets[keyName]}
	switch {
	case c.ID == "" && c.Key == "":
		return c, fmt.Errorf("missing secrets %s and %s", idName, keyName)
	case c.ID == "":
		return c, fmt.Errorf("missing secret %s", idName)
	case c.Key == "":
		return c, fmt.Errorf("missing secret %s", keyName)
	case strings.ContainsAny(c.ID, " \t\n\r=,[]"):
		return c, fmt.Errorf("secret %s is not a valid cephx user name", idName)
	case !validCephxKey(c.Key):
		// Checked here because Ceph libraries print a key they cannot decode.
		return c, fmt.Errorf("secret %s is not a valid cephx key (base64 of type, creation time, length and secret)", keyName)
	}
	c.ID = strings.TrimPrefix(c.ID, "client.")
	return c, nil
}

// KeyMemfd puts the key alone (the format of Ceph's --keyfile option) in an
// anonymous memory file (memfd, close-on-exec): it never touches a disk and
// vanishes with its last descriptor. Pass it to a tool as an exec.Cmd
// ExtraFiles entry and name it /proc/self/fd/<3+index> in --keyfile=.
func (c Credentials) KeyMemfd() (*os.File, error) {
	fd, err := unix.MemfdCreate("rookzmq-key", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("creating a memfd for the key: %w", err)
	}
	f := os.NewFile(uintptr(fd), "rookzmq-key")
	if _, err := f.WriteString(c.Key + "\n"); err != nil {
		f.Close()
		return nil, fmt.Errorf("writing the key to a memfd: %w", err)
	}
	return f, nil
}

// WriteKeyFile writes the key alone (the format of Ceph's --keyfile option) to a
// new file of mode 0600 in dir and returns its path.
//
// Deprecated: a key file can outlive a crash on persistent disk; use KeyMemfd.
func (c Credentials) WriteKeyFile(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, "key-*")
	if err != nil {
		return "", err
	}
	path := f.Name()
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.WriteString(c.Key + "\n")
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("writing key file in %s: %w", filepath.Clean(dir), err)
	}
	return path, nil
}

// Redact replaces every occurrence of the key in s (e.g. a tool's output).
func (c Credentials) Redact(s string) string {
	if c.Key == "" {
		return s
	}
	return strings.ReplaceAll(s, c.Key, "<redacted>")
}

// validCephxKey checks the shape of a cephx key: base64 of a 2-byte type, an
// 8-byte creation time, a 2-byte little-endian length and that many bytes.
func validCephxKey(key string) bool {
	b, err := base64.StdEncoding.DecodeString(key)
	if err != nil || len(b) < 12 {
		return false
	}
	n := int(binary.LittleEndian.Uint16(b[10:12]))
	return n > 0 && len(b) == 12+n
}
