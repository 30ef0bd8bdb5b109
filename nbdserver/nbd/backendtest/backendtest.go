// Package backendtest is the conformance suite every nbd.Backend runs: what
// an NBD client may count on from any export, whatever serves it.
package backendtest

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// Subject is a backend under test.
type Subject struct {
	Backend nbd.Backend
	// Content is what a read-only backend holds (ReadOnly); a writable one
	// must start as zeros.
	Content  []byte
	ReadOnly bool
}

// Run checks the backend open returns; open makes a new one for each
// subtest.
func Run(t *testing.T, open func(t *testing.T) Subject) {
	t.Run("ReadBack", func(t *testing.T) { readBack(t, open(t)) })
	t.Run("Bounds", func(t *testing.T) { bounds(t, open(t)) })
	t.Run("Extents", func(t *testing.T) { extents(t, open(t)) })
	t.Run("ZeroAndTrim", func(t *testing.T) { zeroAndTrim(t, open(t)) })
	t.Run("Concurrent", func(t *testing.T) { concurrent(t, open(t)) })
}

// model is what the backend must read as.
func model(t *testing.T, s Subject) []byte {
	t.Helper()
	if s.ReadOnly {
		if int64(len(s.Content)) != s.Backend.Size() {
			t.Fatalf("Content is %d bytes, the backend %d", len(s.Content), s.Backend.Size())
		}
		return bytes.Clone(s.Content)
	}
	return make([]byte, s.Backend.Size())
}

func check(t *testing.T, b nbd.Backend, want []byte, what string) {
	t.Helper()
	got := make([]byte, len(want))
	if err := b.ReadAt(context.Background(), got, 0); err != nil {
		t.Fatalf("%s: read: %v", what, err)
	}
	if i := firstDiff(want, got); i >= 0 {
		t.Fatalf("%s: differs at byte %d: got %#x, want %#x", what, i, got[i], want[i])
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// readBack: writes of any size at any offset read back; a read-only
// backend refuses them with ErrReadOnly (EPERM) and keeps its bytes.
func readBack(t *testing.T, s Subject) {
	ctx := context.Background()
	b, m := s.Backend, model(t, s)
	size := b.Size()
	r := rand.New(rand.NewPCG(uint64(size), 1))
	for i := range 40 {
		n := 1 + r.Int64N(min(size, 300_000))
		off := r.Int64N(size - n + 1)
		if i%5 == 0 {
			off, n = off&^4095, min((n+4095)&^4095, size-off&^4095) // aligned too
		}
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(r.Uint32())
		}
		err := b.WriteAt(ctx, p, off, i%7 == 0)
		if s.ReadOnly {
			if !errors.Is(err, nbd.ErrReadOnly) && nbd.Errno(err) != nbd.EPERM {
				t.Fatalf("a read-only backend took a write at %d+%d: %v", off, n, err)
			}
			continue
		}
		if err != nil {
			t.Fatalf("write %d+%d: %v", off, n, err)
		}
		copy(m[off:], p)
		p[0] ^= 0xff // the backend must not keep p
		got := make([]byte, n)
		if err := b.ReadAt(ctx, got, off); err != nil {
			t.Fatalf("read %d+%d: %v", off, n, err)
		}
		if !bytes.Equal(got, m[off:off+n]) {
			t.Fatalf("read %d+%d differs from what was written", off, n)
		}
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	check(t, b, m, "after the writes and a flush")
}

// bounds: the last byte reads and (writable) writes.
func bounds(t *testing.T, s Subject) {
	ctx := context.Background()
	b, m := s.Backend, model(t, s)
	size := b.Size()
	got := make([]byte, 1)
	if err := b.ReadAt(ctx, got, size-1); err != nil || got[0] != m[size-1] {
		t.Fatalf("the last byte: %#x, %v; want %#x", got[0], err, m[size-1])
	}
	if s.ReadOnly {
		return
	}
	if err := b.WriteAt(ctx, []byte{0x5a}, size-1, true); err != nil {
		t.Fatalf("write the last byte: %v", err)
	}
	m[size-1] = 0x5a
	check(t, b, m, "after writing the last byte")
}

// extents: they cover at least one byte, never more than asked, and
// where they say zeros the backend reads zeros.
func extents(t *testing.T, s Subject) {
	ctx := context.Background()
	ex, ok := s.Backend.(nbd.Extenter)
	if !ok {
		return // not an Extenter: every range is data, nothing to check
	}
	b, m := s.Backend, model(t, s)
	size := b.Size()
	if !s.ReadOnly {
		for _, off := range []int64{0, size / 3, size - 4096} {
			p := bytes.Repeat([]byte{7}, 4096)
			if err := b.WriteAt(ctx, p, off, false); err != nil {
				t.Fatal(err)
			}
			copy(m[off:], p)
		}
	}
	for _, start := range []int64{0, 1, size / 2, size - 1} {
		for off := start; off < size; {
			es, err := ex.Extents(ctx, off, size-off)
			if err != nil {
				t.Fatalf("extents at %d: %v", off, err)
			}
			if len(es) == 0 {
				t.Fatalf("extents at %d: none", off)
			}
			for _, e := range es {
				if e.Length <= 0 || off+e.Length > size {
					t.Fatalf("extent at %d of %d bytes: outside [%d, %d)", off, e.Length, off, size)
				}
				if e.Flags&nbd.StateZero != 0 && !bytes.Equal(m[off:off+e.Length], make([]byte, e.Length)) {
					t.Fatalf("extent at %d+%d says zeros, and the bytes there are not", off, e.Length)
				}
				off += e.Length
			}
		}
	}
}

// zeroAndTrim: a Zeroer makes a range read as zeros, NO_HOLE or not; a
// Trimmer takes any range.
func zeroAndTrim(t *testing.T, s Subject) {
	if s.ReadOnly {
		return // readBack checks that writes are refused
	}
	ctx := context.Background()
	b, m := s.Backend, model(t, s)
	size := b.Size()
	data := bytes.Repeat([]byte{0xa5}, int(size))
	if err := b.WriteAt(ctx, data, 0, false); err != nil {
		t.Fatal(err)
	}
	copy(m, data)
	if z, ok := b.(nbd.Zeroer); ok {
		for i, r := range [][2]int64{{0, 4096}, {5000, 70000}, {size - 3, 3}} {
			if err := z.Zero(ctx, r[0], r[1], i == 1); err != nil {
				t.Fatalf("zero %d+%d: %v", r[0], r[1], err)
			}
			clear(m[r[0] : r[0]+r[1]])
		}
		check(t, b, m, "after Zero")
	}
	if tr, ok := b.(nbd.Trimmer); ok {
		if err := tr.Trim(ctx, 8192, 4096); err != nil {
			t.Fatalf("trim: %v", err)
		}
	}
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
}

// concurrent: writes to disjoint ranges from many goroutines all land.
func concurrent(t *testing.T, s Subject) {
	if s.ReadOnly {
		return // readBack checks that writes are refused
	}
	ctx := context.Background()
	b, m := s.Backend, model(t, s)
	const workers = 8
	piece := b.Size() / workers
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		p := bytes.Repeat([]byte{byte(w + 1)}, int(piece))
		copy(m[int64(w)*piece:], p)
		wg.Go(func() {
			for off := int64(0); off < piece; off += 4096 {
				if err := b.WriteAt(ctx, p[off:min(off+4096, piece)], int64(w)*piece+off, false); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	check(t, b, m, "after concurrent writes")
}
