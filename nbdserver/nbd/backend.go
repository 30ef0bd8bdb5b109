package nbd

import (
	"context"
	"errors"
	"syscall"
)

// Backend is what an export serves. Methods are called from many
// goroutines at once (one per request in flight, on every connection to
// the export); ranges are checked against Size before any call.
type Backend interface {
	// ReadAt fills p with the bytes at off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off. With fua it returns only once p is on stable
	// storage. WriteAt MUST NOT keep p after it returns.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush returns once every write that completed before it was called,
	// on any connection, is on stable storage.
	Flush(ctx context.Context) error
	// Size is the export's size in bytes, fixed while a client is attached.
	Size() int64
}

// Trimmer is a Backend that can discard a range (NBD_CMD_TRIM). Without it
// the export does not advertise TRIM.
type Trimmer interface {
	Trim(ctx context.Context, off, n int64) error
}

// Zeroer is a Backend that can zero a range without a payload. With noHole
// the range must stay allocated. Without a Zeroer, WRITE_ZEROES is done by
// writing zeros, and a FAST_ZERO request fails with ENOTSUP.
type Zeroer interface {
	Zero(ctx context.Context, off, n int64, noHole bool) error
}

// Extenter is a Backend that knows which ranges are holes or read as
// zeros. It feeds base:allocation and lets READ send holes without data.
// Without it every range is reported as allocated data.
type Extenter interface {
	// Extents describes consecutive ranges starting at off. They MAY end
	// before off+n (the caller asks again) and MUST cover at least one
	// byte.
	Extents(ctx context.Context, off, n int64) ([]Extent, error)
}

// Attacher is a Backend that is told how long clients use it: Attach is
// called when a connection has chosen the export, before its first
// request, and the function it returns once that connection has ended.
// The server that exports snapshots so knows which are in use.
type Attacher interface {
	Attach() (detach func())
}

// Extent is one run of a meta context: Length bytes with the same Flags
// (for base:allocation, StateHole and StateZero).
type Extent struct {
	Length int64
	Flags  uint32
}

// Errors a Backend may return to choose the NBD error code the client
// sees (see Errno). Anything else is EIO, with its message sent to clients
// that negotiated structured replies.
var (
	ErrInvalid      = errors.New("invalid argument")     // EINVAL
	ErrReadOnly     = errors.New("read-only export")     // EPERM
	ErrNoSpace      = errors.New("no space left")        // ENOSPC
	ErrNotSupported = errors.New("not supported")        // ENOTSUP
	ErrShutdown     = errors.New("server shutting down") // ESHUTDOWN
)

// Errno maps err to the NBD error value a reply carries.
func Errno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrInvalid), errors.Is(err, syscall.EINVAL):
		return EINVAL
	case errors.Is(err, ErrReadOnly), errors.Is(err, syscall.EPERM),
		errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EACCES):
		return EPERM
	case errors.Is(err, ErrNoSpace), errors.Is(err, syscall.ENOSPC),
		errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ENOSPC
	case errors.Is(err, ErrNotSupported), errors.Is(err, syscall.EOPNOTSUPP):
		return ENOTSUP
	case errors.Is(err, ErrShutdown), errors.Is(err, context.Canceled):
		return ESHUTDOWN
	case errors.Is(err, syscall.ENOMEM):
		return ENOMEM
	default:
		return EIO
	}
}
