// Package api is the nbdvault server's admin API: the JSON it speaks over
// HTTP and a client for it. docs/api.md describes the same for people.
//
// Every request carries the server's token as "Authorization: Bearer
// TOKEN". Errors come back as an Error with an HTTP status and a Code.
package api

import (
	"errors"
	"fmt"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/retention"
)

// Volume is a volume and, in listings and shows, its upload state.
type Volume struct {
	Name      string    `json:"name"`
	Size      int64     `json:"size"`
	ChunkSize int64     `json:"chunk_size"`
	Created   time.Time `json:"created"`
	// Retention is the volume's stored policy, which the server applies
	// after each snapshot is sealed; absent when it has none.
	Retention *Policy       `json:"retention,omitempty"`
	Status    *VolumeStatus `json:"status,omitempty"`
	// Space is what the volume holds, as the last garbage collection
	// counted it; absent until one has since the volume was created.
	Space *SpaceTotals `json:"space,omitempty"`
}

// SpaceTotals are a volume's or the repository's space, as the last
// garbage collection (a dry run too) counted it: the figures age from
// AsOf.
type SpaceTotals struct {
	// AsOf is when the collection listed the manifests it counted.
	AsOf time.Time `json:"as_of"`
	// Logical is the bytes the head reads as data (for the repository,
	// the sum over volumes); Written is that summed over the snapshots
	// and the head (checkpoints not counted).
	Logical int64 `json:"logical"`
	Written int64 `json:"written"`
	// Chunks and Pages count the distinct data chunks and index pages
	// referenced; Referenced is the plaintext bytes of those chunks.
	Chunks     int64 `json:"chunks"`
	Pages      int64 `json:"pages"`
	Referenced int64 `json:"referenced"`
	// Stored is the repository's bytes for them: DataStored (chunks) +
	// PageStored (index pages) + Journal (journal packs). A volume's
	// figures count only what no other volume references: its Stored is
	// what deleting it frees.
	Stored     int64 `json:"stored"`
	DataStored int64 `json:"data_stored"`
	PageStored int64 `json:"page_stored"`
	Journal    int64 `json:"journal"`
	// Shared is, for the repository, the stored bytes of the objects
	// more than one volume references: they are in no volume's figures.
	// SharesWithOthers says a volume references such objects (its
	// DedupRatio is then 0: not known).
	Shared           int64 `json:"shared,omitempty"`
	SharesWithOthers bool  `json:"shares_with_other_volumes,omitempty"`
	// DedupRatio is Written / Referenced; CompressionRatio is Referenced
	// / DataStored (0 when there is nothing to divide by).
	DedupRatio       float64 `json:"dedup_ratio"`
	CompressionRatio float64 `json:"compression_ratio"`
}

// AutoPrune is what the last automatic prune of a volume (its stored
// policy, applied after a seal) did, since the server started.
type AutoPrune struct {
	Time    time.Time `json:"time"`
	Removed int       `json:"removed"`
	Kept    int       `json:"kept"`
	// Error says why it removed nothing, or not all it should; it is
	// tried again after the next snapshot is sealed. Empty when it worked.
	Error string `json:"error,omitempty"`
}

// VolumeStatus is how far the repository is behind a volume's head.
type VolumeStatus struct {
	// PendingBytes is the write log the volume holds on the server's
	// disk: what the repository does not hold yet (log segments leave
	// once uploaded).
	PendingBytes int64 `json:"pending_bytes"`
	// PendingSnapshots counts snapshots and checkpoints taken but not
	// yet sealed.
	PendingSnapshots int `json:"pending_snapshots"`
	// LagSeconds is how long the oldest write the repository does not
	// hold yet has waited (the recovery point if the server's disk were
	// lost now); 0 when it holds everything.
	LagSeconds float64 `json:"lag_seconds"`
	// LastSeal is when the last snapshot or checkpoint was sealed.
	LastSeal *time.Time `json:"last_seal,omitempty"`
	// PointsInTimeFrom is the oldest time VOL@TIME reads (the server
	// keeps checkpoints for --journal-retention); unset when none.
	PointsInTimeFrom *time.Time `json:"points_in_time_from,omitempty"`
	// ExpiryError says why a checkpoint that left the retention window
	// could not be deleted: it, and the journal it keeps, stay until it
	// is. Empty when expiry works.
	ExpiryError string `json:"expiry_error,omitempty"`
	// LastSealedSnapshot is the newest sealed snapshot's ID, if any.
	LastSealedSnapshot string `json:"last_sealed_snapshot,omitempty"`
	// SealError is the last upload's failure, until one succeeds.
	SealError string `json:"seal_error,omitempty"`
	// Damaged says why the volume is not served, or serves errors for
	// part of its data: damage in its write log (or anything else that
	// stopped it from opening) and what to do (`nbdvault volume
	// recover`). Empty when healthy.
	Damaged string `json:"damaged,omitempty"`
	// LogError is why the volume takes no more writes (a failed
	// fdatasync of its write log); a restart of the server clears it.
	LogError string `json:"log_error,omitempty"`
	// DiskFull: the state disk is full and writes wait until the
	// uploader frees sealed log segments.
	DiskFull bool `json:"disk_full,omitempty"`
	// LastPrune is the last automatic prune by the volume's stored
	// policy; absent until one ran since the server started.
	LastPrune *AutoPrune `json:"last_prune,omitempty"`
}

