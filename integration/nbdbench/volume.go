package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// volumeName is the benchmark volume's name, and so its head's export
// name, the same "bench" the other servers export.
const volumeName = "bench"

// volumeServer is nbdvault serving a volume, in this process, the way the
// server will: a local repository directory and a state directory in the
// work directory (the same disk as the other servers' raw files), the
// volume's head exported by nbdserver.Exports through nbd.Server, and the
// volume's uploader (Volume.Run) running with its defaults.
type volumeServer struct {
	repoDir, stateDir string
	repo              *countingBackend // the repository, as the volume sees it
	store             *chunkstore.Store
	v                 *volume.Volume
	exports           *nbdserver.Exports
	stopRun           func() // ends v.Run and waits for it
}

// volumeCmdline describes the in-process server the way the others'
// command lines do.
func volumeCmdline(repoDir, stateDir, sock string, size int64, interval time.Duration) string {
	return fmt.Sprintf("in process: repo := chunkstore.Open(%q); volume.Create(ctx, &volume.Env{Repo: repo, Store: chunkstore.NewStore(repo, chunkstore.Options{}), StateDir: %q, CheckpointInterval: %v}, volume.Config{Name: %q, Size: %d}) "+
		"(1 MiB chunks, log limit 8 GiB: the defaults); go v.Run(ctx); exports := nbdserver.NewExports(); exports.Add(v); (&nbd.Server{Exports: exports}).Serve(nbd.Listen(%q)), other fields default",
		repoDir, stateDir, interval, volumeName, size, "unix:"+sock)
}

// phaseInterval is the checkpoint interval of the volume the timed
// phases use: they checkpoint it themselves before each phase, and the
// snapshot phase needs its layer to be the write before it, however long
// that write took. The scattered-writes run uses the default.
const phaseInterval = time.Hour

// openVolumeRepo opens a repository directory as the server will
// (chunkstore.Open: the local backend inside Retry), behind the counter.
func openVolumeRepo(dir string) (*countingBackend, error) {
	b, err := chunkstore.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("repository %s: %w", dir, err)
	}
	return newCountingBackend(b), nil
}

// newVolumeServer creates a fresh volume of size bytes in repoDir and
// stateDir (removing what an earlier run left there) and starts its
// uploader. It does not serve it yet.
func newVolumeServer(ctx context.Context, repoDir, stateDir string, size int64, interval time.Duration) (*volumeServer, error) {
	for _, d := range []string{repoDir, stateDir} {
		if err := os.RemoveAll(d); err != nil {
			return nil, err
		}
	}
	repo, err := openVolumeRepo(repoDir)
	if err != nil {
		return nil, err
	}
	store, err := chunkstore.NewStore(repo, chunkstore.Options{})
	if err != nil {
		return nil, err
	}
	env := &volume.Env{Repo: repo, Store: store, StateDir: stateDir, CheckpointInterval: interval}
	v, err := volume.Create(ctx, env, volume.Config{Name: volumeName, Size: size})
	if err != nil {
		return nil, fmt.Errorf("create the benchmark volume: %w", err)
	}
	s := &volumeServer{repoDir: repoDir, stateDir: stateDir, repo: repo, store: store, v: v, exports: nbdserver.NewExports()}
	s.exports.Add(v)
	s.startRun()
	return s, nil
}

func (s *volumeServer) startRun() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	v := s.v
	go func() { v.Run(ctx); close(done) }()
	s.stopRun = func() { cancel(); <-done }
}

// close stops the uploader and closes the volume (unsealed layers stay in
// the log, as on a server shutdown).
func (s *volumeServer) close() error {
	s.stopRun()
	return s.v.Close()
}

// reopen closes the volume and opens it again over a new chunk store, as a
// restarted server would: the store's cache starts empty, so the next
// reads of sealed data come from the repository.
func (s *volumeServer) reopen(ctx context.Context) error {
	if err := s.close(); err != nil {
		return fmt.Errorf("close the volume: %w", err)
	}
	store, err := chunkstore.NewStore(s.repo, chunkstore.Options{})
	if err != nil {
		return err
	}
	v, err := volume.Open(ctx, &volume.Env{Repo: s.repo, Store: store, StateDir: s.stateDir}, volumeName)
	if err != nil {
		return fmt.Errorf("reopen the volume: %w", err)
	}
	s.store, s.v = store, v
	s.exports.Add(v) // replaces the closed one for new connections
	s.startRun()
	return nil
}

