// Package fsync holds the few durability steps the local repository and the
// write log share.
package fsync

import "os"

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
