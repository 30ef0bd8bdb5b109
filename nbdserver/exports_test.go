package nbdserver

import (
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// The volume's errors reach NBD clients as the codes the spec asks for.
func TestErrorCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{fmt.Errorf("write: %w", volume.ErrOutOfRange), nbd.EINVAL},
		{fmt.Errorf("snapshot: %w", volume.ErrNoSnapshot), nbd.EINVAL},
		{&fs.PathError{Op: "append", Path: "log", Err: syscall.ENOSPC}, nbd.ENOSPC},
		{&chunkstore.CorruptError{Reason: "hash"}, nbd.EIO},
		{fmt.Errorf("get: %w", chunkstore.ErrUnavailable), nbd.EIO},
	} {
		assert.Equal(t, tc.want, nbd.Errno(nbdErr(tc.err)), "%v", tc.err)
	}
}
