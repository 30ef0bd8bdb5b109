package nbdserver

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/lease"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// adminHandler is the admin API (docs/api.md) and /metrics, all behind
// the token.
func (s *Server) adminHandler() http.Handler {
	mux := http.NewServeMux()
	handle := func(pattern string, need action, h func(r *http.Request) (int, any, error)) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			if err := s.permit(r, need); err != nil {
				writeError(w, err)
				return
			}
			if r.ContentLength > maxBodyBytes { // refused before a byte of it is read
				writeError(w, tooLarge())
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes) // a body without a length
			status, out, err := h(r)
			if err != nil {
				if c := callerOfRequest(r); c.scoped() && errors.Is(apiError(err), api.ErrNotFound) {
					// Not the server's message: it lists what exists.
					err = api.Errorf(api.ErrNotFound, "%s %s: not found", r.Method, r.URL.Path)
				}
				writeError(w, err)
				if status := apiError(err).Status; status >= 500 && r.Context().Err() == nil {
					s.log.Warn("admin request failed", "method", r.Method, "path", r.URL.Path, "error", err)
				}
				return
			}
			writeJSON(w, status, out)
		})
	}
	handle("GET /v1/status", actStatus, s.getStatus)
	handle("GET /v1/volumes", actStatus, s.listVolumes)
	handle("POST /v1/volumes", actAdmin, s.createVolume)
	handle("GET /v1/volumes/{vol}", actStatus, s.getVolume)
	handle("PATCH /v1/volumes/{vol}", actAdmin, s.updateVolume)
	handle("DELETE /v1/volumes/{vol}", actAdmin, s.deleteVolume)
	handle("POST /v1/volumes/{vol}/recover", actAdmin, s.recoverVolume)
	handle("GET /v1/volumes/{vol}/chunks", actPush, s.chunkIDs)
	handle("POST /v1/volumes/{vol}/chunks/compare", actPush, s.compareChunks)
	handle("GET /v1/volumes/{vol}/snapshots", actStatus, s.listSnapshots)
	handle("POST /v1/volumes/{vol}/snapshots", actSnapshot, s.createSnapshot)
	handle("GET /v1/volumes/{vol}/snapshots/{snap}", actStatus, s.getSnapshot)
	handle("DELETE /v1/volumes/{vol}/snapshots/{snap}", actAdmin, s.deleteSnapshot)
	handle("PATCH /v1/volumes/{vol}/snapshots/{snap}", actAdmin, s.updateSnapshot)
	handle("POST /v1/volumes/{vol}/prune", actAdmin, s.prune)
	handle("POST /v1/gc", actAdmin, s.collect)
	handle("POST /v1/verify", actAdmin, s.verify)
	handle("POST /v1/access/check", actAdmin, s.checkAccess)
	handle("GET /v1/keys", actAdmin, s.listKeys)
	handle("POST /v1/keys", actAdmin, s.addKey)
	handle("POST /v1/keys/passwd", actAdmin, s.changePassword)
	handle("DELETE /v1/keys/{id}", actAdmin, s.removeKey)
	handle("GET /v1/tokens", actAdmin, s.listTokens)
	handle("POST /v1/tokens", actAdmin, s.createToken)
	handle("DELETE /v1/tokens/{id}", actAdmin, s.revokeToken)
	metrics := promhttp.HandlerFor(s.metrics.reg, promhttp.HandlerOpts{})
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		if err := s.permit(r, actAdmin); err != nil {
			writeError(w, err)
			return
		}
		metrics.ServeHTTP(w, r)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, api.Errorf(api.ErrNotFound, "no such API endpoint: %s %s (see docs/api.md)", r.Method, r.URL.Path))
	})
	return s.authorize(mux)
}

// authorize refuses requests from no one it knows: without the admin
// token, a scoped token or a verified client certificate. What a known
// caller may do is checked per endpoint (permit).
func (s *Server) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := s.callerOf(r)
		if c == nil {
			w.Header().Set("WWW-Authenticate", `Bearer realm="nbdvault"`)
			writeError(w, api.Errorf(api.ErrUnauthorized,
				"the server refused the token: pass the admin token in the server's data folder (%s), or a token from nbdvault token create, with --token or NBDVAULT_TOKEN", TokenFile))
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, c)))
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	if v == nil {
		w.WriteHeader(status)
		return
	}
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		status, data = http.StatusInternalServerError, []byte(`{"code":"internal","error":"encoding the answer failed"}`)
	}
	w.WriteHeader(status)
	w.Write(append(data, '\n'))
}

