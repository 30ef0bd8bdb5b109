package chunkstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/internal/fsync"
)

// Local is a Backend in a directory of the local filesystem. A key is a path
// below the root, so the Store's keys "chunks/<2 hex>/<id>" spread chunks
// over 256 directories.
//
// Writes are crash-safe: data goes to a temporary file in the target
// directory, is fdatasync'ed, renamed over the key, and the directory is
// fsync'ed, so after a crash a key holds its old object or the new one and a
// Put that returned survives.
type Local struct {
	root string
}

// Directories and files hold backups: only their owner reads them.
const (
	localDirMode = 0o700
	localTmpGlob = ".tmp-*" // os.CreateTemp makes files with mode 0600
)

// NewLocal opens the directory root as a backend, creating it if missing.
func NewLocal(root string) (*Local, error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("repository path %q: %w", root, err)
	}
	if err := mkdirDurable(abs); err != nil {
		return nil, fmt.Errorf("create repository directory %s: %w", abs, translateOSError(err))
	}
	return &Local{root: abs}, nil
}

func (l *Local) Location() string { return l.root }

func (l *Local) path(key string) string { return filepath.Join(l.root, filepath.FromSlash(key)) }

func (l *Local) Put(ctx context.Context, key string, data []byte) error {
	if err := opCheck(ctx, key); err != nil {
		return err
	}
	if err := l.put(key, data); err != nil {
		return &KeyError{Op: "put", Key: key, Err: translateOSError(err)}
	}
	return nil
}

func (l *Local) put(key string, data []byte) (err error) {
	path := l.path(key)
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, localTmpGlob)
	if errors.Is(err, fs.ErrNotExist) {
		if err = mkdirDurable(dir); err != nil {
			return err
		}
		f, err = os.CreateTemp(dir, localTmpGlob)
	}
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = unix.Fdatasync(int(f.Fd())); err != nil {
		return &os.PathError{Op: "fdatasync", Path: tmp, Err: err}
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	return fsync.Dir(dir)
}

func (l *Local) Get(ctx context.Context, key string) ([]byte, error) {
	if err := opCheck(ctx, key); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(l.path(key))
	if err != nil {
		return nil, &KeyError{Op: "get", Key: key, Err: translateOSError(err)}
	}
	return data, nil
}

func (l *Local) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	if err := opCheck(ctx, key); err != nil {
		return nil, err
	}
	if err := checkRange(key, off, n); err != nil {
		return nil, err
	}
	f, err := os.Open(l.path(key))
	if err != nil {
		return nil, &KeyError{Op: "get", Key: key, Err: translateOSError(err)}
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, &KeyError{Op: "get", Key: key, Err: translateOSError(err)}
	}
	if off+n > fi.Size() {
		return nil, shortObject(key, fi.Size(), off, n)
	}
	data := make([]byte, n)
	if _, err := f.ReadAt(data, off); err != nil {
		return nil, &KeyError{Op: "get", Key: key, Err: translateOSError(err)}
	}
	return data, nil
}

func (l *Local) Has(ctx context.Context, key string) (bool, error) {
	if err := opCheck(ctx, key); err != nil {
		return false, err
	}
	fi, err := os.Stat(l.path(key))
	switch {
	case err == nil:
		return fi.Mode().IsRegular(), nil
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR):
		return false, nil
	default:
		return false, &KeyError{Op: "has", Key: key, Err: translateOSError(err)}
	}
}

func (l *Local) Delete(ctx context.Context, key string) error {
	if err := opCheck(ctx, key); err != nil {
		return err
	}
	err := os.Remove(l.path(key))
	if err == nil || errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return nil
	}
	return &KeyError{Op: "delete", Key: key, Err: translateOSError(err)}
}

func (l *Local) DeleteMany(ctx context.Context, keys []string) error {
	return deleteEach(ctx, l, keys)
}

func (l *Local) List(ctx context.Context, prefix string, fn func(key string) error) error {
	return l.walk(ctx, prefix, func(key string, _ fs.DirEntry) error { return fn(key) })
}

