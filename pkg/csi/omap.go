package csi

import (
	"fmt"
	"strings"
	"syscall"

	"github.com/ceph/go-ceph/rados"
)

// OmapList returns, in key order, up to max (0: all) key/value pairs of
// object's omap whose keys start with prefix and sort after startAfter (a
// key without the prefix, "" for the first), with the prefix cut off. It
// reads 1000 keys per RADOS operation; a missing object has no keys.
func OmapList(io *rados.IOContext, object, prefix, startAfter string, max int) ([][2]string, error) {
	var out [][2]string
	after := ""
	if startAfter != "" {
		after = prefix + startAfter
	}
	for {
		op := rados.CreateReadOp()
		step := op.GetOmapValues(after, prefix, 1000)
		err := op.Operate(io, object, rados.OperationNoFlag)
		if Errno(err) == syscall.ENOENT {
			op.Release()
			return out, nil
		}
		if err != nil {
			op.Release()
			return nil, fmt.Errorf("listing %s keys of %s: %w", prefix, object, err)
		}
		n := 0
		for {
			kv, err := step.Next()
			if err != nil {
				op.Release()
				return nil, fmt.Errorf("listing %s keys of %s: %w", prefix, object, err)
			}
			if kv == nil {
				break
			}
			n++
			after = kv.Key
			out = append(out, [2]string{strings.TrimPrefix(kv.Key, prefix), string(kv.Value)})
			if max > 0 && len(out) == max {
				op.Release()
				return out, nil
			}
		}
		more := step.More()
		op.Release()
		if n == 0 || !more {
			return out, nil
		}
	}
}
