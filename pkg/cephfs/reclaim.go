package cephfs

/*
#cgo CPPFLAGS: -D_FILE_OFFSET_BITS=64
#cgo LDFLAGS: -lcephfs
#include <errno.h>
#include <stdlib.h>
#include <cephfs/libcephfs.h>
*/
import "C"

import (
	"fmt"
	"syscall"
	"unsafe"

	"github.com/ceph/go-ceph/cephfs"
)

// A SIGKILLed driver leaves its MDS session open with the capabilities it
// held, and every operation that conflicts with them (a rename into the
// trash, an rmdir in the group) waits until the MDS times the session out
// (session_timeout, 60 s by default). Each mount therefore carries a stable
// client UUID, and a new mount first reclaims (resets) the session of its
// previous incarnation, as NFS-Ganesha does after a restart. go-ceph v0.34
// does not wrap these calls, so they go through cgo on go-ceph's handle.

// cmount returns go-ceph's libcephfs handle. MountInfo (go-ceph v0.34.0, pinned
// in go.mod) holds only that pointer; the size check catches a layout change.
func cmount(m *cephfs.MountInfo) (*C.struct_ceph_mount_info, error) {
	if unsafe.Sizeof(*m) != unsafe.Sizeof(uintptr(0)) {
		return nil, fmt.Errorf("go-ceph's MountInfo layout changed: cannot reach the libcephfs handle")
	}
	return *(**C.struct_ceph_mount_info)(unsafe.Pointer(m)), nil
}

// reclaimAndSetUUID resets any session a previous process left under uuid and
// gives this (initialised, not yet mounted) client that uuid.
func reclaimAndSetUUID(m *cephfs.MountInfo, uuid string) (reclaimed bool, err error) {
	cm, err := cmount(m)
	if err != nil {
		return false, err
	}
	cu := C.CString(uuid)
	defer C.free(unsafe.Pointer(cu))
	ret := C.ceph_start_reclaim(cm, cu, C.CEPH_RECLAIM_RESET)
	switch {
	case ret == 0:
		C.ceph_finish_reclaim(cm)
		reclaimed = true
	case ret == -C.ENOENT:
	default:
		return false, fmt.Errorf("reclaiming the session of a previous driver process: %w", syscall.Errno(-ret))
	}
	C.ceph_set_uuid(cm, cu)
	return reclaimed, nil
}
