package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/integration/miniotest"
	"github.com/nbdvault/nbdvault/integration/testenv"
)

// The restic comparison (issue 11): nbdvault next to restic, the
// file-level backup tool users would pick instead, through the same MinIO.
//
//  1. An ext4 image of 2 GiB, built without mounting (mkfs.ext4 -d) from a
//     tree of about 500 MB: text-like files (textdata.go), random files,
//     and copies of some of them. Every byte, name, time and the file
//     system's UUID and hash seed are fixed, so every run builds the same
//     image.
//  2. Ingest: the real `nbdvault serve` (built with go build) over
//     s3://BUCKET/nbd on a MinIO on 127.0.0.1; `nbdvault volume create`
//     and `nbdvault import`, which returns once the snapshot is sealed.
//     Next to it `restic backup IMAGE` into another bucket of the same
//     MinIO (the repository initialised untimed).
//  3. Restore: the server restarted (an empty chunk cache) and
//     `nbdvault restore VOL@SNAP --to OUT`; `restic restore latest
//     --target DIR`. Both outputs are compared with the image, untimed.
//  4. A scattered change: 2,000 random 4 KiB writes (distinct 4 KiB
//     aligned offsets, random bytes, seeded) to the image file and over
//     NBD to the volume's head; then `nbdvault snapshot create VOL --wait`
//     (at once after the writes, so it is the snapshot that ships them,
//     not the server's periodic checkpoint) and a second `restic backup
//     IMAGE`: the bytes and objects each adds to its repository.
//
// Every timed phase measures the wall time, the CPU time of the client
// commands (user + system, from their rusage), of `nbdvault serve` and of
// MinIO (/proc/PID/stat deltas), and lists the buckets afterwards.

const (
	resticImageSize   = 2 << 30
	resticWrites      = 2000
	resticWriteSize   = 4096
	resticVolume      = "vol"
	resticNbdPrefix   = "nbd"
	resticNbdBucket   = "nbdvault"
	resticRepoBucket  = "restic"
	resticPassword    = "nbdbench"
	resticChunkSize   = 1 << 20 // the volume's chunk size, the server's default
	resticTreeTextMB  = 280
	resticTreeRandMB  = 140
	resticTreeDupMB   = 80
	resticFixedUUID   = "6e626462-656e-4368-8000-000000000011"
	resticFixedTime   = 1767225600 // 2026-01-01T00:00:00Z, the files' and the file system's times
	resticSpaceNeeded = 10 << 30   // image, two restores, MinIO's two buckets, the server's state
)

// phaseCost is what one timed phase took.
type phaseCost struct {
	wall   time.Duration
	client time.Duration // user + system of the client commands
	server time.Duration // `nbdvault serve`; 0 for restic
	minio  time.Duration
	// Peak resident memory: of the largest client command, and of
	// `nbdvault serve` since it started (0 for restic).
	clientRSS, serverRSS int64
}

// bucketUsage is what a bucket (or prefix) holds.
type bucketUsage struct{ objects, bytes int64 }

func (u bucketUsage) minus(o bucketUsage) bucketUsage {
	return bucketUsage{u.objects - o.objects, u.bytes - o.bytes}
}

// resticSide is one tool's figures.
type resticSide struct {
	ingest, restore, change phaseCost
	stored                  bucketUsage // after the ingest
	added                   bucketUsage // by the change's snapshot
}

// resticResult is the comparison's report.
type resticResult struct {
	skipped string // why it did not run, if it did not

	tree      treeStats
	imageSize int64
	writes    int
	touched   int // distinct 1 MiB chunks the writes touched
	nbd, rst  resticSide
	versions  []string
	cmds      []string
	// writesTook is how long the writes took (both targets, one at a
	// time); changeWindow the server's and MinIO's CPU from the first
	// write to the seal.
	writesTook   time.Duration
	changeWindow phaseCost
	notes        []string // the last line each command printed to stderr, restic's summary
	// nbdKinds and nbdChangeKinds: nbdvault's objects after the ingest,
	// and those the change added, by kind.
	nbdKinds, nbdChangeKinds map[string]bucketUsage
	dropped                  bool
	settle                   time.Duration
}

// treeStats describes the tree the image is built from.
type treeStats struct {
	files                   int
	text, random, duplicate int64 // bytes
}

func (t treeStats) total() int64 { return t.text + t.random + t.duplicate }

// resticTools are the programs the comparison needs besides MinIO, with
// the command that prints each one's version.
var resticTools = [][]string{{"restic", "version"}, {"mkfs.ext4", "-V"}}

