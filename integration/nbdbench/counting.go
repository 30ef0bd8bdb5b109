package main

import (
	"context"
	"encoding/binary"
	"strings"
	"sync/atomic"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// countingBackend counts what the volume asks of its repository: objects
// and bytes written, by kind, and existence checks and reads. It wraps the
// real backend and changes nothing; the counts are what a snapshot costs
// in requests to an object store.
type countingBackend struct {
	chunkstore.Backend
	dataPuts, dataBytes         atomic.Int64 // chunks of volume data
	pagePuts, pageBytes         atomic.Int64 // index pages (chunks too)
	manifestPuts, manifestBytes atomic.Int64 // snapshots' and checkpoints' manifests
	journalPuts, journalBytes   atomic.Int64 // journal packs (repository format 3)
	otherPuts, otherBytes       atomic.Int64 // the volume record
	has, gets                   atomic.Int64 // gets: whole and ranged
}

// indexPageLen is the plaintext size of an index page: 4096 IDs of 32
// bytes (nbdserver/volume/index.go). The volume's data chunks are 1 MiB, so
// the plaintext length in a chunk object's header (docs/architecture.md:
// magic, version, compression, then the length as u32 LE at byte 4) tells
// a page from a data chunk.
const indexPageLen = 4096 * 32

func newCountingBackend(b chunkstore.Backend) *countingBackend {
	return &countingBackend{Backend: b}
}

func (c *countingBackend) Unwrap() chunkstore.Backend { return c.Backend }

func (c *countingBackend) Put(ctx context.Context, key string, data []byte) error {
	err := c.Backend.Put(ctx, key, data)
	if err != nil {
		return err
	}
	n := int64(len(data))
	switch {
	case strings.Contains(key, "/snapshots/") || strings.Contains(key, "/checkpoints/"):
		c.manifestPuts.Add(1)
		c.manifestBytes.Add(n)
	case strings.Contains(key, "/journal/"):
		c.journalPuts.Add(1)
		c.journalBytes.Add(n)
	case !strings.HasPrefix(key, "chunks/"):
		c.otherPuts.Add(1)
		c.otherBytes.Add(n)
	case len(data) >= 8 && binary.LittleEndian.Uint32(data[4:8]) == indexPageLen:
		c.pagePuts.Add(1)
		c.pageBytes.Add(n)
	default:
		c.dataPuts.Add(1)
		c.dataBytes.Add(n)
	}
	return nil
}

func (c *countingBackend) Get(ctx context.Context, key string) ([]byte, error) {
	c.gets.Add(1)
	return c.Backend.Get(ctx, key)
}

// GetRange is a GET too (a ranged one: journal frames, a framed chunk's
// table or frames).
func (c *countingBackend) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	c.gets.Add(1)
	return c.Backend.GetRange(ctx, key, off, n)
}

func (c *countingBackend) Has(ctx context.Context, key string) (bool, error) {
	c.has.Add(1)
	return c.Backend.Has(ctx, key)
}

// repoCounts is a reading of a countingBackend's counters, or the
// difference of two.
type repoCounts struct {
	DataPuts, DataBytes         int64
	PagePuts, PageBytes         int64
	ManifestPuts, ManifestBytes int64
	JournalPuts, JournalBytes   int64
	OtherPuts, OtherBytes       int64
	Has, Gets                   int64
}

func (c *countingBackend) counts() repoCounts {
	return repoCounts{
		DataPuts: c.dataPuts.Load(), DataBytes: c.dataBytes.Load(),
		PagePuts: c.pagePuts.Load(), PageBytes: c.pageBytes.Load(),
		ManifestPuts: c.manifestPuts.Load(), ManifestBytes: c.manifestBytes.Load(),
		JournalPuts: c.journalPuts.Load(), JournalBytes: c.journalBytes.Load(),
		OtherPuts: c.otherPuts.Load(), OtherBytes: c.otherBytes.Load(),
		Has: c.has.Load(), Gets: c.gets.Load(),
	}
}

// since is what happened between an earlier reading and r.
func (r repoCounts) since(earlier repoCounts) repoCounts {
	return repoCounts{
		DataPuts: r.DataPuts - earlier.DataPuts, DataBytes: r.DataBytes - earlier.DataBytes,
		PagePuts: r.PagePuts - earlier.PagePuts, PageBytes: r.PageBytes - earlier.PageBytes,
		ManifestPuts: r.ManifestPuts - earlier.ManifestPuts, ManifestBytes: r.ManifestBytes - earlier.ManifestBytes,
		JournalPuts: r.JournalPuts - earlier.JournalPuts, JournalBytes: r.JournalBytes - earlier.JournalBytes,
		OtherPuts: r.OtherPuts - earlier.OtherPuts, OtherBytes: r.OtherBytes - earlier.OtherBytes,
		Has: r.Has - earlier.Has, Gets: r.Gets - earlier.Gets,
	}
}

// Puts is every object written; Bytes their size.
func (r repoCounts) Puts() int64 {
	return r.DataPuts + r.PagePuts + r.ManifestPuts + r.JournalPuts + r.OtherPuts
}
func (r repoCounts) Bytes() int64 {
	return r.DataBytes + r.PageBytes + r.ManifestBytes + r.JournalBytes + r.OtherBytes
}
