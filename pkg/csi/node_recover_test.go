package csi

import (
	"context"
	"errors"
	"slices"
	"testing"
)

// remountingStager is the fake driver that can also remount in place.
type remountingStager struct {
	*fakeStager
	remount func() error
}

func (r *remountingStager) Remount(context.Context, *StageRecord[fakeAttachment]) error {
	r.calls = append(r.calls, "remount")
	return r.remount()
}

// Recover leaves a working stage alone, remounts a lost one when the driver
// can (and is not ready meanwhile), fails for one it cannot remount or that
// stays lost, and never touches a stage from another boot.
func TestRecover(t *testing.T) {
	ctx := context.Background()
	stage := func(n *Node[fakeAttachment], f *fakeStager) {
		t.Helper()
		f.stage = func(_ context.Context, _ *StageRecord[fakeAttachment], save func() error) ([]any, error) {
			return nil, save()
		}
		if _, err := n.NodeStageVolume(ctx, blockStage("v")); err != nil {
			t.Fatal(err)
		}
		f.calls = nil
	}

	// A driver that cannot remount: the lost stage is reported, left as it is.
	n, f, _, _ := newFakeNode(t)
	stage(n, f)
	if rep, failed := n.Recover(ctx); rep != 0 || failed != 0 || !slices.Equal(f.calls, []string{"check"}) {
		t.Fatalf("working stage: repaired %d failed %d calls %v", rep, failed, f.calls)
	}
	f.check = Gone("daemon died")
	if rep, failed := n.Recover(ctx); rep != 0 || failed != 1 {
		t.Fatalf("lost stage, no Remounter: repaired %d failed %d", rep, failed)
	}
	if rec, _ := n.state.load("v"); rec == nil || !rec.Staged {
		t.Fatalf("record after a failed recovery: %+v", rec)
	}

	// A Remounter: remounted, then checked again; not ready while it runs.
	dir := t.TempDir()
	f2 := &fakeStager{}
	rs := &remountingStager{fakeStager: f2}
	n2, err := NewNode(NodeConfig{NodeID: "n1", StateDir: dir}, Stager[fakeAttachment](rs))
	if err != nil {
		t.Fatal(err)
	}
	stage(n2, f2)
	f2.check = Gone("daemon died")
	var readyDuring error
	rs.remount = func() error { readyDuring = n2.Ready(); f2.check = nil; return nil }
	if rep, failed := n2.Recover(ctx); rep != 1 || failed != 0 {
		t.Fatalf("remountable stage: repaired %d failed %d calls %v", rep, failed, f2.calls)
	}
	if !errors.Is(readyDuring, ErrRecovering) || n2.Ready() != nil {
		t.Fatalf("Ready during recovery %v, after %v", readyDuring, n2.Ready())
	}
	if want := []string{"check", "remount", "check"}; !slices.Equal(f2.calls, want) {
		t.Fatalf("calls %v, want %v", f2.calls, want)
	}
	// Still lost after the remount: a failure.
	f2.calls, f2.check = nil, Gone("daemon died")
	rs.remount = func() error { return nil }
	if rep, failed := n2.Recover(ctx); rep != 0 || failed != 1 {
		t.Fatalf("stays lost: repaired %d failed %d", rep, failed)
	}
	// Staged in another boot: nothing to repair, no driver call.
	rec, _ := n2.state.load("v")
	rec.BootID = "another-boot"
	if err := n2.state.save(rec); err != nil {
		t.Fatal(err)
	}
	f2.calls = nil
	if rep, failed := n2.Recover(ctx); rep != 0 || failed != 0 || len(f2.calls) != 0 {
		t.Fatalf("other boot: repaired %d failed %d calls %v", rep, failed, f2.calls)
	}
}

// keepingStager is the fake driver whose working stages hold something to
// keep (a daemon to move).
type keepingStager struct {
	*fakeStager
	keep error
}

func (k *keepingStager) Keep(context.Context, *StageRecord[fakeAttachment]) ([]any, error) {
	k.calls = append(k.calls, "keep")
	return nil, k.keep
}

// Recover keeps every working stage, not a lost one, and counts a stage it
// could not keep as failed (left staged).
func TestRecoverKeeps(t *testing.T) {
	ctx := context.Background()
	f := &fakeStager{stage: func(_ context.Context, _ *StageRecord[fakeAttachment], save func() error) ([]any, error) {
		return nil, save()
	}}
	ks := &keepingStager{fakeStager: f}
	n, err := NewNode(NodeConfig{NodeID: "n1", StateDir: t.TempDir()}, Stager[fakeAttachment](ks))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.NodeStageVolume(ctx, blockStage("v")); err != nil {
		t.Fatal(err)
	}
	f.calls = nil
	if rep, failed := n.Recover(ctx); rep != 0 || failed != 0 || !slices.Equal(f.calls, []string{"check", "keep"}) {
		t.Fatalf("working stage: repaired %d failed %d calls %v", rep, failed, f.calls)
	}
	f.calls, ks.keep = nil, errors.New("cannot move the daemon")
	if rep, failed := n.Recover(ctx); rep != 0 || failed != 1 || !slices.Equal(f.calls, []string{"check", "keep"}) {
		t.Fatalf("keep fails: repaired %d failed %d calls %v", rep, failed, f.calls)
	}
	if rec, _ := n.state.load("v"); rec == nil || !rec.Staged {
		t.Fatalf("record after a failed keep: %+v", rec)
	}
	f.calls, ks.keep, f.check = nil, nil, Gone("daemon died")
	if _, failed := n.Recover(ctx); failed != 1 || slices.Contains(f.calls, "keep") {
		t.Fatalf("lost stage: failed %d calls %v", failed, f.calls)
	}
}
