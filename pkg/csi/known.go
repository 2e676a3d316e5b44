package csi

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// KnownCredentials supplies credentials for the calls that carry no secrets
// (ListVolumes, GetCapacity): those in Dir/<clusterID>/{userID,userKey} (a
// mounted Secret) when present, else the ones a recent call for that cluster used.
type KnownCredentials struct {
	Dir string

	mu     sync.Mutex
	recent map[string]Credentials
}

// Remember records creds as working for clusterID.
func (k *KnownCredentials) Remember(clusterID string, creds Credentials) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.recent == nil {
		k.recent = map[string]Credentials{}
	}
	k.recent[clusterID] = creds
}

// For returns credentials for clusterID, or false if none are known.
func (k *KnownCredentials) For(clusterID string) (Credentials, bool) {
	if k.Dir != "" {
		read := func(name string) string {
			b, _ := os.ReadFile(filepath.Join(k.Dir, clusterID, name))
			return strings.TrimSpace(string(b))
		}
		secrets := map[string]string{"userID": read("userID"), "userKey": read("userKey")}
		if c, err := CredentialsFromSecrets(secrets, "userID", "userKey"); err == nil {
			return c, true
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	c, ok := k.recent[clusterID]
	return c, ok
}