func writeError(w http.ResponseWriter, err error) {
	e := apiError(err)
	writeJSON(w, e.Status, e)
}

// apiError maps the server's errors to the API's codes.
func apiError(err error) *api.Error {
	var e *api.Error
	if errors.As(err, &e) {
		return e
	}
	code := api.ErrInternal
	switch {
	case errors.Is(err, volume.ErrNoVolume), errors.Is(err, volume.ErrNoSnapshot), errors.Is(err, volume.ErrNoPointInTime):
		code = api.ErrNotFound
	case errors.Is(err, volume.ErrVolumeClosed):
		code = api.ErrNotFound
		err = fmt.Errorf("%w (it is being deleted, or the server is stopping)", err)
	case errors.Is(err, volume.ErrExists), errors.Is(err, volume.ErrLabelTaken), errors.Is(err, errBusy):
		code = api.ErrExists
	case errors.Is(err, errDamaged), errors.Is(err, volume.ErrLogCorrupt), errors.Is(err, volume.ErrDamagedManifest), errors.Is(err, volume.ErrGCDamage),
		errors.Is(err, chunkstore.ErrCorrupt):
		code = api.ErrDamaged
	case errors.Is(err, volume.ErrNotSealed):
		code = api.ErrNotSealed
	case errors.Is(err, volume.ErrProtected):
		code = api.ErrProtected
	case errors.Is(err, volume.ErrShrink), errors.Is(err, volume.ErrInvalid), errors.Is(err, errInvalid):
		code = api.ErrInvalid
	case errors.Is(err, chunkstore.ErrUnavailable), errors.Is(err, lease.ErrLost), errors.Is(err, lease.ErrNotConfirmed),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, errStopping):
		code = api.ErrUnavailable
	}
	return api.Errorf(code, "%v", err)
}

var errInvalid = errors.New("invalid request")

// maxBodyBytes bounds a request's body: every request the API takes is
// a few hundred bytes of JSON.
const maxBodyBytes = 1 << 20

// tooLarge is the answer to a body past maxBodyBytes: 413, with the code
// of an invalid request.
func tooLarge() *api.Error {
	return api.Errorf(&api.Error{Code: api.ErrInvalid.Code, Status: http.StatusRequestEntityTooLarge},
		"the request body is larger than the API takes (%d bytes)", maxBodyBytes)
}

// decode reads a JSON body into v.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return tooLarge()
		}
		return fmt.Errorf("%w: the body is not the JSON this endpoint takes: %v", errInvalid, err)
	}
	return nil
}

func (s *Server) getStatus(r *http.Request) (int, any, error) {
	sp := s.space()
	if callerOfRequest(r).scoped() {
		// Its volumes' state, nothing of the repository's or others'
		// (space figures would tell what other volumes hold).
		return http.StatusOK, api.Status{Version: s.opts.Version, NBD: s.NBDAddrs(), Volumes: s.visibleVolumes(r, sp)}, nil
	}
	st := api.Status{Version: s.opts.Version, Repository: s.Repository(), NBD: s.NBDAddrs(), Volumes: s.volumeInfos(sp), Space: repositorySpace(sp)}
	rs := &st.RepositoryState
	up, since, lastErr := s.health.state()
	rs.Reachable = up
	if !up {
		t := since.UTC()
		rs.UnreachableSince, rs.LastError = &t, lastErr.Error()
	}
	until, ok := s.lease.Confirmed()
	rs.UploadsPaused, rs.LeaseConfirmedUntil = !ok, until.UTC()
	for _, v := range st.Volumes {
		if v.Status != nil {
			rs.PendingBytes += v.Status.PendingBytes
		}
	}
	st.StateDisk = s.stateDisk()
	st.LastVerify = s.lastVerify()
	return http.StatusOK, st, nil
}

func (s *Server) listVolumes(r *http.Request) (int, any, error) {
	if callerOfRequest(r).scoped() {
		return http.StatusOK, s.visibleVolumes(r, s.space()), nil
	}
	return http.StatusOK, s.volumeInfos(s.space()), nil
}

