package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// File is a Backend on a regular file or block device: pread and pwrite,
// fdatasync for FLUSH and FUA, hole punching for TRIM, fallocate for
// WRITE_ZEROES, SEEK_DATA/SEEK_HOLE for extents. It is what the benchmarks
// serve next to qemu-nbd and nbdkit's file plugin.
type File struct {
	f    *os.File
	size int64
}

// OpenFile opens path as a backend. The export's size is the file's size.
func OpenFile(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("size of %s: %w", path, err)
	}
	return &File{f: f, size: size}, nil
}

func (b *File) Size() int64  { return b.size }
func (b *File) Close() error { return b.f.Close() }

func (b *File) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := b.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) { // a file shorter than its export: zeros
		clear(p)
		return nil
	}
	return err
}

func (b *File) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	if _, err := b.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return b.sync()
	}
	return nil
}

func (b *File) Flush(context.Context) error { return b.sync() }

func (b *File) sync() error {
	if err := unix.Fdatasync(int(b.f.Fd())); err != nil {
		return &os.PathError{Op: "fdatasync", Path: b.f.Name(), Err: err}
	}
	return nil
}

func (b *File) Trim(_ context.Context, off, n int64) error {
	err := unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if errors.Is(err, syscall.EOPNOTSUPP) {
		return nil // TRIM is a hint
	}
	return err
}

func (b *File) Zero(ctx context.Context, off, n int64, noHole bool) error {
	mode := uint32(unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE)
	if noHole {
		mode = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
	}
	err := unix.Fallocate(int(b.f.Fd()), mode, off, n)
	if !errors.Is(err, syscall.EOPNOTSUPP) {
		return err
	}
	// No fallocate mode here (a block device, say): write zeros.
	zeros := make([]byte, min(n, 1<<20))
	for n > 0 {
		chunk := min(n, int64(len(zeros)))
		if err := b.WriteAt(ctx, zeros[:chunk], off, false); err != nil {
			return err
		}
		off, n = off+chunk, n-chunk
	}
	return nil
}

// Extents reports data and holes with lseek(SEEK_DATA/SEEK_HOLE). Holes
// read as zeros.
func (b *File) Extents(_ context.Context, off, n int64) ([]Extent, error) {
	end := min(off+n, b.size)
	fd := int(b.f.Fd())
	var out []Extent
	for off < end {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) { // no data from off to the end
			data = end
		} else if err != nil {
			if len(out) > 0 {
				return out, nil
			}
			return []Extent{{Length: end - off}}, nil // unknown: say allocated
		}
		if data > off {
			hole := min(data, end) - off
			out = append(out, Extent{Length: hole, Flags: StateHole | StateZero})
			off += hole
			continue
		}
		next, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil {
			next = end
		}
		length := min(next, end) - off
		out = append(out, Extent{Length: length})
		off += length
	}
	return out, nil
}
