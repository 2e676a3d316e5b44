package rbd

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// stageRecord is what a node remembers of a staged volume, kept on disk under
// the state directory so a restarted driver can still publish, expand and
// unstage it.
type stageRecord struct {
	VolumeID    string `json:"volumeID"`
	StagingPath string `json:"stagingPath"`
	Mapping
	Block    bool              `json:"block"`
	FsType   string            `json:"fsType,omitempty"`
	ReadOnly bool              `json:"readOnly"`
	Mode     string            `json:"accessMode"`
	Context  map[string]string `json:"volumeContext,omitempty"`
	// Size is the device size last reported in an expand event.
	Size int64 `json:"size,omitempty"`
	// BootID is the boot the volume was staged in.
	BootID string `json:"bootID,omitempty"`
	// Announced: the attach event was emitted (unstage owes ack and detach).
	Announced bool `json:"announced,omitempty"`
	// UnstageAcked: unstage emitted its ack (a retry emits only detach).
	UnstageAcked bool `json:"unstageAcked,omitempty"`
	// Staged is false while the volume is being mapped or mounted.
	Staged bool `json:"staged"`
	// Targets are the paths the volume is published at.
	Targets map[string]publication `json:"targets,omitempty"`
}

// publication is one target path a volume is published at.
type publication struct {
	ReadOnly bool `json:"readOnly"`
	// Context is the publish-time volume context (pod name, namespace and UID
	// from podInfoOnMount), for the unpublish event.
	Context map[string]string `json:"context,omitempty"`
}

// stateStore keeps one record file (and one work directory) per volume.
type stateStore struct {
	dir string
}

func (s stateStore) key(volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return hex.EncodeToString(sum[:16])
}

// workDir is the volume's private directory (rbd-fuse mount point lives there).
func (s stateStore) workDir(volumeID string) string {
	return filepath.Join(s.dir, "volumes", s.key(volumeID))
}

func (s stateStore) path(volumeID string) string {
	return filepath.Join(s.dir, "volumes", s.key(volumeID)+".json")
}

// load returns the record of volumeID, or nil if it has none.
func (s stateStore) load(volumeID string) (*stageRecord, error) {
	b, err := os.ReadFile(s.path(volumeID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r stageRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("stage record %s is corrupt: %w", s.path(volumeID), err)
	}
	return &r, nil
}

// save writes the record atomically and durably.
func (s stateStore) save(r *stageRecord) error {
	path := s.path(r.VolumeID)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("saving stage record: %w", err)
	}
	// The rename is durable only once the directory is.
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("saving stage record: %w", err)
	}
	return nil
}

// syncDir fsyncs a directory, making renames and removals in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// remove deletes the record and the (empty) work directory.
func (s stateStore) remove(volumeID string) error {
	if err := os.Remove(s.workDir(volumeID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(s.path(volumeID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	// A removal the disk forgot would bring the record back after a crash.
	if err := syncDir(filepath.Dir(s.path(volumeID))); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// all loads every record.
func (s stateStore) all() ([]*stageRecord, error) {
	paths, err := filepath.Glob(filepath.Join(s.dir, "volumes", "*.json"))
	if err != nil {
		return nil, err
	}
	var out []*stageRecord
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // removed meanwhile
		}
		var r stageRecord
		if json.Unmarshal(b, &r) == nil {
			out = append(out, &r)
		}
	}
	return out, nil
}
