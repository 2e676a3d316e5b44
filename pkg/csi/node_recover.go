package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
)

// Recovery at start: a restarted driver repairs what it can of the stages
// the node still has (a FUSE daemon that died meanwhile) before it reports
// ready, with the same stale check NodeStageVolume and NodePublishVolume use.

const (
	recoverNone = iota // Recover was never called: ready
	recoverRunning
	recoverDone
)

// ErrRecovering is Ready's answer while Recover runs.
var ErrRecovering = errors.New("recovering the volumes staged before the restart")

// Ready is nil unless Recover is still running (for the Identity probe and
// /healthz: a driver is not ready before its volumes are).
func (n *Node[A]) Ready() error {
	if n.recovering.Load() == recoverRunning {
		return ErrRecovering
	}
	return nil
}

// RecoverInBackground runs Recover on its own goroutine; Ready answers
// ErrRecovering from the moment it is called until Recover is done (closed).
func (n *Node[A]) RecoverInBackground(ctx context.Context) <-chan struct{} {
	n.recovering.Store(recoverRunning)
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.Recover(ctx)
	}()
	return done
}

// Recover checks every staged volume once, at start. A stage whose Check
// finds it lost (not a reboot: kubelet stages again after one) is
// remounted in place, if the driver is a Remounter, and then the staging path
// is bound again into each target whose bind is lost; a working stage gets
// only its lost binds back. A working stage is then kept (Keeper). A volume it cannot repair is logged and left as
// it is: NodeGetVolumeHealth reports it, NodeStageVolume clears and stages
// it again. It returns how many volumes it repaired and how many it could not.
func (n *Node[A]) Recover(ctx context.Context) (repaired, failed int) {
	n.recovering.Store(recoverRunning)
	defer n.recovering.Store(recoverDone)
	return n.pass(ctx, false)
}

// RepairEvery runs Recover's pass every interval until ctx ends, so that a
// stage whose FUSE daemon died while the driver runs is mounted again (its
// targets bound again, its daemons kept) without waiting for a restart or a
// new stage. Only what a pass repairs or cannot repair is logged.
func (n *Node[A]) RepairEvery(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if n.recovering.Load() != recoverRunning {
			n.pass(ctx, true)
		}
	}
}

// pass checks every staged volume once; quiet logs only repairs and failures.
func (n *Node[A]) pass(ctx context.Context, quiet bool) (repaired, failed int) {
	start := time.Now()
	recs, err := n.state.all()
	if err != nil {
		klog.ErrorS(err, "reading the stage records: no recovery")
		return 0, 1
	}
	healthy := 0
	for _, r := range recs {
		if !r.Staged {
			continue // a stage cut short: kubelet retries it
		}
		did, err := n.recoverVolume(ctx, r.VolumeID, quiet)
		switch {
		case err != nil:
			failed++
			klog.ErrorS(err, "cannot recover a staged volume: NodeStageVolume will stage it again", "volumeID", r.VolumeID)
		case did:
			repaired++
		default:
			healthy++
		}
	}
	if len(recs) > 0 && (!quiet || repaired+failed > 0) {
		klog.InfoS("recovery of staged volumes done", "volumes", len(recs), "repaired", repaired, "failed", failed, "healthy", healthy,
			"duration", time.Since(start))
	}
	return repaired, failed
}