// pollEvery is how often the benchmark looks at the uploader's progress.
// Seals take seconds; 5 ms is noise next to them and costs nothing.
const pollEvery = 5 * time.Millisecond

// drain brings the volume to rest: it closes the open layer (a checkpoint)
// and waits until the uploader has sealed every layer. A seal that fails
// fails the benchmark: the uploader would retry it forever.
func (s *volumeServer) drain(ctx context.Context) error {
	if _, err := s.v.Checkpoint(ctx); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	for {
		st := s.v.Status()
		if st.SealError != nil {
			return fmt.Errorf("the uploader cannot seal (see %s): %w", s.repoDir, st.SealError)
		}
		if st.PendingLayers == 0 {
			return nil
		}
		select {
		case <-time.After(pollEvery):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// waitSealed waits until the uploader has sealed snapshot id.
func (s *volumeServer) waitSealed(ctx context.Context, id string) error {
	for {
		found := false
		for _, si := range s.v.Snapshots() {
			if si.ID == id {
				if si.Sealed {
					return nil
				}
				found = true
			}
		}
		if !found {
			return fmt.Errorf("snapshot %s is not in the volume's list", id)
		}
		if err := s.v.Status().SealError; err != nil {
			return fmt.Errorf("the uploader cannot seal snapshot %s: %w", id, err)
		}
		select {
		case <-time.After(pollEvery):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// startVolume serves a fresh volume of size bytes on the Unix socket
// sock. The repository and state directories are next to the socket.
func startVolume(ctx context.Context, work, sock, logPath string, size int64, interval time.Duration) (*server, error) {
	repoDir, stateDir := filepath.Join(work, "volume-repo"), filepath.Join(work, "volume-state")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	vs, err := newVolumeServer(ctx, repoDir, stateDir, size, interval)
	if err != nil {
		logFile.Close()
		return nil, err
	}
	srv := &nbd.Server{
		Exports: vs.exports,
		Logger:  slog.New(slog.NewTextHandler(logFile, nil)),
	}
	alive, stop, err := serveInProcess(srv, sock, func() error { return errors.Join(vs.close(), logFile.Close()) })
	if err != nil {
		return nil, err
	}
	if interval == 0 {
		interval = 10 * time.Second // the default
	}
	return &server{cmdline: volumeCmdline(repoDir, stateDir, sock, size, interval), alive: alive, stop: stop, vol: vs}, nil
}

// uploaderActivity is what the volume's uploader did during a phase.
type uploaderActivity struct {
	seals  int64 // manifests written: layers sealed
	maxLog int64 // the largest write log seen, in bytes
}

// uploaderWatch samples the volume's write log during a phase.
type uploaderWatch struct {
	repo  *countingBackend
	start repoCounts
	stop  chan struct{}
	done  chan int64 // the largest log seen
}

// logSampleEvery is how often the watch reads the log's size: often
// enough to see it near its limit, rarely enough to cost nothing.
const logSampleEvery = 50 * time.Millisecond

func watchUploader(vs *volumeServer) *uploaderWatch {
	w := &uploaderWatch{repo: vs.repo, start: vs.repo.counts(), stop: make(chan struct{}), done: make(chan int64, 1)}
	v := vs.v
	go func() {
		tick := time.NewTicker(logSampleEvery)
		defer tick.Stop()
		largest := v.Status().LogBytes
		for {
			select {
			case <-w.stop:
				w.done <- max(largest, v.Status().LogBytes)
				return
			case <-tick.C:
				largest = max(largest, v.Status().LogBytes)
			}
		}
	}()
	return w
}

func (w *uploaderWatch) end() uploaderActivity {
	close(w.stop)
	largest := <-w.done
	return uploaderActivity{seals: w.repo.counts().since(w.start).ManifestPuts, maxLog: largest}
}

// volumePhases are f, g and h: a snapshot of compressible data and the
// time until it is sealed, then cold and warm reads of the sealed
// snapshot.
func (r *serverRun) volumePhases(text string) error {
	vs := r.srv.vol
	size := r.rep.size
	gib := float64(size) / (1 << 30)

	// f. The whole head overwritten with compressible data (untimed), a
	// snapshot, and the time until the running uploader has sealed it.
	if err := vs.drain(r.ctx); err != nil {
		return err
	}
	write := []string{"nbdcopy", "--flush", text, r.uri}
	if _, err := timeCommand(r.ctx, write); err != nil {
		return err
	}
	r.cmds = append(r.cmds, shellJoin(write)+"   # untimed: compressible data over the whole head",
		"# in process, timed: v.Snapshot(ctx, \"\"), then v.Snapshots() polled every 5ms until it is sealed by the running uploader")
	afterWrite := vs.repo.counts()
	if err := r.prep(dropOnly); err != nil {
		return err
	}
	// The snapshot's layer must be the write: a checkpoint the uploader
	// made meanwhile would have taken it.
	const tookLayer = "the uploader made a checkpoint between the write and the snapshot, so the snapshot's layer is not the write: keep -settle well below the phases' checkpoint interval"
	beforeSeal := vs.repo.counts()
	if beforeSeal.since(afterWrite).ManifestPuts > 0 || vs.v.Status().PendingLayers > 0 {
		return errors.New(tookLayer)
	}
	t0 := time.Now()
	snap, err := vs.v.Snapshot(r.ctx, "")
	call := time.Since(t0)
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	t1 := time.Now()
	if err := vs.waitSealed(r.ctx, snap.ID); err != nil {
		return err
	}
	sealed := time.Since(t1)
	if err := r.done(); err != nil {
		return err
	}
	c := vs.repo.counts().since(beforeSeal)
	if c.ManifestPuts != 1 {
		return errors.New(tookLayer)
	}
	r.put("snapcall", call.Seconds()*1e3)
	r.put("sealtime", sealed.Seconds())
	r.put("sealrate", mbps(size, sealed))
	r.put("sealcpu", r.serverCPU.Seconds()/gib)
	r.put("sealdata", float64(c.DataPuts))
	r.put("sealpages", float64(c.PagePuts))
	r.put("sealmanifests", float64(c.ManifestPuts))
	r.put("sealbytes", float64(c.Bytes())/(1<<20))
	// What zstd made of the data: bytes stored per byte of the chunks
	// written.
	r.put("sealratio", float64(c.DataBytes)/float64(max(c.DataPuts, 1)*vs.v.Config().ChunkSize))
	logf("%s: snapshot: call %v, sealed %.2fs later (%.0f MB/s); wrote %d data chunks, %d index pages, %d manifests, %d MiB",
		r.name, call.Round(time.Microsecond), sealed.Seconds(), mbps(size, sealed), c.DataPuts, c.PagePuts, c.ManifestPuts, c.Bytes()>>20)

	// g. Cold read: a restarted server's empty cache, the page cache
	// dropped.
	if err := vs.reopen(r.ctx); err != nil {
		return err
	}
	r.cmds = append(r.cmds, "# in process: v.Close(); volume.Open over a new chunkstore.NewStore(repo, chunkstore.Options{}); exports.Add(v); go v.Run(ctx)")
	snapURI := exportURI(r.sock, volumeName+"@"+snap.ID)
	for _, p := range []struct {
		key  string
		how  prepHow
		note string
	}{
		{"coldread", dropOnly, "   # cold: the reopened volume, page cache dropped"},
		{"warmread", keepCache, "   # warm: at once, nothing dropped"},
	} {
		before := vs.store.Stats()
		d, err := r.command(p.how, nbdcopyArgs(snapURI, "null:"))
		if err != nil {
			return err
		}
		r.cmds[len(r.cmds)-1] += p.note
		after := vs.store.Stats()
		r.put(p.key, mbps(size, d))
		r.put(p.key+"cpu", r.serverCPU.Seconds()/gib)
		r.put(p.key+"fetched", float64(after.BackendGets-before.BackendGets))
		r.put(p.key+"hits", float64(after.CacheHits-before.CacheHits))
		logf("%s: %s of the sealed snapshot: %.0f MB/s; %d objects fetched, %d chunk cache hits",
			r.name, p.key, mbps(size, d), after.BackendGets-before.BackendGets, after.CacheHits-before.CacheHits)
	}
	verify := nbdcopyArgs(snapURI, "-")
	if err := compareCommandOutput(r.ctx, verify, text); err != nil {
		return fmt.Errorf("reading the snapshot back (untimed check): %w", err)
	}
	r.cmds = append(r.cmds, shellJoin(verify)+"   # untimed check: equals the compressible source")
	return nil
}