// checkResticTools returns the tools' versions and MinIO's path, or the
// reason the comparison cannot run.
func checkResticTools(ctx context.Context) (versions []string, minioBin string, err error) {
	var missing []string
	for _, t := range resticTools {
		if _, err := exec.LookPath(t[0]); err != nil {
			missing = append(missing, t[0])
			continue
		}
		out, err := exec.CommandContext(ctx, t[0], t[1:]...).CombinedOutput()
		if err != nil {
			return nil, "", fmt.Errorf("%s: %v: %s", shellJoin(t), err, out)
		}
		v, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		versions = append(versions, v)
	}
	minioBin, merr := miniotest.Binary()
	if merr != nil {
		missing = append(missing, "minio")
	} else {
		out, _ := exec.CommandContext(ctx, minioBin, "--version").CombinedOutput()
		v, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		versions = append(versions, v+" (module "+miniotest.Version+")")
	}
	if len(missing) > 0 {
		return nil, "", fmt.Errorf("missing tools: %s (run `make deps`: Debian packages restic, e2fsprogs; MinIO by go install)", strings.Join(missing, ", "))
	}
	return versions, minioBin, nil
}

// benchRestic runs the comparison in work. A missing tool skips it (the
// report says so), or fails it when NBDVAULT_REQUIRE_TOOLS or CI is set.
func benchRestic(ctx context.Context, cfg config, work string) (*resticResult, error) {
	res := &resticResult{imageSize: resticImageSize, writes: resticWrites, dropped: cfg.dropCaches, settle: cfg.settle}
	versions, minioBin, err := checkResticTools(ctx)
	if err != nil {
		if testenv.Required() {
			return nil, err
		}
		logf("restic comparison skipped: %v", err)
		res.skipped = err.Error()
		return res, nil
	}
	res.versions = versions
	dir := filepath.Join(work, "restic")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if !cfg.keep {
		defer os.RemoveAll(dir)
	}

	// 1. The image.
	image := filepath.Join(dir, "image.ext4")
	logf("restic: building a %d MiB ext4 image from a tree of about %d MB", resticImageSize>>20, resticTreeTextMB+resticTreeRandMB+resticTreeDupMB)
	mkfs, err := buildImage(ctx, dir, image, &res.tree)
	if err != nil {
		return nil, err
	}
	res.cmds = append(res.cmds, "# the image, untimed: a tree of files written by nbdbench (restic.go), then", mkfs)

	// The servers.
	bin := filepath.Join(dir, "nbdvault")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/nbdvault").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./cmd/nbdvault (run nbdbench from the module root): %v: %s", err, out)
	}
	mio, err := startMinio(filepath.Join(dir, "minio"))
	if err != nil {
		return nil, err
	}
	defer mio.Kill()
	for _, b := range []string{resticNbdBucket, resticRepoBucket} {
		if err := mio.client.MakeBucket(ctx, b, minio.MakeBucketOptions{}); err != nil {
			return nil, fmt.Errorf("make bucket %s: %w", b, err)
		}
	}
	res.cmds = append(res.cmds, fmt.Sprintf("%s server --address %s %s   # MinIO, one drive on the work directory's disk", minioBin, mio.Endpoint, mio.DataDir()))
	srv, err := startServe(ctx, bin, filepath.Join(dir, "serve"), mio)
	if err != nil {
		return nil, err
	}
	defer func() { srv.stop() }()
	res.cmds = append(res.cmds, shellJoin(srv.args))

	resticRepo := "s3:http://" + mio.Endpoint + "/" + resticRepoBucket
	resticCache := filepath.Join(dir, "restic-cache")
	rstEnv := append(mio.Env(), "RESTIC_PASSWORD="+resticPassword, "RESTIC_REPOSITORY="+resticRepo, "RESTIC_CACHE_DIR="+resticCache)
	restic := func(args ...string) []string { return append([]string{"restic"}, args...) }
	init := restic("init")
	if _, _, _, err := runCost(ctx, rstEnv, init, 0, 0); err != nil {
		return nil, err
	}
	if out, _, _, err := runCost(ctx, rstEnv, restic("cat", "config"), 0, 0); err == nil {
		var c struct {
			Version int `json:"version"`
		}
		if json.Unmarshal([]byte(out), &c) == nil {
			res.versions = append(res.versions, fmt.Sprintf("restic repository format version %d (restic's default: compression auto)", c.Version))
		}
	}
	res.cmds = append(res.cmds, "# restic's environment: RESTIC_REPOSITORY="+resticRepo+" RESTIC_PASSWORD=… RESTIC_CACHE_DIR="+resticCache+" AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…",
		shellJoin(init)+"   # untimed")
	nbdEnv := srv.env()
	nbd := func(args ...string) []string { return append([]string{bin}, args...) }

	// phase runs the timed commands one after another, after dropping the
	// page cache, and adds up what they cost.
	// It returns the last command's stdout; its stderr goes to ours.
	// phaseNow is phase without the wait after the drop (-settle).
	var runPhase func(wait bool, env []string, serverPID int, cmds ...[]string) (string, phaseCost, error)
	phase := func(env []string, serverPID int, cmds ...[]string) (string, phaseCost, error) {
		return runPhase(true, env, serverPID, cmds...)
	}
	phaseNow := func(env []string, serverPID int, cmds ...[]string) (string, phaseCost, error) {
		return runPhase(false, env, serverPID, cmds...)
	}
	runPhase = func(wait bool, env []string, serverPID int, cmds ...[]string) (string, phaseCost, error) {
		var total phaseCost
		var last string
		if wait {
			if err := settle(ctx, cfg); err != nil {
				return "", total, err
			}
		} else if cfg.dropCaches {
			if err := dropCaches(); err != nil {
				return "", total, err
			}
		}
		for _, args := range cmds {
			res.cmds = append(res.cmds, shellJoin(args))
			out, errOut, c, err := runCost(ctx, env, args, serverPID, mio.PID())
			if err != nil {
				return "", total, err
			}
			said := []string{lastLine(strings.ReplaceAll(errOut, "\r", "\n"))}
			for l := range strings.SplitSeq(out, "\n") { // restic's summary
				if strings.HasPrefix(l, "Added to the repository") || strings.HasPrefix(l, "processed ") {
					said = append(said, strings.TrimSpace(l))
				}
			}
			for _, l := range said {
				if l != "" {
					logf("restic: %s: %s", filepath.Base(args[0]), l)
					res.notes = append(res.notes, filepath.Base(args[0])+": "+l)
				}
			}
			total.wall += c.wall
			total.client += c.client
			total.server += c.server
			total.minio += c.minio
			total.clientRSS = max(total.clientRSS, c.clientRSS)
			total.serverRSS = max(total.serverRSS, c.serverRSS)
			last = out
		}
		return last, total, nil
	}

	// 2. Ingest.
	logf("restic: ingest with nbdvault")
	out, cost, err := phase(nbdEnv, srv.pid(), nbd("volume", "create", resticVolume, "--size", fmt.Sprintf("%dM", resticImageSize>>20)),
		nbd("import", "--from", image, resticVolume))
	if err != nil {
		return nil, err
	}
	res.nbd.ingest = cost
	snap := lastLine(out)
	if snap == "" {
		return nil, errors.New("nbdvault import printed no snapshot ID")
	}
	if res.nbd.stored, err = mio.usage(ctx, resticNbdBucket, resticNbdPrefix+"/"); err != nil {
		return nil, err
	}
	if res.nbdKinds, err = mio.kinds(ctx, resticNbdBucket, resticNbdPrefix+"/"); err != nil {
		return nil, err
	}
	logf("restic: ingest with restic")
	if _, res.rst.ingest, err = phase(rstEnv, 0, restic("backup", image)); err != nil {
		return nil, err
	}
	if res.rst.stored, err = mio.usage(ctx, resticRepoBucket, ""); err != nil {
		return nil, err
	}
	logf("restic: ingest: nbdvault %s, %d objects, %.1f MiB; restic %s, %d objects, %.1f MiB",
		res.nbd.ingest.wall.Round(time.Millisecond), res.nbd.stored.objects, mib(res.nbd.stored.bytes),
		res.rst.ingest.wall.Round(time.Millisecond), res.rst.stored.objects, mib(res.rst.stored.bytes))

	// 3. Restore.
	logf("restic: restore with nbdvault (server restarted: an empty chunk cache)")
	if err := srv.restart(ctx); err != nil {
		return nil, err
	}
	res.cmds = append(res.cmds, "# nbdvault serve restarted, untimed: its chunk cache is empty")
	restored := filepath.Join(dir, "restored.ext4")
	if _, res.nbd.restore, err = phase(nbdEnv, srv.pid(), nbd("restore", resticVolume+"@"+snap, "--to", restored)); err != nil {
		return nil, err
	}
	if err := compareFiles(image, restored); err != nil {
		return nil, fmt.Errorf("nbdvault restore (untimed check): %w", err)
	}
	res.cmds = append(res.cmds, "# untimed check: the restored file equals the image")
	os.Remove(restored)
	logf("restic: restore with restic")
	target := filepath.Join(dir, "restic-restore")
	if _, res.rst.restore, err = phase(rstEnv, 0, restic("restore", "latest", "--target", target)); err != nil {
		return nil, err
	}
	if err := compareFiles(image, filepath.Join(target, image)); err != nil {
		return nil, fmt.Errorf("restic restore (untimed check): %w", err)
	}
	res.cmds = append(res.cmds, "# untimed check: TARGET"+image+" equals the image")
	os.RemoveAll(target)
	logf("restic: restore: nbdvault %s, restic %s", res.nbd.restore.wall.Round(time.Millisecond), res.rst.restore.wall.Round(time.Millisecond))

	// 4. The scattered change.
	nbdBefore, err := mio.usage(ctx, resticNbdBucket, resticNbdPrefix+"/")
	if err != nil {
		return nil, err
	}
	kindsBefore, err := mio.kinds(ctx, resticNbdBucket, resticNbdPrefix+"/")
	if err != nil {
		return nil, err
	}
	rstBefore, err := mio.usage(ctx, resticRepoBucket, "")
	if err != nil {
		return nil, err
	}
	// The settle comes before the writes, and the snapshot right after
	// them: a wait between would let the server's own checkpoint (every
	// 10 s) ship the journal before the snapshot, which would then seal
	// next to nothing. The server's and MinIO's CPU from the first write
	// to the seal are kept as well.
	logf("restic: %d random 4 KiB writes to the image and to the volume's head", resticWrites)
	if err := settle(ctx, cfg); err != nil {
		return nil, err
	}
	s0, _ := processCPU(srv.pid())
	m0, _ := processCPU(mio.PID())
	t0 := time.Now()
	if res.touched, err = scatterWrites(ctx, image, srv.nbd); err != nil {
		return nil, err
	}
	res.writesTook = time.Since(t0)
	res.cmds = append(res.cmds, fmt.Sprintf("# untimed: %d writes of 4 KiB of random bytes at distinct random 4 KiB aligned offsets (seeded), to the image file (pwrite, fsync) and over NBD to the head of %s (the repository's client package, one at a time, then FLUSH); then at once, the page cache dropped without the settle:", resticWrites, resticVolume))
	if _, res.nbd.change, err = phaseNow(nbdEnv, srv.pid(), nbd("snapshot", "create", resticVolume, "--wait")); err != nil {
		return nil, err
	}
	s1, _ := processCPU(srv.pid())
	m1, _ := processCPU(mio.PID())
	res.changeWindow = phaseCost{wall: time.Since(t0), server: s1 - s0, minio: m1 - m0}
	if res.nbd.added, err = mio.usage(ctx, resticNbdBucket, resticNbdPrefix+"/"); err != nil {
		return nil, err
	}
	res.nbd.added = res.nbd.added.minus(nbdBefore)
	kindsAfter, err := mio.kinds(ctx, resticNbdBucket, resticNbdPrefix+"/")
	if err != nil {
		return nil, err
	}
	res.nbdChangeKinds = make(map[string]bucketUsage)
	for k, u := range kindsAfter {
		if d := u.minus(kindsBefore[k]); d != (bucketUsage{}) {
			res.nbdChangeKinds[k] = d
		}
	}
	if _, res.rst.change, err = phase(rstEnv, 0, restic("backup", image)); err != nil {
		return nil, err
	}
	if res.rst.added, err = mio.usage(ctx, resticRepoBucket, ""); err != nil {
		return nil, err
	}
	res.rst.added = res.rst.added.minus(rstBefore)
	logf("restic: change: nbdvault added %d objects, %.2f MiB; restic %d objects, %.2f MiB",
		res.nbd.added.objects, mib(res.nbd.added.bytes), res.rst.added.objects, mib(res.rst.added.bytes))

	if err := srv.stop(); err != nil {
		return nil, err
	}
	return res, nil
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// runCost runs args with env added to the environment and returns their
// stdout and what they cost; serverPID and minioPID are processes whose
// CPU time is counted too (0: none).
func runCost(ctx context.Context, env, args []string, serverPID, minioPID int) (stdout string, stderr string, c phaseCost, err error) {
	cpu := func(pid int) time.Duration {
		if pid == 0 {
			return 0
		}
		d, _ := processCPU(pid)
		return d
	}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	s0, m0 := cpu(serverPID), cpu(minioPID)
	start := time.Now()
	err = cmd.Run()
	c.wall = time.Since(start)
	c.server, c.minio = cpu(serverPID)-s0, cpu(minioPID)-m0
	if err != nil {
		return "", "", c, fmt.Errorf("%s: %v: %s%s", shellJoin(args), err, errOut.Bytes(), out.Bytes())
	}
	c.client = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		c.clientRSS = ru.Maxrss << 10 // kB on Linux
	}
	if serverPID != 0 {
		c.serverRSS, _ = processPeakRSS(serverPID)
	}
	return out.String(), errOut.String(), c, nil
}

