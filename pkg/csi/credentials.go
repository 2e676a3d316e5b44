package csi

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
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
	case strings.ContainsAny(c.Key, " \t\n\r"):
		return c, fmt.Errorf("secret %s is not a valid cephx key", keyName)
	}
	c.ID = strings.TrimPrefix(c.ID, "client.")
	return c, nil
}

// WriteKeyFile writes the key alone (the format of Ceph's --keyfile option) to a
// new file of mode 0600 in dir and returns its path.
func (c Credentials) WriteKeyFile(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, "key-*")
	if err != nil {
		return "", err
	}
	path := f.Name()
	if err := f.Chmod(0o600); err == nil {
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