// Snapshot is one snapshot of a volume.
type Snapshot struct {
	Volume string    `json:"volume"`
	ID     string    `json:"id"`
	Label  string    `json:"label,omitempty"`
	Time   time.Time `json:"time"`
	Size   int64     `json:"size"`
	// Sealed: uploaded; it no longer depends on the server's disk.
	Sealed bool `json:"sealed"`
	// Damaged says why the snapshot's manifest cannot be trusted: such a
	// snapshot is not served; delete it, or restore its manifest from a
	// copy of the repository.
	Damaged string `json:"damaged,omitempty"`
	// Kind is "checkpoint" when the snapshot is a point in time the
	// server kept (VOL@TIME): it leaves with the retention window.
	Kind string `json:"kind,omitempty"`
	// Protected: delete and prune leave it until it is unprotected.
	Protected bool `json:"protected,omitempty"`
	// TakenBy is who took it, when not the admin token or the server: a
	// scoped token ("token:ID") or a certificate ("cert:NAME").
	TakenBy string `json:"taken_by,omitempty"`
	// Used is the stored bytes only this snapshot references: what
	// deleting it alone frees (once the point-in-time window no longer
	// keeps its state). Used does not sum: deleting several frees also
	// what only they share. LogicalReferenced (LREFER) is the bytes it
	// reads as data. Both are as of SpaceAsOf, the last garbage
	// collection; absent for a snapshot it did not count (taken since).
	Used              *int64     `json:"used,omitempty"`
	LogicalReferenced *int64     `json:"logical_referenced,omitempty"`
	SpaceAsOf         *time.Time `json:"space_as_of,omitempty"`
}

// UpdateSnapshot is the body of PATCH /v1/volumes/{name}/snapshots/{snap}.
type UpdateSnapshot struct {
	Protected *bool `json:"protected,omitempty"`
}

// Policy is a retention policy: which snapshots prune keeps.
type Policy = retention.Policy

// Prune is the body of POST /v1/volumes/{name}/prune.
type Prune struct {
	Policy Policy `json:"policy"`
	// DryRun says what would be removed, and removes nothing.
	DryRun bool `json:"dry_run,omitempty"`
}

// Pruned is the answer of POST /v1/volumes/{name}/prune: every snapshot
// of the volume, newest first, and what prune did with it.
type Pruned struct {
	Volume    string          `json:"volume"`
	Policy    string          `json:"policy"` // as flags
	DryRun    bool            `json:"dry_run,omitempty"`
	Snapshots []PruneDecision `json:"snapshots"`
	Removed   int             `json:"removed"`
	// Failed counts the snapshots to remove that are still there; each
	// says why in Error.
	Failed int `json:"failed,omitempty"`
}