// buildImage writes the tree into dir/tree, builds the image from it with
// mkfs.ext4 -d, removes the tree, and returns the mkfs command line.
func buildImage(ctx context.Context, dir, image string, st *treeStats) (string, error) {
	tree := filepath.Join(dir, "tree")
	defer os.RemoveAll(tree)
	if err := writeTree(tree, st); err != nil {
		return "", err
	}
	args := []string{"mkfs.ext4", "-q", "-F", "-U", resticFixedUUID, "-E", "hash_seed=" + resticFixedUUID + ",root_owner=0:0",
		"-d", tree, image, fmt.Sprintf("%dM", resticImageSize>>20)}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), fmt.Sprintf("E2FSPROGS_FAKE_TIME=%d", resticFixedTime))
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("%s: %v: %s", shellJoin(args), err, out)
	}
	return fmt.Sprintf("E2FSPROGS_FAKE_TIME=%d %s", resticFixedTime, shellJoin(args)), nil
}

// writeTree writes the image's files: text-like files of 4 KiB to 8 MiB,
// random files of 64 KiB to 16 MiB, then copies of files picked from
// both, each kind up to its share, in 16 directories of 4 subdirectories.
func writeTree(root string, st *treeStats) error {
	rng := rand.New(rand.NewPCG(11, 2026))
	rnd := rand.NewChaCha8([32]byte{'n', 'b', 'd', 'b', 'e', 'n', 'c', 'h', 11})
	text := newTextGen(11)
	var written []string
	when := time.Unix(resticFixedTime, 0)
	place := func(kind string, i int) (string, error) {
		d := filepath.Join(root, fmt.Sprintf("d%02d", rng.IntN(16)), fmt.Sprintf("s%d", rng.IntN(4)))
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", err
		}
		return filepath.Join(d, fmt.Sprintf("%s-%05d.dat", kind, i)), nil
	}
	write := func(path string, data []byte) error {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			return err
		}
		st.files++
		return os.Chtimes(path, when, when)
	}
	for i := 0; st.text < resticTreeTextMB*1e6; i++ {
		size := int64(4096) << rng.IntN(12) // 4 KiB to 8 MiB
		size += rng.Int64N(size)            // not a power of two
		data := make([]byte, size)
		path, err := place("text", i)
		if err != nil {
			return err
		}
		for b := 0; b < len(data); b += textBlockSize {
			text.fill(data[b:min(b+textBlockSize, len(data))], fmt.Sprintf("%s block %d", path[len(root):], b/textBlockSize))
		}
		if err := write(path, data); err != nil {
			return err
		}
		st.text += size
		written = append(written, path)
	}
	for i := 0; st.random < resticTreeRandMB*1e6; i++ {
		size := int64(64<<10) << rng.IntN(9) // 64 KiB to 16 MiB
		size += rng.Int64N(size)
		data := make([]byte, size)
		_, _ = rnd.Read(data)
		path, err := place("random", i)
		if err != nil {
			return err
		}
		if err := write(path, data); err != nil {
			return err
		}
		st.random += size
		written = append(written, path)
	}
	for i := 0; st.duplicate < resticTreeDupMB*1e6; i++ {
		src := written[rng.IntN(len(written))]
		data, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		path, err := place("copy", i)
		if err != nil {
			return err
		}
		if err := write(path, data); err != nil {
			return err
		}
		st.duplicate += int64(len(data))
	}
	// Directories' times too, deepest first.
	return filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return err
		}
		return os.Chtimes(path, when, when)
	})
}