// ListSizes takes each size from the directory entry's Info (one lstat
// each). An entry removed between the read of its directory and the
// stat is skipped, as a delete racing the listing would have it.
func (l *Local) ListSizes(ctx context.Context, prefix string, fn func(key string, size int64) error) error {
	return l.walk(ctx, prefix, func(key string, d fs.DirEntry) error {
		fi, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return &KeyError{Op: "list", Key: key, Err: translateOSError(err)}
		}
		return fn(key, fi.Size())
	})
}

// walk calls fn for every object whose key starts with prefix: the
// regular files below the root, without the temporary ones (and the
// directories) whose names start with ".". An error from fn stops the
// walk and is returned as is.
func (l *Local) walk(ctx context.Context, prefix string, fn func(key string, d fs.DirEntry) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// Walk only the deepest directory the prefix names in full.
	start := l.root
	if i := strings.LastIndexByte(prefix, '/'); i >= 0 {
		start = l.path(prefix[:i])
	}
	var fnErr error
	err := filepath.WalkDir(start, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path == start && errors.Is(err, fs.ErrNotExist) {
				return fs.SkipAll // nothing under this prefix
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if strings.HasPrefix(d.Name(), ".") {
			if d.IsDir() && path != start {
				return fs.SkipDir
			}
			return nil // a temporary file
		}
		if !d.Type().IsRegular() {
			return nil
		}
		key := filepath.ToSlash(path[len(l.root)+1:])
		if !strings.HasPrefix(key, prefix) {
			return nil
		}
		fnErr = fn(key, d)
		return fnErr
	})
	if err == nil || fnErr != nil || err == ctx.Err() {
		return err
	}
	return &KeyError{Op: "list", Key: prefix, Err: translateOSError(err)}
}

// mkdirDurable creates dir and any missing parents, fsyncing the parent of
// each directory it creates so the new entries survive a crash.
func mkdirDurable(dir string) error {
	fi, err := os.Stat(dir)
	if err == nil {
		if !fi.IsDir() {
			return &os.PathError{Op: "mkdir", Path: dir, Err: syscall.ENOTDIR}
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	parent := filepath.Dir(dir)
	if parent != dir {
		if err := mkdirDurable(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, localDirMode); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return fsync.Dir(parent)
}

// translateOSError maps a filesystem error onto this package's sentinels,
// keeping the original for its message.
func translateOSError(err error) error {
	var sentinel error
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
		sentinel = ErrNotFound
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EROFS):
		sentinel = ErrPermission
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		sentinel = ErrNoSpace
	default:
		return err
	}
	return fmt.Errorf("%w: %w", sentinel, err)
}

// RemoveTemporary removes the temporary files that Puts cut short by a
// crash left in the repository (List hides them, so nothing else ever
// removes them), if they were last written more than age ago: a Put in
// flight writes a younger one. It returns how many it removed and their
// size. Run it only while holding the repository's lease.
func (l *Local) RemoveTemporary(ctx context.Context, age time.Duration) (n int, size int64, err error) {
	cutoff := time.Now().Add(-age)
	err = filepath.WalkDir(l.root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed meanwhile
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.IsDir() || !d.Type().IsRegular() {
			return nil
		}
		if ok, _ := filepath.Match(localTmpGlob, d.Name()); !ok {
			return nil
		}
		fi, err := d.Info()
		if err != nil || !fi.ModTime().Before(cutoff) {
			return nil
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		n++
		size += fi.Size()
		return nil
	})
	if err != nil {
		return n, size, fmt.Errorf("remove temporary files from %s: %w", l.root, err)
	}
	return n, size, nil
}

// Under returns the backend of type T under b's wrappers (Retry and the
// like, through Unwrap), if there is one: a local folder, an S3 bucket.
func Under[T Backend](b Backend) (T, bool) {
	for {
		if t, ok := b.(T); ok {
			return t, true
		}
		u, ok := b.(Unwrapper)
		if !ok {
			var zero T
			return zero, false
		}
		b = u.Unwrap()
	}
}
