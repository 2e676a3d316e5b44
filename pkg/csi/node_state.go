package csi

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"google.golang.org/grpc/codes"
)

// StageRecord is what a node remembers of a staged volume, kept on disk under
// the state directory so a restarted driver can still publish, expand and
// unstage it. A is the driver's own part (Attachment).
type StageRecord[A any] struct {
	VolumeID    string            `json:"volumeID"`
	StagingPath string            `json:"stagingPath"`
	Block       bool              `json:"block"`
	FsType      string            `json:"fsType,omitempty"`
	ReadOnly    bool              `json:"readOnly"`
	Mode        string            `json:"accessMode"`
	Context     map[string]string `json:"volumeContext,omitempty"`
	// Size is the volume size last reported in an expand event.
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
	Targets map[string]Publication `json:"targets,omitempty"`

	// Attachment is what the driver's stage made and its unstage undoes (for
	// RBD: the mapping). It must encode as a JSON object; its fields are
	// stored beside the record's own, at the top level, and may not reuse
	// their names.
	Attachment A `json:"-"`
	// WorkDir is the volume's private directory under the state directory
	// (not stored: it follows from the volume ID). The driver may keep what
	// it needs there (rbd-fuse mounts there); it must be empty at unstage.
	WorkDir string `json:"-"`
}

// Publication is one target path a volume is published at.
type Publication struct {
	ReadOnly bool `json:"readOnly"`
	// Context is the publish-time volume context (pod name, namespace and UID
	// from podInfoOnMount), for the unpublish event.
	Context map[string]string `json:"context,omitempty"`
	// Flags are the capability's mount flags (mount volumes), for a bind
	// made again by Recover.
	Flags []string `json:"mountFlags,omitempty"`
}

// MarshalJSON writes the record's fields and its attachment's as one object.
func (r StageRecord[A]) MarshalJSON() ([]byte, error) {
	type plain StageRecord[A] // without these methods
	var fields, att map[string]json.RawMessage
	if err := remarshal(plain(r), &fields); err != nil {
		return nil, err
	}
	if err := remarshal(r.Attachment, &att); err != nil {
		return nil, fmt.Errorf("a stage record's attachment must encode as a JSON object: %w", err)
	}
	for k, v := range att {
		if _, clash := fields[k]; clash {
			return nil, fmt.Errorf("attachment field %q clashes with a stage record field", k)
		}
		fields[k] = v
	}
	return json.Marshal(fields)
}

// UnmarshalJSON reads the record's fields and, from the same object, its attachment's.
func (r *StageRecord[A]) UnmarshalJSON(b []byte) error {
	type plain StageRecord[A]
	var p plain
	if err := json.Unmarshal(b, &p); err != nil {
		return err
	}
	if err := json.Unmarshal(b, &p.Attachment); err != nil {
		return err
	}
	*r = StageRecord[A](p)
	return nil
}

func remarshal(v any, out *map[string]json.RawMessage) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, out)
}

// stateStore keeps one record file (and one work directory) per volume.
type stateStore[A any] struct {
	dir string
}

func (s stateStore[A]) key(volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return hex.EncodeToString(sum[:16])
}

// workDir is the volume's private directory.
func (s stateStore[A]) workDir(volumeID string) string {
	return filepath.Join(s.dir, "volumes", s.key(volumeID))
}

func (s stateStore[A]) path(volumeID string) string {
	return filepath.Join(s.dir, "volumes", s.key(volumeID)+".json")
}

// load returns the record of volumeID, or nil if it has none.
func (s stateStore[A]) load(volumeID string) (*StageRecord[A], error) {
	b, err := os.ReadFile(s.path(volumeID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r StageRecord[A]
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("stage record %s is corrupt: %w", s.path(volumeID), err)
	}
	r.WorkDir = s.workDir(r.VolumeID)
	return &r, nil
}

// save writes the record atomically and durably.
func (s stateStore[A]) save(r *StageRecord[A]) error {
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
func (s stateStore[A]) remove(volumeID string) error {
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
func (s stateStore[A]) all() ([]*StageRecord[A], error) {
	paths, err := filepath.Glob(filepath.Join(s.dir, "volumes", "*.json"))
	if err != nil {
		return nil, err
	}
	var out []*StageRecord[A]
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // removed meanwhile
		}
		var r StageRecord[A]
		if json.Unmarshal(b, &r) == nil {
			r.WorkDir = s.workDir(r.VolumeID)
			out = append(out, &r)
		}
	}
	return out, nil
}

// bootID identifies this boot of the node: mappings and mounts do not
// survive a reboot, stage records do.
func bootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", Coded(codes.Internal, "reading the boot ID: %v", err)
	}
	return strings.TrimSpace(string(b)), nil
}