// visibleVolumes are the volumes a scoped caller may see, without space
// figures.
func (s *Server) visibleVolumes(r *http.Request, sp *volume.Space) []api.Volume {
	out := []api.Volume{}
	for _, v := range s.volumeInfos(sp) {
		if s.visible(r, v.Name) {
			v.Space = nil
			out = append(out, v)
		}
	}
	return out
}

// volumeInfos describes every volume, served or not, by name, with the
// space sp counted.
func (s *Server) volumeInfos(sp *volume.Space) []api.Volume {
	out := []api.Volume{}
	for _, v := range s.Volumes() {
		out = append(out, s.volumeInfo(v, sp))
	}
	for name, err := range s.Failed() {
		out = append(out, failedInfo(name, err, sp))
	}
	slices.SortFunc(out, func(a, b api.Volume) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// failedInfo describes a volume that is not served, and the space sp
// counted for it (its repository objects are what deleting it frees).
func failedInfo(name string, err error, sp *volume.Space) api.Volume {
	return api.Volume{Name: name, Status: &api.VolumeStatus{Damaged: fmt.Sprintf("not served: %v; %s", err, nextStep(name, err))},
		Space: volumeSpace(sp, name, time.Time{})}
}

func (s *Server) getVolume(r *http.Request) (int, any, error) {
	name := r.PathValue("vol")
	if err, ok := s.Failed()[name]; ok {
		return http.StatusOK, failedInfo(name, err, s.spaceFor(r)), nil
	}
	v, err := s.volumeOf(name)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, s.volumeInfo(v, s.spaceFor(r)), nil
}

func (s *Server) recoverVolume(r *http.Request) (int, any, error) {
	name := r.PathValue("vol")
	cut, err := s.RecoverVolume(r.Context(), name)
	if err != nil {
		return 0, nil, err
	}
	out := api.Recovery{Volume: name}
	if cut != nil {
		out = api.Recovery{
			Volume: name, Damaged: true, Segment: cut.Segment, Offset: cut.Offset, Record: cut.Seq, Why: cut.Why,
			BytesCut: cut.Bytes, RecordsCut: cut.Records, MovedTo: cut.MovedTo, Forked: cut.Forked,
		}
		for _, si := range cut.LostSnapshots() {
			out.SnapshotsLost = append(out.SnapshotsLost, api.Snapshot{Volume: name, ID: si.ID, Label: si.Label, Time: si.Time.UTC(), Size: si.Size})
		}
	}
	return http.StatusOK, out, nil
}

func (s *Server) createVolume(r *http.Request) (int, any, error) {
	if err := s.writable(r.Context()); err != nil {
		return 0, nil, err
	}
	var req api.CreateVolume
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	cfg := volume.Config{Name: req.Name, Size: req.Size, ChunkSize: req.ChunkSize}
	cfg.ChunkSize = cmp.Or(cfg.ChunkSize, volume.DefaultChunkSize)
	if err := cfg.Validate(); err != nil {
		return 0, nil, err
	}
	v, err := s.CreateVolume(r.Context(), cfg)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusCreated, s.volumeInfo(v, nil), nil
}

// updateVolume grows a volume, or sets or clears its retention policy,
// or both (the policy first: a refused size then leaves it set).
func (s *Server) updateVolume(r *http.Request) (int, any, error) {
	var req api.UpdateVolume
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	if req.Size == 0 && req.Retention == nil {
		return 0, nil, fmt.Errorf("%w: nothing to change: want {\"size\": BYTES} or {\"retention\": {...}} ({} clears it)", errInvalid)
	}
	if err := s.writable(r.Context()); err != nil {
		return 0, nil, err
	}
	v, err := s.volumeOf(r.PathValue("vol"))
	if err != nil {
		return 0, nil, err
	}
	if req.Retention != nil {
		if err := v.SetRetention(r.Context(), *req.Retention); err != nil {
			return 0, nil, err
		}
		s.log.Info("volume retention set", "volume", v.Config().Name, "policy", req.Retention.String())
	}
	if req.Size != 0 {
		if err := v.Grow(r.Context(), req.Size); err != nil {
			return 0, nil, err
		}
		s.log.Info("volume resized", "volume", v.Config().Name, "size", v.Size())
	}
	return http.StatusOK, s.volumeInfo(v, s.space()), nil
}

func (s *Server) deleteVolume(r *http.Request) (int, any, error) {
	if err := s.writable(r.Context()); err != nil {
		return 0, nil, err
	}
	name := r.PathValue("vol")
	if r.URL.Query().Get("force") != "true" {
		if v, err := s.volumeOf(name); err == nil {
			var protected []string
			for _, si := range v.Snapshots() {
				if si.Protected {
					protected = append(protected, si.ID)
				}
			}
			if len(protected) > 0 {
				return 0, nil, fmt.Errorf("volume %q has %d %w snapshots (%s): unprotect them, or delete the volume with --force", name, len(protected), volume.ErrProtected, strings.Join(protected, ", "))
			}
		}
	}
	if err := s.DeleteVolume(r.Context(), name); err != nil {
		return 0, nil, err
	}
	// Its tokens go with it: they must not open a later volume of the
	// same name.
	if n, err := s.tokens.revokeVolume(name); err != nil {
		s.log.Error("the volume's tokens could not be revoked: revoke them with nbdvault token revoke", "volume", name, "error", err)
	} else if n > 0 {
		s.log.Info("revoked the deleted volume's tokens", "volume", name, "tokens", n)
	}
	return http.StatusNoContent, nil, nil
}

// compareChunks answers which of a volume's chunks differ from those a
// client hashed (api.ChunkCompare): the hash of an encrypted repository's
// chunk is MACed into its ID here, so the key never leaves the server.
func (s *Server) compareChunks(r *http.Request) (int, any, error) {
	v, err := s.volumeOf(r.PathValue("vol"))
	if err != nil {
		return 0, nil, err
	}
	var req api.ChunkCompare
	if err := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 80*api.MaxChunkIDs)).Decode(&req); err != nil {
		return 0, nil, fmt.Errorf("%w: the body is not a chunk comparison: %v", errInvalid, err)
	}
	if cs := v.Config().ChunkSize; req.Hash != api.CompareHash || req.ChunkSize != cs {
		return 0, nil, fmt.Errorf("%w: the server compares %q hashes of chunks of %d bytes, not %q of %d: use a matching nbdvault release",
			errInvalid, api.CompareHash, cs, req.Hash, req.ChunkSize)
	}
	if len(req.Sums) == 0 || len(req.Sums) > api.MaxChunkIDs {
		return 0, nil, fmt.Errorf("%w: compare 1 to %d chunks at once, not %d", errInvalid, api.MaxChunkIDs, len(req.Sums))
	}
	sums := make([]chunkstore.ID, len(req.Sums)) // parsed before any work
	for i, sum := range req.Sums {
		if sum == "" {
			continue
		}
		h, err := chunkstore.ParseID(sum)
		if err != nil {
			return 0, nil, fmt.Errorf("%w: sum %d: %v", errInvalid, i, err)
		}
		sums[i] = s.store.IDOfHash(h)
	}
	ids, err := headChunkIDs(r.Context(), v, req.First, len(req.Sums))
	if err != nil {
		return 0, nil, err
	}
	if len(ids) != len(req.Sums) {
		return 0, nil, fmt.Errorf("%w: chunks %d to %d are past the volume's end", errInvalid, req.First, req.First+uint64(len(req.Sums))-1)
	}
	out := api.ChunkDiff{First: req.First, Differ: []int{}}
	for i, id := range sums {
		if id != ids[i] {
			out.Differ = append(out.Differ, i)
		}
	}
	return http.StatusOK, out, nil
}