// recoverVolume repairs one volume; it reports whether it changed anything.
func (n *Node[A]) recoverVolume(ctx context.Context, volumeID string, quiet bool) (bool, error) {
	rec, unlock, err := n.begin(ctx, volumeID)
	if err != nil {
		return false, err
	}
	defer unlock()
	if rec == nil || !rec.Staged {
		return false, nil
	}
	boot, err := bootID()
	if err != nil {
		return false, err
	}
	if rec.BootID != boot {
		return false, nil // staged before a reboot: nothing of it is left to repair
	}
	reason, err := n.stale(ctx, rec)
	if err != nil {
		return false, err
	}
	remounted := false
	if reason != "" {
		if err := n.remount(ctx, rec, reason); err != nil {
			return false, err
		}
		remounted = true
	}
	if k, ok := n.stager.(Keeper[A]); ok {
		vals, err := k.Keep(ctx, rec)
		if err != nil {
			return remounted, fmt.Errorf("the stage works but may not outlive the driver: %w", err)
		}
		if !quiet {
			klog.InfoS("staged volume kept", append([]any{"volumeID", volumeID}, vals...)...)
		}
	}
	rebound, err := n.rebindTargets(ctx, rec, remounted)
	if rebound > 0 {
		klog.InfoS("targets bound again", "volumeID", volumeID, "targets", rebound)
	}
	return remounted || rebound > 0, err
}

// remount mounts a lost stage again in place (the driver must be a
// Remounter) and checks that it works; the caller holds the volume's lock.
func (n *Node[A]) remount(ctx context.Context, rec *StageRecord[A], reason string) error {
	rm, ok := n.stager.(Remounter[A])
	if !ok {
		return fmt.Errorf("the stage is lost (%s) and this driver cannot remount it in place", reason)
	}
	start := time.Now()
	klog.InfoS("the stage of a volume is lost: remounting it", "volumeID", rec.VolumeID, "reason", reason)
	PausePoint("node-recover-remount")
	if err := rm.Remount(ctx, rec); err != nil {
		return fmt.Errorf("remounting: %w", err)
	}
	if reason, err := n.stale(ctx, rec); err != nil || reason != "" {
		return fmt.Errorf("still lost after remounting: %s %v", reason, err)
	}
	klog.InfoS("volume remounted", "volumeID", rec.VolumeID, "duration", time.Since(start))
	return nil
}

// rebindTargets binds the staging path (or device) again into every target
// whose bind is lost, or into all of them when all is set (the staging
// mount was replaced: every bind still shows the dead one). A bind still in
// use is detached (its users keep what they opened; new opens see the new
// mount). Propagating the new bind into a running container needs
// HostToContainer mount propagation.
func (n *Node[A]) rebindTargets(ctx context.Context, rec *StageRecord[A], all bool) (int, error) {
	source := rec.StagingPath
	if rec.Block {
		source = n.stager.BlockDevice(rec)
	}
	var count int
	var errs []error
	for target, pub := range rec.Targets {
		perr := StatPath(ctx, target)
		switch {
		case errors.Is(perr, os.ErrNotExist):
			continue // gone: kubelet unpublishes it
		case perr != nil && !MountLost(perr):
			errs = append(errs, fmt.Errorf("cannot tell whether target %s works: %w", target, perr))
			continue
		case perr == nil && !all:
			if mnt, err := IsMountPoint(ctx, n.mounts, target); err != nil || mnt {
				continue // still bound (or cannot tell: leave it)
			}
		}
		if err := detachAll(target); err != nil {
			errs = append(errs, err)
			continue
		}
		opts := append([]string{"bind"}, MountOptions(pub.Flags, pub.ReadOnly)...)
		if err := n.mounts.Mount(source, target, "", opts); err != nil {
			errs = append(errs, fmt.Errorf("bind-mounting %s at %s: %w", source, target, err))
			continue
		}
		count++
	}
	return count, errors.Join(errs...)
}

// detachAll removes every mount at path: unmounted, or detached when busy
// (a lost mount that a process still uses).
func detachAll(path string) error {
	for i := 0; i < 8; i++ {
		err := unix.Unmount(path, 0)
		if errors.Is(err, unix.EBUSY) {
			err = unix.Unmount(path, unix.MNT_DETACH)
		}
		switch {
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // nothing (more) mounted there
		case err != nil:
			return Coded(codes.Internal, "unmounting %s: %v", path, err)
		}
	}
	return Coded(codes.Internal, "%s still has mounts after removing 8", path)
}
