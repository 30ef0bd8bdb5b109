package volume

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/nbdvault/nbdvault/internal/fsync"
)

// HoldersFile, in the state folder, lists every lease holder ID a server
// on this folder has used, one per line. A server appends its ID before
// it sends the lease PUT that could make it the holder, so every manifest
// and volume record it writes names an ID the file holds (their Writer).
// A volume whose history another writer went on with does not replay the
// writes of its log that no manifest of this folder covers
// (docs/architecture.md, "A server back after a takeover it never saw").
const HoldersFile = "holders"

// Holders is the state folder's list of its lease holders.
type Holders struct {
	path string
	mu   sync.Mutex
	ids  map[string]bool
}

// OpenHolders reads dir's holders file (none yet: an empty list). A torn
// last line (a crash while appending) is ignored: the lease PUT it would
// have preceded was never sent.
func OpenHolders(dir string) (*Holders, error) {
	h := &Holders{path: filepath.Join(dir, HoldersFile), ids: map[string]bool{}}
	data, err := os.ReadFile(h.path)
	if err != nil && !os.IsNotExist(err) {
		return nil, fmt.Errorf("state folder: %w", err)
	}
	whole := data[:bytes.LastIndexByte(data, '\n')+1] // a torn last line left out
	for _, id := range strings.Fields(string(whole)) {
		h.ids[id] = true
	}
	return h, nil
}

// Add appends id to the file and makes it durable (the file and its
// folder) before it returns. A torn last line is cut off first, so that
// id is read whole. It appends in place, so a restart on a full state
// disk still records its ID while the file's last block has room.
func (h *Holders) Add(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	f, err := os.OpenFile(h.path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(f)
	if err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	end := int64(bytes.LastIndexByte(data, '\n') + 1)
	if end < int64(len(data)) {
		err = f.Truncate(end)
	}
	if err == nil {
		_, err = f.WriteAt([]byte(id+"\n"), end)
	}
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = f.Close()
	}
	if err == nil {
		err = fsync.Dir(filepath.Dir(h.path))
	}
	if err != nil {
		return fmt.Errorf("state folder: record the lease holder in %s: %w", h.path, err)
	}
	h.ids[id] = true
	return nil
}

// Remove takes id back: a start that never wrote a lease record (another
// server held it) leaves no ID, so restarts in a loop do not grow the
// file. The file is replaced whole; if that fails (a full disk), id
// stays, which costs nothing but its line.
func (h *Holders) Remove(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.ids[id] {
		return nil
	}
	var kept bytes.Buffer
	for other := range h.ids {
		if other != id {
			kept.WriteString(other + "\n")
		}
	}
	if err := fsync.WriteFile(h.path, kept.Bytes()); err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	delete(h.ids, id)
	return nil
}

// Used reports whether any server has used this folder.
func (h *Holders) Used() bool {
	if h == nil {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ids) > 0
}

// Own reports whether writer is a holder of this folder. The empty
// writer (a manifest or record from before writers were kept) counts as
// its own; so does every writer when h is nil (no list kept).
func (h *Holders) Own(writer string) bool {
	if h == nil || writer == "" {
		return true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ids[writer]
}