// headChunkIDs is v.ChunkIDs, with a range past the volume's end the
// caller's mistake (invalid).
func headChunkIDs(ctx context.Context, v *volume.Volume, first uint64, count int) ([]chunkstore.ID, error) {
	ids, err := v.ChunkIDs(ctx, first, count)
	if errors.Is(err, volume.ErrOutOfRange) {
		err = fmt.Errorf("%w: %v", errInvalid, err)
	}
	return ids, err
}

func (s *Server) chunkIDs(r *http.Request) (int, any, error) {
	if s.keys != nil {
		// IDs of what a client just wrote, next to a listing of the
		// bucket, would confirm content in any volume.
		return 0, nil, fmt.Errorf("%w: the repository is encrypted, and its chunk IDs are not handed out; client push compares chunks through POST /v1/volumes/{vol}/chunks/compare", errInvalid)
	}
	v, err := s.volumeOf(r.PathValue("vol"))
	if err != nil {
		return 0, nil, err
	}
	q := r.URL.Query()
	first, err1 := strconv.ParseUint(q.Get("first"), 10, 64)
	count, err2 := strconv.Atoi(q.Get("count"))
	if err1 != nil || err2 != nil || count < 0 || count > api.MaxChunkIDs {
		return 0, nil, fmt.Errorf("%w: want ?first=CHUNK&count=N with N at most %d", errInvalid, api.MaxChunkIDs)
	}
	ids, err := headChunkIDs(r.Context(), v, first, count)
	if err != nil {
		return 0, nil, err
	}
	out := api.ChunkIDs{ChunkSize: v.Config().ChunkSize, Hash: s.store.Scheme(), First: first, IDs: make([]string, len(ids))}
	for i, id := range ids {
		if !id.IsZero() {
			out.IDs[i] = id.String()
		}
	}
	return http.StatusOK, out, nil
}

