package nbdserver

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/nbdvault/nbdvault/chunkstore"
	"github.com/nbdvault/nbdvault/nbdserver/volume"
)

// metrics are the server's Prometheus metrics, served at /metrics on the
// admin listener. docs/operations.md lists them.
type metrics struct {
	reg        *prometheus.Registry
	nbdOps     *prometheus.CounterVec
	nbdBytes   *prometheus.CounterVec
	nbdErrors  *prometheus.CounterVec
	nbdSeconds *prometheus.HistogramVec
	repoOps    *prometheus.CounterVec
	repoErrors *prometheus.CounterVec
}

func newMetrics(s *Server) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	exp := []string{"export", "op"}
	m.nbdOps = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdvault_nbd_requests_total",
		Help: "NBD requests served, by export (VOL, or VOL@snapshot for every snapshot) and operation."}, exp)
	m.nbdBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdvault_nbd_bytes_total",
		Help: "Bytes read and written over NBD, by export and operation."}, exp)
	m.nbdErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdvault_nbd_errors_total",
		Help: "NBD requests that failed, by export and operation."}, exp)
	m.nbdSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "nbdvault_nbd_request_seconds",
		Help:    "Time to serve an NBD request, by export and operation.",
		Buckets: prometheus.ExponentialBuckets(10e-6, 4, 10)}, exp)
	repo := []string{"op"}
	m.repoOps = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdvault_repository_requests_total",
		Help: "Requests to the repository (object store), by operation."}, repo)
	m.repoErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdvault_repository_errors_total",
		Help: "Repository requests that failed (after retries), by operation; a missing object is not counted."}, repo)
	m.reg.MustRegister(m.nbdOps, m.nbdBytes, m.nbdErrors, m.nbdSeconds, m.repoOps, m.repoErrors,
		&stateCollector{s: s}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// exportMetrics are one export's counters, resolved once so a request
// costs no label lookups.
type exportMetrics struct {
	ops, bytes, errs [numOps]prometheus.Counter
	secs             [numOps]prometheus.Observer
}

type op int

const (
	opRead op = iota
	opWrite
	opFlush
	opTrim
	opZero
	opBlockStatus
	numOps
)

var opNames = [numOps]string{"read", "write", "flush", "trim", "zero", "block_status"}

func (m *metrics) export(name string) *exportMetrics {
	if m == nil {
		return nil
	}
	em := &exportMetrics{}
	for o := range numOps {
		l := prometheus.Labels{"export": name, "op": opNames[o]}
		em.ops[o], em.bytes[o], em.errs[o] = m.nbdOps.With(l), m.nbdBytes.With(l), m.nbdErrors.With(l)
		em.secs[o] = m.nbdSeconds.With(l)
	}
	return em
}

// forget drops an export's series (a deleted volume or snapshot).
func (m *metrics) forget(name string) {
	if m == nil {
		return
	}
	l := prometheus.Labels{"export": name}
	m.nbdOps.DeletePartialMatch(l)
	m.nbdBytes.DeletePartialMatch(l)
	m.nbdErrors.DeletePartialMatch(l)
	m.nbdSeconds.DeletePartialMatch(l)
}

// done records a request of op that moved n bytes and started at start.
func (em *exportMetrics) done(o op, n int, start time.Time, err error) {
	if em == nil {
		return
	}
	em.ops[o].Inc()
	if n > 0 {
		em.bytes[o].Add(float64(n))
	}
	if err != nil {
		em.errs[o].Inc()
	}
	em.secs[o].Observe(time.Since(start).Seconds())
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// stateCollector reports the volumes' upload state and the chunk store's
// counters at scrape time.
type stateCollector struct{ s *Server }

var (
	descSize = prometheus.NewDesc("nbdvault_volume_size_bytes",
		"The volume's size.", []string{"volume"}, nil)
	descPending = prometheus.NewDesc("nbdvault_volume_pending_bytes",
		"Write log the volume holds on the server's disk that the repository does not hold yet (the upload queue).", []string{"volume"}, nil)
	descPendingSnaps = prometheus.NewDesc("nbdvault_volume_pending_snapshots",
		"Snapshots and checkpoints taken but not yet sealed.", []string{"volume"}, nil)
	descLag = prometheus.NewDesc("nbdvault_volume_lag_seconds",
		"Age of the oldest write the repository does not hold yet; 0 when it holds all.", []string{"volume"}, nil)
	descSinceSeal = prometheus.NewDesc("nbdvault_volume_seconds_since_checkpoint",
		"Seconds since the volume's last snapshot or checkpoint was sealed (since the server started if none was).", []string{"volume"}, nil)
	descSealFailing = prometheus.NewDesc("nbdvault_volume_upload_failing",
		"1 while the volume's uploads fail (see the server log), else 0.", []string{"volume"}, nil)
	descVerifyTime = prometheus.NewDesc("nbdvault_verify_last_run_timestamp_seconds",
		"When the last verify ran (Unix time); absent until one has.", nil, nil)
	descVerifyProblems = prometheus.NewDesc("nbdvault_verify_last_problems",
		"Damaged or missing objects the last verify found: alert on anything but 0.", nil, nil)
	descChunkPuts = prometheus.NewDesc("nbdvault_chunks_stored_total",
		"Chunks written to the repository (new content).", nil, nil)
	descChunkDedup = prometheus.NewDesc("nbdvault_chunks_deduplicated_total",
		"Chunks the repository already had, so not uploaded again.", nil, nil)
	descChunkBytesIn = prometheus.NewDesc("nbdvault_chunk_bytes_in_total",
		"Plaintext bytes of chunks given to the store.", nil, nil)
	descChunkBytesStored = prometheus.NewDesc("nbdvault_chunk_bytes_stored_total",
		"Bytes uploaded to the repository for chunks, after compression.", nil, nil)
	descCacheHits = prometheus.NewDesc("nbdvault_chunk_cache_hits_total",
		"Chunk reads answered from the cache.", nil, nil)
	descChunkGets = prometheus.NewDesc("nbdvault_chunk_fetches_total",
		"Chunks fetched from the repository.", nil, nil)
	descCorrupt = prometheus.NewDesc("nbdvault_chunks_corrupt_total",
		"Chunks that failed verification against their ID.", nil, nil)
	descRepoUp = prometheus.NewDesc("nbdvault_repository_up",
		"1 while the repository answers requests, 0 from the first request that got no answer until one does.", nil, nil)
	descLeaseConfirmed = prometheus.NewDesc("nbdvault_repository_lease_confirmed",
		"1 while the repository lease is confirmed and uploads may run; 0 while renewals fail (uploads paused).", nil, nil)
	descStateFree = prometheus.NewDesc("nbdvault_state_disk_free_bytes",
		"Bytes free for the server on the file system of its state folder (the write logs).", nil, nil)
	descDiskFull = prometheus.NewDesc("nbdvault_volume_disk_full",
		"1 while the volume's writes wait for room on a full state disk, else 0.", []string{"volume"}, nil)
	descDeltas = prometheus.NewDesc("nbdvault_volume_journal_deltas",
		"Journal deltas the volume's head reads through above its chunks (kept short by merges).", []string{"volume"}, nil)
	descJournalPacks = prometheus.NewDesc("nbdvault_volume_journal_packs",
		"Journal packs the volume has in the repository.", []string{"volume"}, nil)
	descShipped = prometheus.NewDesc("nbdvault_volume_journal_bytes_shipped_total",
		"Bytes of writes checkpoints stored as journal (before compression).", []string{"volume"}, nil)
	descFolded = prometheus.NewDesc("nbdvault_volume_chunks_folded_total",
		"Chunks rebuilt from journal once half of them changed.", []string{"volume"}, nil)
	descPointsFrom = prometheus.NewDesc("nbdvault_volume_points_in_time_window_seconds",
		"How far back VOL@TIME reads: seconds from the oldest point in time kept to now (0 when none is kept).", []string{"volume"}, nil)
	descPruneFailing = prometheus.NewDesc("nbdvault_volume_retention_failing",
		"1 while the last automatic prune by the volume's stored policy failed or was refused (status says why), else 0.", []string{"volume"}, nil)
	descPruneTime = prometheus.NewDesc("nbdvault_volume_retention_last_run_timestamp_seconds",
		"When the last automatic prune by the volume's stored policy ran (Unix time); absent until one has since the server started.", []string{"volume"}, nil)
	descVolLogical = prometheus.NewDesc("nbdvault_volume_logical_bytes",
		"Bytes the volume's head reads as data, as the last garbage collection counted (see nbdvault_space_counted_timestamp_seconds).", []string{"volume"}, nil)
	descVolStored = prometheus.NewDesc("nbdvault_volume_stored_bytes",
		"Repository bytes of the chunks and index pages only the volume's snapshots, checkpoints and head reference, and of its journal: what deleting it frees, as the last garbage collection counted.", []string{"volume"}, nil)
	descRepoShared = prometheus.NewDesc("nbdvault_repository_shared_bytes",
		"Repository bytes of the objects more than one volume references (in no volume's stored bytes), as the last garbage collection counted.", nil, nil)
	descRepoStored = prometheus.NewDesc("nbdvault_repository_stored_bytes",
		"Repository bytes of everything referenced, each object once, as the last garbage collection counted.", nil, nil)
	descRepoReferenced = prometheus.NewDesc("nbdvault_repository_referenced_bytes",
		"Plaintext bytes of the distinct data chunks referenced, as the last garbage collection counted.", nil, nil)
	descSpaceTime = prometheus.NewDesc("nbdvault_space_counted_timestamp_seconds",
		"When the space figures were counted (Unix time of the last garbage collection, a dry run too); absent until one has.", nil, nil)
	descReloadFailing = prometheus.NewDesc("nbdvault_tls_reload_failing",
		"1 while the last reload of the NBD TLS files or the access rules failed (the server goes on with the old ones; the log says why), else 0.", nil, nil)
	descTLSExpiry = prometheus.NewDesc("nbdvault_tls_certificate_expiry_timestamp_seconds",
		"When the NBD server certificate in use expires (Unix time); absent without TLS.", nil, nil)
	descDamaged = prometheus.NewDesc("nbdvault_volume_damaged",
		"1 for a volume that is not served or whose write log failed a check (run nbdvault volume recover), else 0.", []string{"volume"}, nil)
)

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSize, descPending, descPendingSnaps, descLag, descSinceSeal, descSealFailing,
		descChunkPuts, descChunkDedup, descChunkBytesIn, descChunkBytesStored, descCacheHits, descChunkGets, descCorrupt,
		descRepoUp, descLeaseConfirmed, descDamaged, descStateFree, descDiskFull,
		descDeltas, descJournalPacks, descShipped, descFolded, descPointsFrom, descVerifyTime, descVerifyProblems, descPruneFailing, descPruneTime,
		descVolLogical, descVolStored, descRepoShared, descRepoStored, descRepoReferenced, descSpaceTime,
		descReloadFailing, descTLSExpiry} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v int64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}
	if rep := c.s.lastVerify(); rep != nil {
		gauge(descVerifyTime, float64(rep.Time.UnixNano())/1e9)
		gauge(descVerifyProblems, float64(len(rep.Problems)))
	}
	var sp *volume.Space
	if c.s.env != nil {
		sp, _ = volume.LoadSpace(c.s.env.StateDir) // a damaged file: no figures (the admin API logs why)
	}
	if sp != nil {
		gauge(descSpaceTime, float64(sp.Time.UnixNano())/1e9)
		gauge(descRepoStored, float64(sp.Repository.Stored))
		gauge(descRepoReferenced, float64(sp.Repository.Referenced))
		gauge(descRepoShared, float64(sp.Repository.Shared))
	}
	spaceGauges := func(name string, created time.Time) {
		if t := volumeSpace(sp, name, created); t != nil {
			gauge(descVolLogical, float64(t.Logical), name)
			gauge(descVolStored, float64(t.Stored), name)
		}
	}
	for _, v := range c.s.Volumes() {
		name := v.Config().Name
		spaceGauges(name, v.Config().Created)
		st := v.Status()
		gauge(descSize, float64(v.Size()), name)
		gauge(descPending, float64(st.LogBytes), name)
		gauge(descPendingSnaps, float64(st.PendingLayers), name)
		gauge(descLag, st.Lag.Seconds(), name)
		since := c.s.started
		if !st.LastSeal.IsZero() {
			since = st.LastSeal
		}
		gauge(descSinceSeal, time.Since(since).Seconds(), name)
		failing := 0.0
		if st.SealError != nil {
			failing = 1
		}
		gauge(descSealFailing, failing, name)
		gauge(descDamaged, boolGauge(errors.Is(st.SealError, volume.ErrLogCorrupt)), name)
		gauge(descDiskFull, boolGauge(st.DiskFull), name)
		gauge(descDeltas, float64(st.Deltas), name)
		gauge(descJournalPacks, float64(st.JournalPacks), name)
		window := 0.0
		if from := v.PointsInTime(); !from.IsZero() {
			window = max(0, time.Since(from).Seconds())
		}
		gauge(descPointsFrom, window, name)
		if lp, ok := c.s.lastPrune(name); ok {
			gauge(descPruneFailing, boolGauge(lp.err != nil), name)
			gauge(descPruneTime, float64(lp.time.UnixNano())/1e9, name)
		}
		ch <- prometheus.MustNewConstMetric(descShipped, prometheus.CounterValue, float64(st.Shipped), name)
		ch <- prometheus.MustNewConstMetric(descFolded, prometheus.CounterValue, float64(st.Folded), name)
	}
	for name := range c.s.Failed() {
		gauge(descDamaged, 1, name)
		spaceGauges(name, time.Time{})
	}
	if c.s.opts.Data != "" {
		gauge(descStateFree, float64(c.s.stateDisk().FreeBytes))
	}
	if sec := c.s.sec; sec != nil {
		gauge(descReloadFailing, boolGauge(sec.failing.Load() != nil))
		if exp := sec.expires.Load(); exp != 0 {
			gauge(descTLSExpiry, float64(exp))
		}
	}
	if c.s.health != nil {
		up, _, _ := c.s.health.state()
		gauge(descRepoUp, boolGauge(up))
	}
	if c.s.lease != nil {
		_, ok := c.s.lease.Confirmed()
		gauge(descLeaseConfirmed, boolGauge(ok))
	}
	if c.s.store != nil {
		st := c.s.store.Stats()
		counter(descChunkPuts, st.Puts-st.DedupHits-st.ZeroPuts)
		counter(descChunkDedup, st.DedupHits)
		counter(descChunkBytesIn, st.BytesIn)
		counter(descChunkBytesStored, st.BytesStored)
		counter(descCacheHits, st.CacheHits)
		counter(descChunkGets, st.BackendGets)
		counter(descCorrupt, st.Corrupt)
	}
}

