package volume

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

// Config is a volume's record in the repository
// (volumes/<name>/volume).
type Config struct {
	Name      string    `json:"name"`
	Size      int64     `json:"size"`
	ChunkSize int64     `json:"chunk_size"`
	Created   time.Time `json:"created"`
	// Retention is the policy the server applies after each seal that
	// made a snapshot sealed (Volume.SetRetention); zero: none, every
	// snapshot is kept. Records without it (older ones) read as none.
	Retention retention.Policy `json:"retention,omitzero"`
	// Writer is the lease holder ID of the server that created the
	// volume (Env.Writer; empty in older records). Rewrites keep it.
	Writer string `json:"writer,omitempty"`
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

var labelRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$`)

// ValidLabel says what is wrong with a snapshot label, if anything. A
// label names a snapshot in VOL@LABEL, in URIs and on command lines, so
// it takes the characters of a volume name and ':' and '+' (for times),
// and is never a snapshot ID, which VOL@ID would then find twice, nor an
// RFC 3339 time, which VOL@TIME reads as a point in time.
func ValidLabel(label string) error {
	if !labelRE.MatchString(label) {
		return fmt.Errorf("%w: snapshot label %q: use 1-128 letters, digits, '.', '_', '-', ':' or '+', starting with a letter or digit", ErrInvalid, label)
	}
	if idRE.MatchString(label) {
		return fmt.Errorf("%w: snapshot label %q has the form of a snapshot ID", ErrInvalid, label)
	}
	if _, err := time.Parse(time.RFC3339Nano, label); err == nil {
		// VOL@TIME is the volume at that time; a label would hide it.
		return fmt.Errorf("%w: snapshot label %q is a time, which VOL@TIME reads as a point in time; add a word (db-%s)", ErrInvalid, label, label)
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
	// Deltas apply over Root, oldest first (format 3): the journal of
	// what was written since Root's chunks were built.
	Deltas []DeltaRef `json:"deltas,omitempty"`
	// Protected: a snapshot that neither delete nor prune removes until
	// it is unprotected (Volume.Protect).
	Protected bool `json:"protected,omitempty"`
	// By is who took the snapshot when it was not the admin (token or
	// certificate) or the server: "token:ID", "cert:NAME". The automatic
	// prune leaves such snapshots alone while they are young, so that a
	// source host broken into cannot push history out with snapshots.
	By string `json:"by,omitempty"`
	// Writer is the lease holder ID of the server whose seal made the
	// manifest (Env.Writer; empty in older ones). Copies of it (a kept
	// point, protect) keep it: their content is its seal's.
	Writer string `json:"writer,omitempty"`
}

func volumeKey(name string) string { return volumePrefix(name) + "volume" }

// List returns the names of the volumes in the repository, sorted: those
// with a record (volumes/NAME/volume).
func List(ctx context.Context, repo chunkstore.Backend) ([]string, error) {
	var names []string
	err := repo.List(ctx, "volumes/", func(k string) error {
		parts := strings.Split(k, "/")
		if len(parts) == 3 && parts[2] == "volume" {
			names = append(names, parts[1])
		}
		return nil
	})
	slices.Sort(names)
	return names, err
}

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

// putJSON writes v as a checked object (chunkstore.Checked).
func putJSON(ctx context.Context, b chunkstore.Backend, repoID, key string, v any) error {
	obj, err := encodeObject(repoID, key, v)
	if err != nil {
		return err
	}
	return b.Put(ctx, key, obj)
}

// encodeObject is v as the checked object at key.
func encodeObject(repoID, key string, v any) ([]byte, error) {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, err
	}
	return chunkstore.Checked(repoID, key, append(data, '\n')), nil
}

// getJSON reads the checked object at key into v. A missing or wrong
// checksum, or a document that does not parse, is ErrCorrupt naming key.
func getJSON(ctx context.Context, b chunkstore.Backend, repoID, key string, v any) error {
	data, err := b.Get(ctx, key)
	if err != nil {
		return err
	}
	return decodeJSON(repoID, key, data, v)
}

func decodeJSON(repoID, key string, data []byte, v any) error {
	doc, _, err := chunkstore.Unchecked(repoID, key, data, true)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(doc, v); err != nil {
		return fmt.Errorf("%s: %w: %v", key, chunkstore.ErrCorrupt, err)
	}
	return nil
}

// idRE is a snapshot or checkpoint ID (snapshotID).
var idRE = regexp.MustCompile(`^\d{8}T\d{6}\.\d{3}Z-([0-9a-f]{12,16})$`)

// seqOfID is the log sequence number an ID carries.
func seqOfID(id string) (uint64, bool) {
	m := idRE.FindStringSubmatch(id)
	if m == nil {
		return 0, false
	}
	seq, err := strconv.ParseUint(m[1], 16, 64)
	return seq, err == nil
}

// decodeManifest reads the manifest at key, of volume vol (whose chunk
// size is chunkSize) and of kind, and checks that it says what its key
// says: a checksum proves only that the bytes are the ones written, not
// that they were written there.
func decodeManifest(repoID, key, vol string, kind Kind, chunkSize int64, data []byte) (Manifest, error) {
	var m Manifest
	if err := decodeJSON(repoID, key, data, &m); err != nil {
		return Manifest{}, err
	}
	return m, checkManifest(m, key, vol, kind, chunkSize)
}

// checkManifest says what is wrong with m, the manifest at key, if it
// does not say what its key says.
func checkManifest(m Manifest, key, vol string, kind Kind, chunkSize int64) error {
	id := key[strings.LastIndexByte(key, '/')+1:]
	seq, _ := seqOfID(id)
	var why string
	switch {
	case m.ID != id:
		why = fmt.Sprintf("it says it is %q", m.ID)
	case m.Volume != vol:
		why = fmt.Sprintf("it says it is of volume %q", m.Volume)
	case m.Kind != kind:
		why = fmt.Sprintf("it says it is a %s", m.Kind)
	case m.Seq != seq:
		why = fmt.Sprintf("it says it seals record %d, its ID says %d", m.Seq, seq)
	case m.ChunkSize != chunkSize:
		why = fmt.Sprintf("its chunk size %d is not the volume's %d", m.ChunkSize, chunkSize)
	case m.Size <= 0 || m.Size > MaxSize:
		why = fmt.Sprintf("size %d", m.Size)
	case len(m.Deltas) > 4*maxDepth:
		why = fmt.Sprintf("%d deltas", len(m.Deltas))
	}
	for _, d := range m.Deltas {
		if why != "" {
			break
		}
		if err := chunkstore.CheckKey(d.Pack); err != nil || d.Top.Len == 0 || d.Top.Plain == 0 || d.Top.Plain > chunkstore.MaxFrameSize {
			why = fmt.Sprintf("delta %q at %d is not a frame of a pack", d.Pack, d.Top.Off)
		}
	}
	if why != "" {
		return &chunkstore.KeyError{Op: "check", Key: key, Err: fmt.Errorf("%w: %s", chunkstore.ErrCorrupt, why)}
	}
	return nil
}

// damagedManifest is a manifest that could not be read or failed its
// checks: what its key says, and why.
type damagedManifest struct {
	key   string
	id    string
	kind  Kind
	seq   uint64
	seqOK bool // the key's last part is an ID, which carries seq
	err   error
}

// listManifests returns the manifests of one kind of a volume, oldest
// first, and those that are damaged. Only failures to list or read are
// errors: damage is the caller's to place.
func listManifests(ctx context.Context, b chunkstore.Backend, repoID, volume string, kind Kind, chunkSize int64) ([]Manifest, []damagedManifest, error) {
	var keys []string
	if err := b.List(ctx, manifestPrefix(volume, kind), func(k string) error {
		keys = append(keys, k)
		return nil
	}); err != nil {
		return nil, nil, err
	}
	slices.Sort(keys)
	out := make([]Manifest, 0, len(keys))
	var bad []damagedManifest
	for _, k := range keys {
		data, err := b.Get(ctx, k)
		if errors.Is(err, chunkstore.ErrNotFound) {
			continue // deleted while we listed
		}
		if err != nil && !errors.Is(err, chunkstore.ErrCorrupt) {
			return nil, nil, err
		}
		var m Manifest
		if err == nil {
			m, err = decodeManifest(repoID, k, volume, kind, chunkSize, data)
		}
		if err != nil {
			id := k[strings.LastIndexByte(k, '/')+1:]
			seq, ok := seqOfID(id)
			bad = append(bad, damagedManifest{key: k, id: id, kind: kind, seq: seq, seqOK: ok, err: err})
			continue
		}
		out = append(out, m)
	}
	return out, bad, nil
}

// UpgradeObjects gives every volume record and manifest in repo that
// lacks its checksum line one (repository format 1 to 2): each is read,
// checked as a format 2 reader checks it (it parses, and says what its
// key says), and written back checked. One that fails is left as it is
// and named in damaged (format 2 then reports it as damaged). Objects
// that have their line are skipped, so an upgrade cut short is finished
// by running it again. progress, if not nil, hears of every 1000 objects.
// The caller holds the lease.
func UpgradeObjects(ctx context.Context, repo chunkstore.Backend, repoID string, progress func(done int)) (upgraded int, damaged []string, err error) {
	var keys []string
	if err := repo.List(ctx, "volumes/", func(k string) error {
		keys = append(keys, k)
		return nil
	}); err != nil {
		return 0, nil, err
	}
	slices.Sort(keys) // volumes/VOL/checkpoints/…, /snapshots/…, /volume
	// read returns the object's document, or nil when it has its line
	// already, or is damaged (then named in damaged).
	read := func(k string) ([]byte, error) {
		data, err := repo.Get(ctx, k)
		if errors.Is(err, chunkstore.ErrNotFound) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		doc, summed, err := chunkstore.Unchecked(repoID, k, data, false)
		if err != nil {
			damaged = append(damaged, k)
		}
		if summed {
			return nil, nil
		}
		return doc, nil
	}
	write := func(k string, doc []byte) error {
		if err := repo.Put(ctx, k, chunkstore.Checked(repoID, k, doc)); err != nil {
			return fmt.Errorf("upgrade %s: %w", k, err)
		}
		upgraded++
		if progress != nil && upgraded%1000 == 0 {
			progress(upgraded)
		}
		return nil
	}
	chunkSizes := map[string]int64{} // by volume, from its record
	for _, k := range keys {
		if parts := strings.Split(k, "/"); len(parts) == 3 && parts[2] == "volume" {
			var c Config
			data, err := repo.Get(ctx, k)
			if err != nil && !errors.Is(err, chunkstore.ErrNotFound) {
				return upgraded, damaged, err
			}
			if doc, _, err := chunkstore.Unchecked(repoID, k, data, false); err == nil && json.Unmarshal(doc, &c) == nil &&
				c.Name == parts[1] && c.Validate() == nil {
				chunkSizes[parts[1]] = c.ChunkSize
			}
		}
	}
	for _, k := range keys {
		parts := strings.Split(k, "/") // volumes/VOL/volume, volumes/VOL/KINDs/ID
		var ok func(doc []byte) bool
		switch {
		case len(parts) == 3 && parts[2] == "volume":
			ok = func([]byte) bool { return chunkSizes[parts[1]] != 0 }
		case len(parts) == 4 && (parts[2] == "snapshots" || parts[2] == "checkpoints"):
			kind := Kind(strings.TrimSuffix(parts[2], "s"))
			ok = func(doc []byte) bool {
				var m Manifest
				return json.Unmarshal(doc, &m) == nil && checkManifest(m, k, parts[1], kind, chunkSizes[parts[1]]) == nil
			}
		default:
			continue
		}
		doc, err := read(k)
		if err != nil {
			return upgraded, damaged, err
		}
		if doc == nil {
			continue
		}
		if !ok(doc) {
			damaged = append(damaged, k)
			continue
		}
		if err := write(k, doc); err != nil {
			return upgraded, damaged, err
		}
	}
	return upgraded, damaged, nil
}

// listCheckpoints lists the checkpoint manifests of a volume, but reads
// only the newest that reads well (newest first): the others are known
// by their keys, whose IDs carry their time and sequence number, and are
// read when a point in time needs them. It returns that manifest (nil if
// none reads), every checkpoint as a cut by sequence number, and those
// it found damaged.
func listCheckpoints(ctx context.Context, b chunkstore.Backend, repoID, volume string, chunkSize int64) (*Manifest, []*cut, []damagedManifest, error) {
	var cuts []*cut
	var bad []damagedManifest
	if err := b.List(ctx, manifestPrefix(volume, KindCheckpoint), func(k string) error {
		id := k[strings.LastIndexByte(k, '/')+1:]
		if c, ok := cutOf(id); ok {
			cuts = append(cuts, c)
		} else {
			bad = append(bad, damagedManifest{key: k, id: id, kind: KindCheckpoint, err: fmt.Errorf("%s: %w: not a checkpoint ID", k, chunkstore.ErrCorrupt)})
		}
		return nil
	}); err != nil {
		return nil, nil, nil, err
	}
	slices.SortFunc(cuts, func(a, c *cut) int { return cmpUint(a.seq, c.seq) })
	for i := len(cuts) - 1; i >= 0; i-- {
		c := cuts[i]
		k := manifestKey(volume, KindCheckpoint, c.id)
		data, err := b.Get(ctx, k)
		if errors.Is(err, chunkstore.ErrNotFound) {
			cuts = slices.Delete(cuts, i, i+1) // deleted while we listed
			continue
		}
		if err != nil && !errors.Is(err, chunkstore.ErrCorrupt) {
			return nil, nil, nil, err
		}
		var m Manifest
		if err == nil {
			m, err = decodeManifest(repoID, k, volume, KindCheckpoint, chunkSize, data)
		}
		if err != nil {
			bad = append(bad, damagedManifest{key: k, id: c.id, kind: KindCheckpoint, seq: c.seq, seqOK: true, err: err})
			continue
		}
		c.m = &m
		return &m, cuts, bad, nil
	}
	return nil, cuts, bad, nil
}
