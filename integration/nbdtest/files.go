package nbdtest

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// SparseFile creates a file of size bytes in t's temporary directory that
// is one hole (os.Truncate), and returns its path.
func SparseFile(t testing.TB, name string, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// OpenFile opens path as an nbd.File backend, closed at the end of t
// (after a server started later in t has shut down).
func OpenFile(t testing.TB, path string, readOnly bool) *nbd.File {
	t.Helper()
	b, err := nbd.OpenFile(path, readOnly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// RandomBytes returns n pseudo-random bytes, the same for the same seed.
func RandomBytes(seed uint64, n int) []byte {
	p := make([]byte, n)
	r := rand.NewChaCha8([32]byte{0: byte(seed), 1: byte(seed >> 8), 2: byte(seed >> 16), 3: byte(seed >> 24),
		4: byte(seed >> 32), 5: byte(seed >> 40), 6: byte(seed >> 48), 7: byte(seed >> 56)})
	_, _ = r.Read(p)
	return p
}

// WriteAt writes p at off in the file at path, which must exist.
func WriteAt(t testing.TB, path string, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(p, off); err != nil {
		f.Close()
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// ReadFile returns the contents of path.
func ReadFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Diff describes how got differs from want ("" if it does not): the
// lengths, or the first differing offset with a few bytes of each, and how
// many bytes differ in all.
func Diff(want, got []byte) string {
	if bytes.Equal(want, got) {
		return ""
	}
	n := min(len(want), len(got))
	first, count := -1, 0
	for i := range n {
		if want[i] != got[i] {
			if first < 0 {
				first = i
			}
			count++
		}
	}
	var s string
	if len(want) != len(got) {
		s = fmt.Sprintf("length %d, want %d; ", len(got), len(want))
	}
	if first < 0 {
		return s + "the common part is equal"
	}
	end := min(first+16, n)
	return s + fmt.Sprintf("%d bytes differ, the first at offset %d (%#x): got % x, want % x",
		count, first, first, got[first:end], want[first:end])
}

// SameBytes fails t unless got equals want; what names got in the message.
func SameBytes(t testing.TB, want, got []byte, what string) {
	t.Helper()
	if d := Diff(want, got); d != "" {
		t.Errorf("%s: %s", what, d)
	}
}
