// Package fsync holds the few durability steps the local repository, the
// write log and the server's state folder share.
package fsync

import (
	"os"
	"path/filepath"
)

// Dir fsyncs directory dir, making the creation, removal or renaming of
// its entries durable.
func Dir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// WriteFile replaces path with data (mode 0600, its folder made if need
// be), whole or not at all, and durably: a temporary file synced, renamed
// over path, the folder synced.
func WriteFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync() // else a crash may leave the new name on old bytes
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return Dir(filepath.Dir(path))
}