// countRequests wraps the repository so its requests are counted.
func (m *metrics) countRequests(b chunkstore.Backend, h *repoHealth) chunkstore.Backend {
	c := &countingBackend{Backend: b, health: h}
	for i, name := range []string{"put", "get", "has", "delete", "list"} {
		c.ops[i] = m.repoOps.WithLabelValues(name)
		c.errs[i] = m.repoErrors.WithLabelValues(name)
	}
	return c
}

type countingBackend struct {
	chunkstore.Backend
	ops, errs [5]prometheus.Counter
	health    *repoHealth
}

func (c *countingBackend) Unwrap() chunkstore.Backend { return c.Backend }

func (c *countingBackend) count(i int, err error) error {
	c.ops[i].Inc()
	c.health.observe(err)
	if err != nil && !errors.Is(err, chunkstore.ErrNotFound) && !errors.Is(err, context.Canceled) {
		c.errs[i].Inc()
	}
	return err
}

func (c *countingBackend) Put(ctx context.Context, key string, data []byte) error {
	return c.count(0, c.Backend.Put(ctx, key, data))
}

func (c *countingBackend) Get(ctx context.Context, key string) ([]byte, error) {
	data, err := c.Backend.Get(ctx, key)
	return data, c.count(1, err)
}

func (c *countingBackend) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	data, err := c.Backend.GetRange(ctx, key, off, n)
	return data, c.count(1, err)
}

func (c *countingBackend) Has(ctx context.Context, key string) (bool, error) {
	ok, err := c.Backend.Has(ctx, key)
	return ok, c.count(2, err)
}

func (c *countingBackend) Delete(ctx context.Context, key string) error {
	return c.count(3, c.Backend.Delete(ctx, key))
}

func (c *countingBackend) DeleteMany(ctx context.Context, keys []string) error {
	return c.count(3, c.Backend.DeleteMany(ctx, keys))
}

func (c *countingBackend) List(ctx context.Context, prefix string, fn func(string) error) error {
	return c.count(4, c.Backend.List(ctx, prefix, fn))
}

func (c *countingBackend) ListSizes(ctx context.Context, prefix string, fn func(string, int64) error) error {
	return c.count(4, c.Backend.ListSizes(ctx, prefix, fn))
}