// scatterWrites writes resticWrites blocks of random bytes at distinct
// random 4 KiB aligned offsets to the image file and, over NBD at addr,
// to the volume's head, and returns how many 1 MiB chunks they touched.
func scatterWrites(ctx context.Context, image, addr string) (int, error) {
	rng := rand.New(rand.NewPCG(11, 4096))
	rnd := rand.NewChaCha8([32]byte{'s', 'c', 'a', 't', 't', 'e', 'r', 11})
	offsets := sampleDistinct(rng, resticWrites, resticImageSize/resticWriteSize)
	rng.Shuffle(len(offsets), func(i, j int) { offsets[i], offsets[j] = offsets[j], offsets[i] })
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	conn, err := client.Dial(ctx, addr, client.Options{Export: resticVolume})
	if err != nil {
		return 0, fmt.Errorf("NBD %s/%s: %w", addr, resticVolume, err)
	}
	defer conn.Close()
	chunks := make(map[int64]bool)
	buf := make([]byte, resticWriteSize)
	for _, k := range offsets {
		off := k * resticWriteSize
		_, _ = rnd.Read(buf)
		if _, err := f.WriteAt(buf, off); err != nil {
			return 0, err
		}
		if err := conn.WriteAt(ctx, buf, off, false); err != nil {
			return 0, fmt.Errorf("NBD write at %d: %w", off, err)
		}
		chunks[off/resticChunkSize] = true
	}
	if err := f.Sync(); err != nil {
		return 0, err
	}
	if err := conn.Flush(ctx); err != nil {
		return 0, err
	}
	return len(chunks), conn.Shutdown(ctx)
}

