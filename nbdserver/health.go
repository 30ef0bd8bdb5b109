package nbdserver

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// repoHealth follows whether the repository answers, from the outcome of
// every request to it (the counting backend and the lease report here).
// An outage begins at the first request that got no answer, and ends at
// the first that got one (an object, "not found", a refusal: anything
// the store said).
type repoHealth struct {
	log *slog.Logger

	mu      sync.Mutex
	down    bool
	since   time.Time // when the repository stopped answering
	lastErr error
}

// observe records a request's outcome.
func (h *repoHealth) observe(err error) {
	if h == nil || errors.Is(err, context.Canceled) {
		return
	}
	unanswered := errors.Is(err, chunkstore.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded)
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case unanswered && !h.down:
		h.down, h.since, h.lastErr = true, time.Now(), err
		h.log.Warn("the repository does not answer; NBD goes on, writes wait in the write logs and uploads resume by themselves once it answers", "error", err)
	case unanswered:
		h.lastErr = err
	case h.down:
		h.log.Info("the repository answers again", "was_down_for", time.Since(h.since).Round(time.Second))
		h.down, h.lastErr = false, nil
	}
}

// state reports whether the repository answers, and if not, since when
// and the last error.
func (h *repoHealth) state() (up bool, since time.Time, lastErr error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return !h.down, h.since, h.lastErr
}

// stateDisk reports the file system of the state folder.
func (s *Server) stateDisk() api.Disk {
	d := api.Disk{Path: filepath.Join(s.opts.Data, "state")}
	var st unix.Statfs_t
	if unix.Statfs(d.Path, &st) == nil {
		d.TotalBytes, d.FreeBytes = int64(st.Blocks)*st.Bsize, int64(st.Bavail)*st.Bsize
	}
	return d
}