func (s *Server) listSnapshots(r *http.Request) (int, any, error) {
	v, err := s.volumeOf(r.PathValue("vol"))
	if err != nil {
		return 0, nil, err
	}
	out := []api.Snapshot{}
	sp := s.spaceFor(r)
	for _, si := range v.Snapshots() {
		out = append(out, withSpace(snapshotInfo(v, si), sp))
	}
	return http.StatusOK, out, nil
}

func (s *Server) getSnapshot(r *http.Request) (int, any, error) {
	v, si, err := s.snapshotOf(r.Context(), r.PathValue("vol"), r.PathValue("snap"))
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, withSpace(snapshotInfo(v, si), s.spaceFor(r)), nil
}

// spaceFor is the space count for the caller of r: none for a scoped
// caller, whom the figures would tell what other volumes hold (dedup).
func (s *Server) spaceFor(r *http.Request) *volume.Space {
	if callerOfRequest(r).scoped() {
		return nil
	}
	return s.space()
}

func (s *Server) createSnapshot(r *http.Request) (int, any, error) {
	var req api.CreateSnapshot
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
	}
	if req.Label != "" {
		if err := volume.ValidLabel(req.Label); err != nil {
			return 0, nil, err
		}
	}
	v, err := s.volumeOf(r.PathValue("vol"))
	if err != nil {
		return 0, nil, err
	}
	// Scoped callers' snapshots are spaced, kept points in time too: each
	// counts against a keep-last policy.
	c := callerOfRequest(r)
	if c.scoped() && s.opts.ScopedSnapshotEvery > 0 {
		if wait, ok := s.snapLimit.take(v.Config().Name, s.opts.ScopedSnapshotEvery); !ok {
			return 0, nil, api.Errorf(api.ErrTooSoon, "%s may take a snapshot of %q once every %s (serve --scoped-snapshot-interval): try again in %s",
				c, v.Config().Name, s.opts.ScopedSnapshotEvery, wait.Round(time.Second))
		}
	}
	if req.From != "" {
		if err := s.writable(r.Context()); err != nil {
			return 0, nil, err
		}
		si, err := v.KeepPointBy(r.Context(), req.From, req.Label, takenBy(c))
		if err != nil {
			return 0, nil, err
		}
		s.log.Info("point in time kept as a snapshot", "volume", v.Config().Name, "from", req.From, "id", si.ID, "label", si.Label, "by", c.String())
		return http.StatusCreated, snapshotInfo(v, si), nil
	}
	si, err := v.SnapshotBy(r.Context(), req.Label, takenBy(c))
	if err != nil {
		return 0, nil, err
	}
	s.log.Info("snapshot taken", "volume", v.Config().Name, "id", si.ID, "label", si.Label, "by", c.String())
	return http.StatusCreated, snapshotInfo(v, si), nil
}

