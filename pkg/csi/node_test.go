package csi

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeAttachment is the fake driver's stage record part.
type fakeAttachment struct {
	Made string `json:"made,omitempty"`
}

// fakeStager records what the node skeleton asks of a driver. Only unit
// tests use it: the real drivers' behaviour is tested end to end.
type fakeStager struct {
	stage    func(ctx context.Context, rec *StageRecord[fakeAttachment], save func() error) ([]any, error)
	check    error
	calls    []string
	unstaged []string // Attachment.Made of each Unstage
}

func (f *fakeStager) CheckVolumeID(string) error { return nil }
func (f *fakeStager) PrepareStage(context.Context, *csi.NodeStageVolumeRequest) (StageFunc[fakeAttachment], error) {
	return func(ctx context.Context, rec *StageRecord[fakeAttachment], save func() error) ([]any, error) {
		f.calls = append(f.calls, "stage")
		return f.stage(ctx, rec, save)
	}, nil
}
func (f *fakeStager) Check(context.Context, *StageRecord[fakeAttachment]) error {
	f.calls = append(f.calls, "check")
	return f.check
}
func (f *fakeStager) Flush(context.Context, *StageRecord[fakeAttachment]) (uint64, error) {
	f.calls = append(f.calls, "flush")
	return 0, ErrNothingToFlush
}
func (f *fakeStager) Expand(context.Context, *StageRecord[fakeAttachment], int64) (int64, error) {
	return 0, nil
}
func (f *fakeStager) Unstage(_ context.Context, rec *StageRecord[fakeAttachment]) error {
	f.calls = append(f.calls, "unstage")
	f.unstaged = append(f.unstaged, rec.Attachment.Made)
	return nil
}
func (f *fakeStager) BlockDevice(*StageRecord[fakeAttachment]) string { return "" }

type eventLog struct{ kinds []string }

func (e *eventLog) VolumeEvent(_ context.Context, ev VolumeEvent) (uint64, error) {
	k := ev.Kind
	if ev.Trigger != "" {
		k += "/" + ev.Trigger
	}
	e.kinds = append(e.kinds, k)
	return uint64(len(e.kinds)), nil
}

func newFakeNode(t *testing.T) (*Node[fakeAttachment], *fakeStager, *eventLog, string) {
	t.Helper()
	dir := t.TempDir()
	f, ev := &fakeStager{}, &eventLog{}
	n, err := NewNode(NodeConfig{NodeID: "n1", StateDir: dir, Events: ev}, Stager[fakeAttachment](f))
	if err != nil {
		t.Fatal(err)
	}
	return n, f, ev, dir
}

func blockStage(id string) *csi.NodeStageVolumeRequest {
	return &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: "/staging/" + id, VolumeCapability: &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}}
}

// A stage that fails before its first save leaves nothing to undo; one that
// fails after a save is torn down (the driver's Unstage sees what it made);
// one whose own save fails is not (as before the skeleton moved out of pkg/rbd).
func TestStageFailureUndo(t *testing.T) {
	boom := errors.New("boom")
	for _, c := range []struct {
		name      string
		stage     func(ctx context.Context, rec *StageRecord[fakeAttachment], save func() error, dir string) error
		unstaged  []string
		hasRecord bool
	}{
		{"before save", func(context.Context, *StageRecord[fakeAttachment], func() error, string) error {
			return boom
		}, nil, false},
		{"after save", func(_ context.Context, rec *StageRecord[fakeAttachment], save func() error, _ string) error {
			if err := save(); err != nil {
				return err
			}
			rec.Attachment.Made = "device"
			return boom
		}, []string{"device"}, false},
		{"in a save", func(_ context.Context, rec *StageRecord[fakeAttachment], save func() error, dir string) error {
			if err := save(); err != nil {
				return err
			}
			rec.Attachment.Made = "device"
			// The records' directory becomes a file: the next save fails.
			volumes := filepath.Join(dir, "volumes")
			if err := os.RemoveAll(volumes); err != nil {
				return err
			}
			if err := os.WriteFile(volumes, nil, 0o600); err != nil {
				return err
			}
			return save()
		}, nil, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			n, f, ev, dir := newFakeNode(t)
			f.stage = func(ctx context.Context, rec *StageRecord[fakeAttachment], save func() error) ([]any, error) {
				return nil, c.stage(ctx, rec, save, dir)
			}
			_, err := n.NodeStageVolume(context.Background(), blockStage("v"))
			if err == nil {
				t.Fatal("stage succeeded")
			}
			if !slices.Equal(f.unstaged, c.unstaged) {
				t.Fatalf("driver unstaged %q, want %q (calls %v)", f.unstaged, c.unstaged, f.calls)
			}
			if len(ev.kinds) != 0 {
				t.Fatalf("events %v for a stage that never announced attach", ev.kinds)
			}
			if rec, _ := n.state.load("v"); (rec != nil) != c.hasRecord {
				t.Fatalf("record after the failed stage: %+v", rec)
			}
		})
	}
}

// Stage announces attach once; a repeated stage only checks; a stale stage
// is cleared (the driver unstages it) and staged again; unstage acks and
// detaches; a corrupt record is no evidence of staleness, and health says
// Internal about it.
func TestStageLifecycle(t *testing.T) {
	n, f, ev, _ := newFakeNode(t)
	ctx := context.Background()
	made := 0
	f.stage = func(_ context.Context, rec *StageRecord[fakeAttachment], save func() error) ([]any, error) {
		made++
		rec.Attachment.Made = "device" + string(rune('0'+made))
		return []any{"made", rec.Attachment.Made}, save()
	}
	if _, err := n.NodeStageVolume(ctx, blockStage("v")); err != nil {
		t.Fatal(err)
	}
	if _, err := n.NodeStageVolume(ctx, blockStage("v")); err != nil {
		t.Fatal(err)
	}
	f.check = Gone("the device died")
	if _, err := n.NodeStageVolume(ctx, blockStage("v")); err != nil {
		t.Fatal(err)
	}
	f.check = ErrCorruptRecord
	if _, err := n.NodeStageVolume(ctx, blockStage("v")); err != nil {
		t.Fatalf("stage over a record its driver cannot read: %v", err)
	}
	_, err := n.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: "v"})
	if status.Code(err) != codes.Internal {
		t.Fatalf("health of a corrupt record: %v, want Internal", err)
	}
	f.check = nil
	if _, err := n.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "v", StagingTargetPath: "/staging/v"}); err != nil {
		t.Fatal(err)
	}
	wantCalls := []string{"stage", "check", "check", "unstage", "stage", "check", "check", "flush", "unstage"}
	if !slices.Equal(f.calls, wantCalls) {
		t.Fatalf("driver calls %v, want %v", f.calls, wantCalls)
	}
	if !slices.Equal(f.unstaged, []string{"device1", "device2"}) {
		t.Fatalf("driver unstaged %v", f.unstaged)
	}
	wantEvents := []string{EventAttach, EventAttach, EventAck + "/" + TriggerUnstage, EventDetach}
	if !slices.Equal(ev.kinds, wantEvents) {
		t.Fatalf("events %v, want %v", ev.kinds, wantEvents)
	}
	if rec, err := n.state.load("v"); rec != nil || err != nil {
		t.Fatalf("record after unstage: %+v %v", rec, err)
	}
}
