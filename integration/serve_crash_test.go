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
// was returned reads back exactly as the writes before it left the volume.
func TestServeKill9(t *testing.T) {
	const size, rounds = 16 << 20, 4
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	r := rand.New(rand.NewPCG(seed, 9))
	s := servertest.Start(t, servertest.Options{Args: []string{"--checkpoint-interval", "200ms"}})
	s.MustCLI("volume", "create", "vol", "--size", fmt.Sprint(size), "--chunk-size", "64K")
	admin := s.API()

	model := make([]byte, size)  // the head as of the last verified state
	snaps := map[string][]byte{} // every snapshot the server handed out
	for round := range rounds {
		w := &crashWriter{r: rand.New(rand.NewPCG(seed, uint64(round))), admin: admin, head: bytes.Clone(model)}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- w.run(ctx, s.NBD) }()
		time.Sleep(time.Duration(300+r.IntN(700)) * time.Millisecond)
		s.Kill()
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
}

type crashWrite struct {
	off  int64
	data []byte
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
		w.writes = append(w.writes, crashWrite{off, p}) // sent: it may land
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
		case i%16 == 5:
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
