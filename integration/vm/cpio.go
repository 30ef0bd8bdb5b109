package vm

import (
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// cpioArchive collects the entries of an initramfs and writes them in the
// "newc" format, the one the kernel unpacks. Entries are written sorted by
// name, so every directory comes before what it holds and two builds of
// the same inputs give the same bytes.
type cpioArchive struct {
	entries map[string]cpioEntry
}

type cpioEntry struct {
	mode         uint32 // file type and permission bits, as in stat(2)
	data         []byte // file contents, or a symlink's target
	rmajor, rmin uint32 // a device node's number
}

const (
	modeDir     = 0o040000
	modeFile    = 0o100000
	modeSymlink = 0o120000
	modeChar    = 0o020000
)

func newCPIO() *cpioArchive { return &cpioArchive{entries: map[string]cpioEntry{}} }

// has reports whether name is already in the archive.
func (a *cpioArchive) has(name string) bool {
	_, ok := a.entries[clean(name)]
	return ok
}

// dir adds a directory and its parents.
func (a *cpioArchive) dir(name string) {
	name = clean(name)
	for name != "." && name != "" {
		if _, ok := a.entries[name]; ok {
			return
		}
		a.entries[name] = cpioEntry{mode: modeDir | 0o755}
		name = path.Dir(name)
	}
}

// file adds a regular file, and its parent directories.
func (a *cpioArchive) file(name string, perm uint32, data []byte) {
	name = clean(name)
	a.dir(path.Dir(name))
	a.entries[name] = cpioEntry{mode: modeFile | perm&0o7777, data: data}
}

// symlink adds name pointing at target, and name's parent directories.
func (a *cpioArchive) symlink(name, target string) {
	name = clean(name)
	a.dir(path.Dir(name))
	a.entries[name] = cpioEntry{mode: modeSymlink | 0o777, data: []byte(target)}
}

// charDev adds a character device node.
func (a *cpioArchive) charDev(name string, perm, major, minor uint32) {
	name = clean(name)
	a.dir(path.Dir(name))
	a.entries[name] = cpioEntry{mode: modeChar | perm&0o7777, rmajor: major, rmin: minor}
}

func clean(name string) string { return strings.TrimPrefix(path.Clean("/"+name), "/") }

// writeTo writes the archive with its trailer.
func (a *cpioArchive) writeTo(w io.Writer) error {
	names := make([]string, 0, len(a.entries))
	for n := range a.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	for i, n := range names {
		if err := writeCPIOEntry(w, uint32(i+1), n, a.entries[n]); err != nil {
			return err
		}
	}
	return writeCPIOEntry(w, 0, "TRAILER!!!", cpioEntry{})
}

func writeCPIOEntry(w io.Writer, ino uint32, name string, e cpioEntry) error {
	nlink := uint32(1)
	if e.mode&0o170000 == modeDir {
		nlink = 2
	}
	// magic, then 13 fields of 8 hex digits: ino, mode, uid, gid, nlink,
	// mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize
	// (with its NUL), check.
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rmajor, e.rmin, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+8+len(e.data)+4)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	buf = append(buf, e.data...)
	buf = pad4(buf)
	_, err := w.Write(buf)
	return err
}

// pad4 pads b with NULs to a multiple of 4 bytes. Every header starts on
// such a boundary, so padding the running entry is enough.
func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}
