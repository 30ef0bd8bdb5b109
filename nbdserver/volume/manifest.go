package volume

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
)

// Config is a volume's record in the repository
// (volumes/<name>/volume).
type Config struct {
	Name      string    `json:"name"`
	Size      int64     `json:"size"`
	ChunkSize int64     `json:"chunk_size"`
	Created   time.Time `json:"created"`
}

// Limits of a volume.
const (
	MinChunkSize     = 64 << 10
	MaxChunkSize     = 16 << 20
	DefaultChunkSize = 1 << 20
	MaxSize          = 64 << 40
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidName says what is wrong with a volume name, if anything.
func ValidName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w: volume name %q: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalid, name)
	}
	return nil
}

// Validate checks a volume's configuration and says what is wrong.
func (c Config) Validate() error {
	if err := ValidName(c.Name); err != nil {
		return err
	}
	switch {
	case c.ChunkSize < MinChunkSize || c.ChunkSize > MaxChunkSize || c.ChunkSize&(c.ChunkSize-1) != 0:
		return fmt.Errorf("%w: chunk size %d: want a power of two from 64 KiB to 16 MiB", ErrInvalid, c.ChunkSize)
	case c.Size <= 0 || c.Size > MaxSize:
		return fmt.Errorf("%w: volume size %d: want 1 byte to 64 TiB", ErrInvalid, c.Size)
	case uint64((c.Size+c.ChunkSize-1)/c.ChunkSize) > MaxChunks:
		return fmt.Errorf("%w: volume of %d bytes has more than %d chunks of %d bytes", ErrInvalid, c.Size, MaxChunks, c.ChunkSize)
	}
	return nil
}

// Kind tells snapshots the user asked for from checkpoints the server made.
type Kind string

const (
	KindSnapshot   Kind = "snapshot"
	KindCheckpoint Kind = "checkpoint"
)

// Manifest describes a sealed point in time of a volume: its index root and
// what it covers. It is written only after every object it names exists.
type Manifest struct {
	ID        string        `json:"id"`
	Kind      Kind          `json:"kind"`
	Volume    string        `json:"volume"`
	Label     string        `json:"label,omitempty"`
	Time      time.Time     `json:"time"`
	Size      int64         `json:"size"`
	ChunkSize int64         `json:"chunk_size"`
	Root      chunkstore.ID `json:"root"`
	// Seq is the log sequence number of the mark this manifest seals:
	// every record up to it is in Root.
	Seq    uint64 `json:"seq"`
	Parent string `json:"parent,omitempty"`
}

func volumeKey(name string) string { return volumePrefix(name) + "volume" }

// volumePrefix is where everything of volume name is in the repository.
func volumePrefix(name string) string { return "volumes/" + name + "/" }

func manifestPrefix(name string, kind Kind) string {
	return volumePrefix(name) + string(kind) + "s/"
}

func manifestKey(name string, kind Kind, id string) string { return manifestPrefix(name, kind) + id }

// snapshotID makes an ID that sorts by time, then by log position.
func snapshotID(t time.Time, seq uint64) string {
	return fmt.Sprintf("%s-%012x", t.UTC().Format("20060102T150405.000Z"), seq)
}

func putJSON(ctx context.Context, b chunkstore.Backend, key string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return b.Put(ctx, key, append(data, '\n'))
}

func getJSON(ctx context.Context, b chunkstore.Backend, key string, v any) error {
	data, err := b.Get(ctx, key)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("%s: %w: %v", key, chunkstore.ErrCorrupt, err)
	}
	return nil
}

// listManifests returns the manifests of one kind of a volume, oldest
// first.
func listManifests(ctx context.Context, b chunkstore.Backend, volume string, kind Kind) ([]Manifest, error) {
	var keys []string
	if err := b.List(ctx, manifestPrefix(volume, kind), func(k string) error {
		keys = append(keys, k)
		return nil
	}); err != nil {
		return nil, err
	}
	slices.Sort(keys)
	out := make([]Manifest, 0, len(keys))
	for _, k := range keys {
		var m Manifest
		if err := getJSON(ctx, b, k, &m); err != nil {
			if errors.Is(err, chunkstore.ErrNotFound) {
				continue // deleted while we listed
			}
			return nil, err
		}
		if m.ID != k[strings.LastIndexByte(k, '/')+1:] {
			return nil, fmt.Errorf("%s: %w: it says it is %q", k, chunkstore.ErrCorrupt, m.ID)
		}
		out = append(out, m)
	}
	return out, nil
}