// takenBy is what a snapshot's manifest records of the caller that took
// it: nothing for the admin token, else who (volume.Manifest.By).
func takenBy(c *caller) string {
	switch {
	case !c.scoped():
		return ""
	case c.token != nil:
		return "token:" + c.token.ID
	}
	return c.String()
}

func (s *Server) deleteSnapshot(r *http.Request) (int, any, error) {
	if err := s.writable(r.Context()); err != nil {
		return 0, nil, err
	}
	v, si, err := s.namedSnapshot(r, "points leave by themselves with --journal-retention")
	if err != nil {
		return 0, nil, err
	}
	if err := v.DeleteSnapshot(r.Context(), si.ID); err != nil {
		return 0, nil, err
	}
	s.metrics.forget(v.Config().Name + "@" + si.ID)
	s.log.Info("snapshot deleted", "volume", v.Config().Name, "id", si.ID)
	return http.StatusNoContent, nil, nil
}

func (s *Server) updateSnapshot(r *http.Request) (int, any, error) {
	var req api.UpdateSnapshot
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	if req.Protected == nil {
		return 0, nil, fmt.Errorf("%w: nothing to change: want {\"protected\": true|false}", errInvalid)
	}
	if err := s.writable(r.Context()); err != nil {
		return 0, nil, err
	}
	v, si, err := s.namedSnapshot(r, "keep it as a snapshot first (snapshot create --from)")
	if err != nil {
		return 0, nil, err
	}
	si, err = v.Protect(r.Context(), si.ID, *req.Protected)
	if err != nil {
		return 0, nil, err
	}
	s.log.Info("snapshot changed", "volume", v.Config().Name, "id", si.ID, "protected", si.Protected)
	return http.StatusOK, withSpace(snapshotInfo(v, si), s.space()), nil
}

func (s *Server) prune(r *http.Request) (int, any, error) {
	var req api.Prune
	if err := decode(r, &req); err != nil {
		return 0, nil, err
	}
	v, err := s.volumeOf(r.PathValue("vol"))
	if err != nil {
		return 0, nil, err
	}
	if !req.DryRun {
		if err := s.writable(r.Context()); err != nil {
			return 0, nil, err
		}
	}
	ds, perr := v.Prune(r.Context(), req.Policy, volume.PruneOptions{Loc: time.Local, DryRun: req.DryRun, InUse: s.inUse(v.Config().Name)})
	if ds == nil && perr != nil {
		return 0, nil, perr
	}
	out := api.Pruned{Volume: v.Config().Name, Policy: req.Policy.String(), DryRun: req.DryRun, Snapshots: []api.PruneDecision{}}
	sp := s.space()
	for _, d := range ds {
		pd := api.PruneDecision{Snapshot: withSpace(snapshotInfo(v, d.SnapshotInfo), sp), Keep: d.Keep, Reasons: d.Reasons}
		switch {
		case d.Err != nil:
			pd.Error = d.Err.Error()
			out.Failed++
		case !d.Keep && !req.DryRun:
			out.Removed++
			s.metrics.forget(v.Config().Name + "@" + d.ID)
		}
		out.Snapshots = append(out.Snapshots, pd)
	}
	if !req.DryRun {
		s.log.Info("pruned", "volume", out.Volume, "policy", out.Policy, "removed", out.Removed, "failed", out.Failed)
		if out.Removed > 0 {
			s.collectSoon("prune of volume " + out.Volume)
		}
	}
	// A partial failure is an answer, not an error: it says what is
	// still there and why.
	return http.StatusOK, out, nil
}

func (s *Server) collect(r *http.Request) (int, any, error) {
	var req api.GC
	if r.ContentLength != 0 {
		if err := decode(r, &req); err != nil {
			return 0, nil, err
		}
	}
	rep, err := s.CollectGarbage(r.Context(), req.DryRun, req.List)
	if err != nil {
		return 0, nil, err
	}
	return http.StatusOK, api.GCReport{DryRun: req.DryRun, Manifests: rep.Manifests, DamagedManifests: rep.DamagedManifests,
		IndexPages: rep.Pages, Referenced: rep.Referenced, Listed: rep.Listed, Listing: rep.Listing, Unreferenced: rep.Unreferenced,
		Deleted: rep.Deleted, PutDuring: rep.PutDuring, Seconds: rep.Elapsed.Seconds()}, nil
}

