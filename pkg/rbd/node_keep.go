package rbd

import (
	"context"

	rcsi "github.com/rookzmq/rookzmq/pkg/csi"
)

// Keep moves the rbd-fuse daemon of a working stage into the daemons' cgroup
// if it is elsewhere (started by a plugin that stopped before it could move
// it, or by a version that did not), so it outlives this plugin too. Other
// mappings have nothing to keep. Node.Recover calls it at start.
func (s *stager) Keep(_ context.Context, rec *rcsi.StageRecord[Mapping]) ([]any, error) {
	f, ok := s.mounters[rec.Attachment.Mounter].(*fuseMounter)
	if !ok {
		return []any{"mounter", rec.Attachment.Mounter}, nil
	}
	pid, err := fusePid(rec.Attachment.FuseDir)
	if err != nil {
		return nil, err
	}
	if err := f.adopt(pid, rec.Attachment.FuseDir); err != nil {
		return nil, err
	}
	return []any{"mounter", MounterFuse, "pid", pid}, nil
}