// minioServer is a MinIO child process on 127.0.0.1 (miniotest's), and
// a client that lists its buckets.
type minioServer struct {
	*miniotest.Server
	client *minio.Client
}

func startMinio(dir string) (*minioServer, error) {
	s, err := miniotest.Launch(dir)
	if err != nil {
		return nil, err
	}
	c, err := minio.New(s.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, "")})
	if err != nil {
		s.Kill()
		return nil, err
	}
	return &minioServer{Server: s, client: c}, nil
}

// usage lists the objects under prefix in bucket.
func (m *minioServer) usage(ctx context.Context, bucket, prefix string) (bucketUsage, error) {
	var u bucketUsage
	for o := range m.client.ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err != nil {
			return u, fmt.Errorf("list %s/%s: %w", bucket, prefix, o.Err)
		}
		u.objects++
		u.bytes += o.Size
	}
	return u, nil
}

// kinds is usage by kind of object: the first path element under prefix,
// or under volumes/VOL/ the element after that.
func (m *minioServer) kinds(ctx context.Context, bucket, prefix string) (map[string]bucketUsage, error) {
	out := make(map[string]bucketUsage)
	for o := range m.client.ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err != nil {
			return nil, fmt.Errorf("list %s/%s: %w", bucket, prefix, o.Err)
		}
		parts := strings.Split(strings.TrimPrefix(o.Key, prefix), "/")
		kind := parts[0]
		if kind == "volumes" && len(parts) > 3 {
			kind = "volumes/*/" + parts[2]
		}
		u := out[kind]
		u.objects++
		u.bytes += o.Size
		out[kind] = u
	}
	return out, nil
}