// namedSnapshot is the snapshot the request's path names exactly, by
// its ID or label: never a time or a point in time, which find whatever
// point lies before them; for those, the error ends with what to do.
func (s *Server) namedSnapshot(r *http.Request, forPoints string) (*volume.Volume, volume.SnapshotInfo, error) {
	v, si, err := s.snapshotOf(r.Context(), r.PathValue("vol"), r.PathValue("snap"))
	if err != nil {
		return nil, si, err
	}
	if snap := r.PathValue("snap"); si.Kind == volume.KindCheckpoint || !si.Is(snap) {
		return nil, si, fmt.Errorf("%w: %q is a time or a point in time the server keeps (%s), not a snapshot's ID or label: %s", errInvalid, snap, si.ID, forPoints)
	}
	return v, si, nil
}

// snapshotOf finds snapshot snap (an ID or a label) of volume vol.
func (s *Server) snapshotOf(ctx context.Context, vol, snap string) (*volume.Volume, volume.SnapshotInfo, error) {
	v, err := s.volumeOf(vol)
	if err != nil {
		return nil, volume.SnapshotInfo{}, err
	}
	si, err := v.Find(ctx, snap)
	switch {
	case errors.Is(err, volume.ErrNoSnapshot):
		return nil, volume.SnapshotInfo{}, fmt.Errorf("snapshot %q of volume %q: %w (nbdvault snapshot list %s shows them; VOLUME@TIME reads a point in time, TIME as in 2026-11-30T17:55:03Z)", snap, vol, volume.ErrNoSnapshot, vol)
	case err != nil:
		return nil, volume.SnapshotInfo{}, err
	}
	return v, si, nil
}

// volumeInfo describes volume v, with the space sp counted for it.
func (s *Server) volumeInfo(v *volume.Volume, sp *volume.Space) api.Volume {
	cfg := v.Config()
	st := v.Status()
	vs := &api.VolumeStatus{PendingBytes: st.LogBytes, PendingSnapshots: st.PendingLayers, LagSeconds: st.Lag.Seconds()}
	if !st.LastSeal.IsZero() {
		t := st.LastSeal.UTC()
		vs.LastSeal = &t
	}
	if st.SealError != nil {
		vs.SealError = st.SealError.Error()
		if errors.Is(st.SealError, volume.ErrLogCorrupt) {
			vs.Damaged = fmt.Sprintf("%v; reads of the damaged record fail and nothing after it is uploaded; %s", st.SealError, nextStep(cfg.Name, st.SealError))
		}
	}
	if st.LogError != nil {
		vs.LogError = st.LogError.Error()
	}
	vs.DiskFull = st.DiskFull
	if st.ExpiryError != nil {
		vs.ExpiryError = st.ExpiryError.Error()
	}
	if from := v.PointsInTime(); !from.IsZero() {
		from = from.UTC()
		vs.PointsInTimeFrom = &from
	}
	for _, si := range v.Snapshots() {
		if si.Sealed {
			vs.LastSealedSnapshot = si.ID
		}
	}
	if lp, ok := s.lastPrune(cfg.Name); ok {
		vs.LastPrune = &api.AutoPrune{Time: lp.time.UTC(), Removed: lp.removed, Kept: lp.kept}
		if lp.err != nil {
			vs.LastPrune.Error = lp.err.Error()
		}
	}
	out := api.Volume{Name: cfg.Name, Size: cfg.Size, ChunkSize: cfg.ChunkSize, Created: cfg.Created, Status: vs,
		Space: volumeSpace(sp, cfg.Name, cfg.Created)}
	if !cfg.Retention.Empty() {
		out.Retention = &cfg.Retention
	}
	return out
}

func snapshotInfo(v *volume.Volume, si volume.SnapshotInfo) api.Snapshot {
	out := api.Snapshot{Volume: v.Config().Name, ID: si.ID, Label: si.Label, Time: si.Time.UTC(), Size: si.Size, Sealed: si.Sealed}
	if si.Kind == volume.KindCheckpoint {
		out.Kind = string(volume.KindCheckpoint)
	}
	if si.Damaged != nil {
		out.Damaged = si.Damaged.Error()
	}
	out.Protected, out.TakenBy = si.Protected, si.By
	return out
}