// PruneDecision is one snapshot and what prune did with it.
type PruneDecision struct {
	Snapshot
	Keep    bool     `json:"keep"`
	Reasons []string `json:"reasons,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// Status is the server's state: where it keeps data, where it serves NBD,
// and every volume with its upload state.
type Status struct {
	Version    string `json:"version"`
	Repository string `json:"repository"`
	// RepositoryState says whether the repository answers and uploads
	// run.
	RepositoryState RepositoryState `json:"repository_state"`
	// StateDisk is the file system of the server's state folder (the
	// write logs).
	StateDisk Disk     `json:"state_disk"`
	NBD       []string `json:"nbd"` // listen addresses: host:port or unix:/path
	Volumes   []Volume `json:"volumes"`
	// LastVerify is the last verify's result, kept in the state folder.
	LastVerify *VerifyReport `json:"last_verify,omitempty"`
	// Space is what the repository holds, as the last garbage collection
	// counted it (each object once); absent until one has.
	Space *SpaceTotals `json:"space,omitempty"`
}

// Disk is a file system's size and what is free on it.
type Disk struct {
	Path       string `json:"path"`
	TotalBytes int64  `json:"total_bytes"`
	FreeBytes  int64  `json:"free_bytes"` // available to the server
}

// RepositoryState is whether the repository answers and may be written.
type RepositoryState struct {
	// Reachable is false from the first request that got no answer until
	// one does; UnreachableSince and LastError say since when and why.
	Reachable        bool       `json:"reachable"`
	UnreachableSince *time.Time `json:"unreachable_since,omitempty"`
	LastError        string     `json:"last_error,omitempty"`
	// UploadsPaused is true while the repository lease is not confirmed
	// (its renewals get no answer): nothing is written to the repository
	// until one succeeds. NBD goes on meanwhile.
	UploadsPaused bool `json:"uploads_paused"`
	// LeaseConfirmedUntil is when uploads pause unless the lease is
	// renewed first.
	LeaseConfirmedUntil time.Time `json:"lease_confirmed_until"`
	// PendingBytes is the write log of all volumes that waits to be
	// uploaded.
	PendingBytes int64 `json:"pending_bytes"`
}

// CreateVolume is the body of POST /v1/volumes.
type CreateVolume struct {
	Name      string `json:"name"`
	Size      int64  `json:"size"`
	ChunkSize int64  `json:"chunk_size,omitempty"`
}

// Recovery is the answer of POST /v1/volumes/{name}/recover: what a
// recovery cut off the volume's write log to open it at its newest good
// state.
type Recovery struct {
	Volume string `json:"volume"`
	// Damaged is false when the log had no damage: nothing was cut.
	Damaged bool `json:"damaged"`
	// Where the first damaged record was, and what was wrong with it.
	Segment string `json:"segment,omitempty"`
	Offset  int64  `json:"offset,omitempty"`
	Record  uint64 `json:"record,omitempty"`
	Why     string `json:"why,omitempty"`
	// What was cut: bytes of log, and the good records found among them
	// (at least that many writes are lost), moved to MovedTo.
	BytesCut   int64  `json:"bytes_cut,omitempty"`
	RecordsCut int    `json:"records_cut,omitempty"`
	MovedTo    string `json:"moved_to,omitempty"`
	// SnapshotsLost are the snapshots whose marks were cut.
	SnapshotsLost []Snapshot `json:"snapshots_lost,omitempty"`
	// Forked: the log was not damaged but held writes that another
	// server's history of the volume does not have (it took the lease
	// over while this server was down): all of it was moved to MovedTo.
	Forked bool `json:"forked,omitempty"`
}

// UpdateVolume is the body of PATCH /v1/volumes/{name}: what to change.
type UpdateVolume struct {
	// Size, if not 0, grows the volume to this many bytes.
	Size int64 `json:"size,omitempty"`
	// Retention, if present, becomes the volume's stored policy; an
	// empty one ({}) clears it (every snapshot is then kept).
	Retention *Policy `json:"retention,omitempty"`
}

// CreateSnapshot is the body of POST /v1/volumes/{name}/snapshots.
type CreateSnapshot struct {
	Label string `json:"label,omitempty"`
	// From, if set, keeps a point in time as the snapshot instead of
	// marking the head: an RFC 3339 time or a checkpoint's ID.
	From string `json:"from,omitempty"`
}

// ChunkIDs is the answer of GET /v1/volumes/{name}/chunks: the content
// IDs of a run of the head's chunks, for a client that sends only the
// chunks that differ from its own (nbdvault client push).
type ChunkIDs struct {
	ChunkSize int64 `json:"chunk_size"`
	// Hash names how an ID is made from a chunk's bytes (the last chunk
	// zero-padded to the chunk size), e.g. "blake3-256".
	Hash  string `json:"hash"`
	First uint64 `json:"first"`
	// IDs are hex, one per chunk from First; "" for a chunk of zeros.
	IDs []string `json:"ids"`
}

// ChunkCompare asks which of a volume's chunks from First on differ from
// chunks whose hashes are Sums (hex; "" for a chunk of zeros), hashed with
// Hash ("blake3-256") in chunks of ChunkSize (the last one zero-padded).
// The server compares: an encrypted repository's IDs never leave it.
type ChunkCompare struct {
	ChunkSize int64    `json:"chunk_size"`
	Hash      string   `json:"hash"`
	First     uint64   `json:"first"`
	Sums      []string `json:"sums"`
}

// Key is one of an encrypted repository's keys: one password's wrap of
// its master key (never the key itself).
type Key struct {
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	Host    string    `json:"host,omitempty"`
	Label   string    `json:"label,omitempty"`
	// Opened: the key that opened the repository at this start.
	Opened bool `json:"opened,omitempty"`
}

// AddKey adds a password (NewPassword), given one that opens a key
// already (Password): a token alone does not make keys.
type AddKey struct {
	Password    string `json:"password"`
	NewPassword string `json:"new_password"`
	Label       string `json:"label,omitempty"`
}

// CompareHash is the one Hash a ChunkCompare may name.
const CompareHash = "blake3-256"

// ChunkDiff answers a ChunkCompare: the indexes in Sums of the chunks
// that differ, in order.
type ChunkDiff struct {
	First  uint64 `json:"first"`
	Differ []int  `json:"differ"`
}

// MaxChunkIDs is the most IDs one request returns, and the most chunks one
// comparison compares.
const MaxChunkIDs = 16384

// GC is the body of POST /v1/gc.
type GC struct {
	// DryRun counts what a collection would delete, and deletes nothing.
	DryRun bool `json:"dry_run,omitempty"`
	// List lists the repository's chunks rather than trust the server's
	// inventory of them, and rebuilds it: after objects were added to
	// the repository by hand.
	List bool `json:"list,omitempty"`
}

// GCReport is the answer of POST /v1/gc: what a garbage collection found
// and did.
type GCReport struct {
	DryRun    bool `json:"dry_run,omitempty"`
	Manifests int  `json:"manifests"` // snapshots and checkpoints marked
	// DamagedManifests failed their check but named a root, which was
	// marked: verify and repair them.
	DamagedManifests []string `json:"damaged_manifests,omitempty"`
	IndexPages       int      `json:"index_pages"`
	Referenced       int      `json:"referenced"`   // chunk objects referenced, index pages included
	Listed           int      `json:"listed"`       // chunk objects in the repository
	Listing          bool     `json:"listing"`      // they were listed, not taken from the inventory
	Unreferenced     int      `json:"unreferenced"` // of those listed, referenced by nothing
	Deleted          int      `json:"deleted"`
	PutDuring        int      `json:"put_during"` // chunks stored while it ran (kept)
	Seconds          float64  `json:"seconds"`
}

// Verify is the body of POST /v1/verify.
type Verify struct {
	// Targets are VOL or VOL@SNAP; none: every snapshot and checkpoint.
	Targets []string `json:"targets,omitempty"`
	// ReadData fetches, decodes and hashes the chunks and journal
	// frames, not only their presence; Subset reads a part of them: "n/m"
	// the n-th of m parts, "N%" the next N% of the ID space after where
	// the last N% run stopped (the server keeps the place).
	ReadData bool   `json:"read_data,omitempty"`
	Subset   string `json:"subset,omitempty"`
}

// VerifyReport is the answer of POST /v1/verify, and the last one is in
// Status.
type VerifyReport struct {
	Time time.Time `json:"time"`
	// Scheduled: run by the server (serve --verify-every), not asked for.
	Scheduled bool     `json:"scheduled,omitempty"`
	Targets   []string `json:"targets,omitempty"`
	ReadData  bool     `json:"read_data,omitempty"`
	Subset    string   `json:"subset,omitempty"`
	// Range is the part of the ID space an N% subset read.
	Range     *VerifyRange `json:"range,omitempty"`
	Manifests int          `json:"manifests"`
	Pages     int          `json:"index_pages"`
	Chunks    int          `json:"chunks"`
	Read      int          `json:"read"`
	// Deltas and DeltaPages are the delta tops and pages checked (recent
	// data, held as journal); Frames the journal frames they reference,
	// FramesRead those read and hashed.
	Deltas     int     `json:"deltas"`
	DeltaPages int     `json:"delta_pages"`
	Frames     int     `json:"journal_frames"`
	FramesRead int     `json:"journal_frames_read"`
	Seconds    float64 `json:"seconds"`
	// Problems are the damaged or missing objects; empty when all is
	// well.
	Problems []VerifyProblem `json:"problems"`
}

// VerifyRange is a part of the chunk ID space, by the IDs' first 8
// bytes: [From, To), wrapping past ffff…; From == To is all of it.
type VerifyRange struct {
	From        string  `json:"from"` // 16 hex digits
	To          string  `json:"to"`
	FromPercent float64 `json:"from_percent"` // of the ID space
	ToPercent   float64 `json:"to_percent"`
}

// VerifyProblem is a damaged or missing object and what it affects.
type VerifyProblem struct {
	Object  string      `json:"object"`
	Kind    string      `json:"kind"` // "missing" or "damaged"
	Reason  string      `json:"reason"`
	Affects []VerifyRef `json:"affects"`
}

// VerifyRef is a byte range of a snapshot or checkpoint.
type VerifyRef struct {
	Volume   string `json:"volume"`
	Snapshot string `json:"snapshot"`
	Kind     string `json:"kind"`
	Offset   int64  `json:"offset"`
	Length   int64  `json:"length"`
}

// Error is what the server answers when a request fails.
type Error struct {
	Status  int    `json:"-"` // the HTTP status
	Code    string `json:"code"`
	Message string `json:"error"`
}

func (e *Error) Error() string { return e.Message }

// Is lets errors.Is match an *Error against the sentinels below by Code.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Code == e.Code
}

// Error codes, with the sentinels to test for them with errors.Is.
var (
	ErrUnauthorized = &Error{Code: "unauthorized", Status: 401}
	// ErrForbidden: the caller is known but its token's scope (or its
	// certificate's rules) does not cover the request.
	ErrForbidden = &Error{Code: "forbidden", Status: 403}
	// ErrTooSoon: a scoped caller asked for a snapshot sooner than the
	// server allows it another.
	ErrTooSoon     = &Error{Code: "too_soon", Status: 429}
	ErrNotFound    = &Error{Code: "not_found", Status: 404}
	ErrExists      = &Error{Code: "exists", Status: 409}
	ErrNotSealed   = &Error{Code: "not_sealed", Status: 409}
	ErrProtected   = &Error{Code: "protected", Status: 409}
	ErrInvalid     = &Error{Code: "invalid", Status: 400}
	ErrUnavailable = &Error{Code: "unavailable", Status: 503}
	// ErrDamaged: the volume's data is damaged; the message says what to
	// do.
	ErrDamaged  = &Error{Code: "damaged", Status: 409}
	ErrInternal = &Error{Code: "internal", Status: 500}
)

// Errorf makes an error with code's code and status.
func Errorf(code *Error, format string, args ...any) *Error {
	return &Error{Status: code.Status, Code: code.Code, Message: fmt.Sprintf(format, args...)}
}

// ErrUnreachable: no server answered at the address.
var ErrUnreachable = errors.New("cannot reach the nbdvault server")

// Token scopes, each allowing what the one before it does: status reads
// a volume's status and snapshots, snapshot also takes snapshots of it
// (rate-limited), push also reads its chunk IDs (nbdvault client push).
const (
	ScopeStatus   = "status"
	ScopeSnapshot = "snapshot"
	ScopePush     = "push"
)

// CreateToken is the body of POST /v1/tokens.
type CreateToken struct {
	Scope  string `json:"scope"`
	Volume string `json:"volume"`
}

// Token is a scoped token as GET /v1/tokens lists it; Token (the secret)
// only in the answer to its creation, once.
type Token struct {
	ID       string     `json:"id"`
	Scope    string     `json:"scope"`
	Volume   string     `json:"volume"`
	Created  time.Time  `json:"created"`
	LastUsed *time.Time `json:"last_used,omitempty"`
	Token    string     `json:"token,omitempty"`
}

// CheckAccess is the body of POST /v1/access/check: a rules file's text.
type CheckAccess struct {
	Rules string `json:"rules"`
}

// AccessCheck is what new access rules would do: how many rules parsed,
// and the open NBD connections a reload to them would close.
type AccessCheck struct {
	Rules  int               `json:"rules"`
	Closes []RefusedAttached `json:"closes"`
}

// RefusedAttached is an open NBD connection that rules would refuse.
type RefusedAttached struct {
	Identity string `json:"identity"`
	Remote   string `json:"remote"`
	Export   string `json:"export"`
	Why      string `json:"why"`
}