// formatKinds lists usage by kind, most objects first.
func formatKinds(k map[string]bucketUsage) string {
	names := make([]string, 0, len(k))
	for n := range k {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b string) int {
		if c := cmp.Compare(k[b].objects, k[a].objects); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	var parts []string
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("`%s` %d (%.2f MiB)", n, k[n].objects, mib(k[n].bytes)))
	}
	return strings.Join(parts, ", ")
}

// waitHTTP polls url until it answers or exited closes, for up to a
// minute.
func waitHTTP(ctx context.Context, url string, exited <-chan struct{}) error {
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return nil
		}
		select {
		case <-exited:
			return errors.New("exited during start-up")
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return errors.New("not ready after 1 minute")
		}
	}
}

// serveProcess is a running `nbdvault serve` over the MinIO bucket.
type serveProcess struct {
	args       []string
	env        func() []string
	data, log  string
	admin, nbd string
	extraEnv   []string
	cmd        *exec.Cmd
	exited     chan struct{}
}

func startServe(ctx context.Context, bin, dir string, m *minioServer) (*serveProcess, error) {
	admin, err := testenv.PickAddr()
	if err != nil {
		return nil, err
	}
	nbdAddr, err := testenv.PickAddr()
	if err != nil {
		return nil, err
	}
	repo := "s3://" + resticNbdBucket + "/" + resticNbdPrefix + "?endpoint=" + m.Endpoint + "&tls=false&path-style=true&region=us-east-1"
	s := &serveProcess{data: filepath.Join(dir, "data"), log: filepath.Join(dir, "serve.log"), admin: admin, nbd: nbdAddr, extraEnv: m.Env()}
	s.args = []string{bin, "serve", "--data", s.data, "--listen", nbdAddr, "--admin", admin, "--repo", repo}
	s.env = func() []string { return []string{"NBDVAULT_SERVER=http://" + s.admin, "NBDVAULT_DATA=" + s.data} }
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return s, s.start(ctx)
}

func (s *serveProcess) start(ctx context.Context) error {
	logFile, err := os.OpenFile(s.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logFile.Close()
	s.cmd = exec.Command(s.args[0], s.args[1:]...)
	s.cmd.Env = append(os.Environ(), s.extraEnv...)
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("start nbdvault serve: %w", err)
	}
	exited := make(chan struct{})
	s.exited = exited
	go func() { _ = s.cmd.Wait(); close(exited) }()
	if err := waitHTTP(ctx, "http://"+s.admin+"/v1/status", exited); err != nil {
		_ = s.stop()
		log, _ := os.ReadFile(s.log)
		return fmt.Errorf("nbdvault serve: %w: %s", err, log)
	}
	return nil
}

