package csi

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/ceph/go-ceph/rados"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Errno extracts the errno of a go-ceph error (0 when there is none).
func Errno(err error) syscall.Errno {
	// A RADOS compound operation reports its own result beside the steps'.
	var oe rados.OperationError
	if errors.As(err, &oe) && oe.OpError != nil {
		err = oe.OpError
	}
	var ce interface{ ErrorCode() int }
	if errors.As(err, &ce) {
		n := ce.ErrorCode()
		if n < 0 {
			n = -n
		}
		return syscall.Errno(n)
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		return en
	}
	return 0
}

// Status turns err into a gRPC status: an existing status is kept, Ceph and
// context errors get the matching code, everything else is Internal.
func Status(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Error(Code(err), err.Error())
}

// Code picks the gRPC code for err.
func Code(err error) codes.Code {
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	}
	switch Errno(err) {
	case syscall.ENOENT:
		return codes.NotFound
	case syscall.EPERM, syscall.EACCES:
		return codes.PermissionDenied
	case syscall.ETIMEDOUT:
		return codes.DeadlineExceeded
	case syscall.ENOSPC, syscall.EDQUOT:
		return codes.ResourceExhausted
	case syscall.EBUSY:
		return codes.Aborted
	}
	return codes.Internal
}

// codedError is an error with a gRPC code whose text is just its message,
// so wrapping it (%v, %w) reads well and Code still finds the code.
type codedError struct {
	code codes.Code
	msg  string
}

func (e *codedError) Error() string { return e.msg }

// GRPCStatus gives the error's code to status.FromError and Code.
func (e *codedError) GRPCStatus() *status.Status { return status.New(e.code, e.msg) }

// Coded is an error with a gRPC code that reads as just its message when
// wrapped (a status.Error reads "rpc error: code = ... desc = ...").
func Coded(code codes.Code, format string, args ...any) error {
	return &codedError{code: code, msg: fmt.Sprintf(format, args...)}
}

// goneError is positive evidence that a mapping or mount no longer exists (as
// opposed to a check that could not tell).
type goneError struct{ reason string }

func (e *goneError) Error() string { return e.reason }

// Gone is positive evidence that what a stage made (a mapping, a mount, a
// daemon) no longer exists, as opposed to a check that could not tell.
func Gone(format string, args ...any) error { return &goneError{fmt.Sprintf(format, args...)} }

// IsGone tells positive evidence of a lost mapping or mount (Gone) from a
// failed check.
func IsGone(err error) bool {
	var g *goneError
	return errors.As(err, &g)
}
