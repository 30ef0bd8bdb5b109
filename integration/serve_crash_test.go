package integration

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/client"
	"github.com/nbdvault/nbdvault/integration/servertest"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

// TestServeKill9 kills the real server with SIGKILL while a client writes,
// flushes and snapshots and the uploader seals, then restarts it, several
// times. After each restart: the head holds every write acknowledged
// before the last acknowledged FLUSH, and is exactly the state after some
// prefix of the writes sent (the log keeps order); every snapshot whose ID
// was returned reads back exactly as the writes before it left the volume;
// and the volume at any time during a round (VOL@TIME) is the state after
// a prefix of the writes sent before that time.
func TestServeKill9(t *testing.T) {
	const size, rounds = 16 << 20, 4
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 9))
	s := servertest.Start(t, servertest.Options{Args: []string{"--checkpoint-interval", "200ms"}})
	s.MustCLI("volume", "create", "vol", "--size", fmt.Sprint(size), "--chunk-size", "64K")
	s.MustCLI("snapshot", "create", "vol", "--wait") // the first point in time
	admin := s.API()

	model := make([]byte, size)  // the head as of the last verified state
	snaps := map[string][]byte{} // every snapshot the server handed out
	type past struct {
		from, to time.Time // when the round wrote, all of it sealed before from
		base     []byte
		w        *crashWriter
	}
	var pasts []past
	checked := 0
	// checkTimes reads the volume at a few times during round p.
	checkTimes := func(p past, n int, what string) {
		from := p.from
		if st := volumeStatus(t, s, "vol").Status; st.PointsInTimeFrom != nil && st.PointsInTimeFrom.After(from) {
			from = *st.PointsInTimeFrom // before the first checkpoint: only the snapshot by name
		}
		if !from.Before(p.to) {
			t.Logf("%s: no checkpoint during the round (snapshots closed every layer)", what)
			return
		}
		for range n {
			at := from.Add(time.Duration(r.Int64N(int64(p.to.Sub(from)))))
			name := at.UTC().Format(time.RFC3339Nano)
			pit, err := admin.Snapshot(t.Context(), "vol", name)
			require.NoError(t, err, "%s: the volume at %s (seed %d)", what, name, seed)
			got := readNBD(t, s, "vol@"+pit.ID)
			k, ok := p.w.prefixAt(p.base, got, at)
			require.True(t, ok, "%s: the volume at %s is not the state after a prefix of the writes sent before it (seed %d)", what, at, seed)
			t.Logf("%s: at %s: the first %d writes", what, at.Format(time.TimeOnly+".000"), k)
			checked++
		}
	}
	for round := range rounds {
		waitSealed(t, s, "vol") // so the points of this round start from model
		w := &crashWriter{r: rand.New(rand.NewPCG(seed, uint64(round))), admin: admin, head: bytes.Clone(model)}
		pasts = append(pasts, past{from: time.Now(), base: bytes.Clone(model), w: w})
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- w.run(ctx, s.NBD) }()
		time.Sleep(time.Duration(300+r.IntN(700)) * time.Millisecond)
		s.Kill()
		pasts[round].to = time.Now()
		cancel()
		<-done // fails once the server is gone
		t.Logf("round %d: killed after %d writes sent, %d flushed, %d snapshots", round, len(w.writes), w.flushed, len(w.snaps))
		for id, content := range w.snaps {
			snaps[id] = content
		}

		s.Restart()
		got := readNBD(t, s, "vol")
		k, ok := w.matchPrefix(model, got)
		require.True(t, ok, "round %d: the head is not the state after any prefix of the writes from the %d flushed to the %d sent (seed %d)",
			round, w.flushed, len(w.writes), seed)
		model = w.stateAfter(model, k)
		for id, want := range snaps {
			require.True(t, bytes.Equal(want, readNBD(t, s, "vol@"+id)), "round %d: snapshot %s differs (seed %d)", round, id, seed)
		}
		checkTimes(pasts[round], 3, fmt.Sprintf("round %d", round))
	}
	// Everything seals in the end, and still reads back the same.
	for id := range snaps {
		_, err := admin.WaitSealed(t.Context(), "vol", id, nil)
		require.NoError(t, err)
	}
	require.Equal(t, 0, s.Stop(), s.Log())
	s.Restart()
	for id, want := range snaps {
		require.True(t, bytes.Equal(want, readNBD(t, s, "vol@"+id)), "sealed snapshot %s differs (seed %d)", id, seed)
	}
	for i, p := range pasts {
		checkTimes(p, 1, fmt.Sprintf("at the end, round %d", i))
	}
	require.Positive(t, checked, "some times were read")
}

type crashWrite struct {
	off  int64
	data []byte
	sent time.Time
}

// crashWriter writes one request at a time, so the order the server
// receives them is the order they were sent.
type crashWriter struct {
	r       *rand.Rand
	admin   *api.Client
	head    []byte // the head if every write sent so far lands
	writes  []crashWrite
	flushed int // writes acknowledged before the last acknowledged FLUSH
	snaps   map[string][]byte
}

func (w *crashWriter) run(ctx context.Context, addr string) error {
	w.snaps = map[string][]byte{}
	c, err := client.Dial(ctx, addr, client.Options{Export: "vol"})
	if err != nil {
		return err
	}
	defer c.Close()
	size := int64(len(w.head))
	for i := 0; ; i++ {
		n := int64(4096 * (1 + w.r.IntN(64)))
		off := 4096 * w.r.Int64N((size-n)/4096+1)
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(w.r.Uint32())
		}
		w.writes = append(w.writes, crashWrite{off, p, time.Now()}) // sent: it may land
		if err := c.WriteAt(ctx, p, off, false); err != nil {
			return err
		}
		copy(w.head[off:], p)
		switch {
		case i%8 == 7:
			if err := c.Flush(ctx); err != nil {
				return err
			}
			w.flushed = len(w.writes)
		case i%48 == 5:
			content := bytes.Clone(w.head) // every write so far was acknowledged
			snap, err := w.admin.CreateSnapshot(ctx, "vol", "")
			if err != nil {
				return err
			}
			w.snaps[snap.ID] = content
		}
	}
}

// stateAfter is base with the first k writes applied.
func (w *crashWriter) stateAfter(base []byte, k int) []byte {
	out := bytes.Clone(base)
	for _, x := range w.writes[:k] {
		copy(out[x.off:], x.data)
	}
	return out
}

// prefixAt finds k such that got is base with the first k writes
// applied, and no write sent after at among them.
func (w *crashWriter) prefixAt(base, got []byte, at time.Time) (int, bool) {
	state := bytes.Clone(base)
	for k := 0; ; k++ {
		if bytes.Equal(state, got) {
			return k, true
		}
		if k == len(w.writes) || w.writes[k].sent.After(at) {
			return 0, false
		}
		copy(state[w.writes[k].off:], w.writes[k].data)
	}
}

// matchPrefix finds k, from the flushed writes to all sent, such that got
// is base with the first k writes applied.
func (w *crashWriter) matchPrefix(base, got []byte) (int, bool) {
	state := w.stateAfter(base, w.flushed)
	for k := w.flushed; ; k++ {
		if bytes.Equal(state, got) {
			return k, true
		}
		if k == len(w.writes) {
			return 0, false
		}
		copy(state[w.writes[k].off:], w.writes[k].data)
	}
}