func (s *serveProcess) pid() int { return s.cmd.Process.Pid }

// stop sends SIGTERM and waits a minute for the server to exit, then
// kills it. Stopping a stopped server does nothing.
func (s *serveProcess) stop() error {
	if s.cmd == nil {
		return nil
	}
	defer func() { s.cmd = nil }()
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		if code := s.cmd.ProcessState.ExitCode(); code != 0 {
			return fmt.Errorf("nbdvault serve exited with status %d (log: %s)", code, s.log)
		}
		return nil
	case <-time.After(time.Minute):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("nbdvault serve did not stop within a minute of SIGTERM (log: %s)", s.log)
	}
}

func (s *serveProcess) restart(ctx context.Context) error {
	if err := s.stop(); err != nil {
		return err
	}
	return s.start(ctx)
}

// write prints the comparison's section of the report.
func (r *resticResult) write(w io.Writer) {
	fmt.Fprintf(w, "\n### Ingest, restore and a scattered change, next to restic\n\n")
	if r.skipped != "" {
		fmt.Fprintf(w, "Not run: %s.\n", r.skipped)
		return
	}
	change := int64(r.writes) * resticWriteSize
	sec := func(d time.Duration) string { return fmt.Sprintf("%.2f", d.Seconds()) }
	ratio := func(n, rst float64) string {
		if n <= 0 {
			return "–"
		}
		return fmt.Sprintf("%.2f", rst/n)
	}
	row := func(title, n, rst, ratio string) { fmt.Fprintf(w, "| %s | %s | %s | %s |\n", title, n, rst, ratio) }
	timeRows := func(what, wallWhat string, n, rst phaseCost) {
		row(wallWhat+": wall time (s)", "**"+sec(n.wall)+"**", "**"+sec(rst.wall)+"**", "**"+ratio(n.wall.Seconds(), rst.wall.Seconds())+"**")
		row(what+": client CPU (s)", sec(n.client), sec(rst.client), ratio(n.client.Seconds(), rst.client.Seconds()))
		row(what+": `nbdvault serve` CPU (s)", sec(n.server), "–", "–")
		row(what+": MinIO CPU (s)", sec(n.minio), sec(rst.minio), ratio(n.minio.Seconds(), rst.minio.Seconds()))
		nt, rt := n.client+n.server+n.minio, rst.client+rst.minio
		row(what+": CPU, all of it (s)", sec(nt), sec(rt), ratio(nt.Seconds(), rt.Seconds()))
		row(what+": client peak RSS (MiB)", fmt.Sprintf("%.0f", mib(n.clientRSS)), fmt.Sprintf("%.0f", mib(rst.clientRSS)),
			ratio(float64(n.clientRSS), float64(rst.clientRSS)))
		row(what+": `nbdvault serve` peak RSS since its start (MiB)", fmt.Sprintf("%.0f", mib(n.serverRSS)), "–", "–")
	}
	perGiB := func(u bucketUsage) float64 { return float64(u.objects) / (float64(u.bytes) / (1 << 30)) }

	fmt.Fprintln(w, "| | nbdvault | restic | restic/nbdvault |")
	fmt.Fprintln(w, "|---|---:|---:|---:|")
	timeRows("ingest", "ingest", r.nbd.ingest, r.rst.ingest)
	row("stored after the ingest: objects", fmt.Sprint(r.nbd.stored.objects), fmt.Sprint(r.rst.stored.objects),
		ratio(float64(r.nbd.stored.objects), float64(r.rst.stored.objects)))
	row("stored after the ingest: MiB", fmt.Sprintf("%.1f", mib(r.nbd.stored.bytes)), fmt.Sprintf("%.1f", mib(r.rst.stored.bytes)),
		ratio(float64(r.nbd.stored.bytes), float64(r.rst.stored.bytes)))
	row("objects per GiB stored", fmt.Sprintf("**%.0f**", perGiB(r.nbd.stored)), fmt.Sprintf("%.0f", perGiB(r.rst.stored)),
		ratio(perGiB(r.nbd.stored), perGiB(r.rst.stored)))
	timeRows("restore", "restore", r.nbd.restore, r.rst.restore)
	timeRows("change", "change: `snapshot create --wait` / 2nd `backup`", r.nbd.change, r.rst.change)
	row("change: MiB added to the repository", fmt.Sprintf("%.2f", mib(r.nbd.added.bytes)), fmt.Sprintf("%.2f", mib(r.rst.added.bytes)),
		ratio(float64(r.nbd.added.bytes), float64(r.rst.added.bytes)))
	row("change: added / the change (7.8 MiB)", fmt.Sprintf("**%.2f×**", float64(r.nbd.added.bytes)/float64(change)),
		fmt.Sprintf("%.2f×", float64(r.rst.added.bytes)/float64(change)), "")
	row("change: objects added", fmt.Sprint(r.nbd.added.objects), fmt.Sprint(r.rst.added.objects),
		ratio(float64(r.nbd.added.objects), float64(r.rst.added.objects)))

	cache := fmt.Sprintf("written back and dropped before every timed phase, which started %s later (the snapshot after the change: at once, see below)", r.settle)
	if !r.dropped {
		cache = "not dropped (-drop-caches=false): the image was in the page cache for every ingest and backup"
	}
	fmt.Fprintf(w, "\nThe image: %d MiB of ext4 built by mkfs.ext4 -d (not mounted) from %d files of %.0f MB: %.0f MB text-like (textdata.go), %.0f MB random, %.0f MB copies of some of those; all seeded, the same every run. "+
		"The change: %d writes of 4 KiB (%.1f MiB) of random bytes at distinct random 4 KiB aligned offsets, to the image file and over NBD to the volume's head; they touched %d of the volume's %d chunks of 1 MiB. "+
		"Page cache: %s. Before the restore `nbdvault serve` was restarted, so its chunk cache was empty; restic kept its own cache of metadata (RESTIC_CACHE_DIR), as it does by default. "+
		"nbdvault restores a sparse file (holes for zero chunks); restic %s writes every byte. "+
		"Times are wall times from the first command's start to the last one's exit (ingest: `volume create` and `import`, which returns when the snapshot is sealed); client CPU is the commands' user + system time (rusage), the server's and MinIO's from /proc/PID/stat. "+
		"Objects and bytes are the bucket's listing (nbdvault: the prefix `%s/`, everything the server keeps there; restic: its whole bucket). In the ratio column above 1 means nbdvault is faster, takes less CPU or stores less.\n",
		r.imageSize>>20, r.tree.files, float64(r.tree.total())/1e6, float64(r.tree.text)/1e6, float64(r.tree.random)/1e6, float64(r.tree.duplicate)/1e6,
		r.writes, mib(change), r.touched, r.imageSize/resticChunkSize, cache, r.resticVersion(), resticNbdPrefix)

	goal := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**not met**"
	}
	ingest := r.rst.ingest.wall.Seconds() / r.nbd.ingest.wall.Seconds()
	restore := r.rst.restore.wall.Seconds() / r.nbd.restore.wall.Seconds()
	fmt.Fprintf(w, "\nIssue 11's goals in this run: ingest ≥ 2× restic's speed: %.2f×, %s; restore ≥ 2×: %.2f×, %s; objects per GiB stored ≤ 64: %.0f, %s; a snapshot after 2,000 scattered 4 KiB writes stores ≤ 5× the change: %.2f×, %s.\n",
		ingest, goal(ingest >= 2), restore, goal(restore >= 2), perGiB(r.nbd.stored), goal(perGiB(r.nbd.stored) <= 64),
		float64(r.nbd.added.bytes)/float64(change), goal(r.nbd.added.bytes <= 5*change))
	fmt.Fprintf(w, "\nThe change's writes took %.2f s (to the file and over NBD, one at a time; untimed). From the first write to the seal, %.2f s, `nbdvault serve` took %.2f s of CPU and MinIO %.2f s; the rows above count the snapshot command alone.\n",
		r.writesTook.Seconds(), r.changeWindow.wall.Seconds(), r.changeWindow.server.Seconds(), r.changeWindow.minio.Seconds())
	fmt.Fprintf(w, "\nnbdvault's objects after the ingest, by kind: %s. Added by the change: %s.\n", formatKinds(r.nbdKinds), formatKinds(r.nbdChangeKinds))
	if len(r.notes) > 0 {
		fmt.Fprintf(w, "\nWhat the commands said (the last line of stderr; restic's summary), in order:\n\n```\n%s\n```\n", strings.Join(r.notes, "\n"))
	}
	fmt.Fprintf(w, "\nTools: %s.\n\nCommands:\n\n```\n%s\n```\n", strings.Join(r.versions, "; "), strings.Join(r.cmds, "\n"))
}

// resticVersion is restic's version as the report names it.
func (r *resticResult) resticVersion() string {
	for _, v := range r.versions {
		if f := strings.Fields(v); len(f) >= 2 && f[0] == "restic" {
			return f[1]
		}
	}
	return ""
}

// sampleDistinct returns n distinct numbers from [0, total), sorted.
func sampleDistinct(rng *rand.Rand, n, total int64) []int64 {
	seen := make(map[int64]bool, n)
	out := make([]int64, 0, n)
	for int64(len(out)) < n {
		if k := rng.Int64N(total); !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}
