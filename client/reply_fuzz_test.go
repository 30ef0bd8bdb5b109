package client

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// FuzzReply feeds arbitrary server bytes to the reader goroutine while
// the requests of fuzzRequests are in flight: the client must never
// panic or allocate by a length the server sent beyond the spec's
// bounds, must finish every request once the server hangs up, and what
// it returns must be self-consistent. Seeds: fuzzReplySeeds and
// testdata/fuzz/FuzzReply; `make test` runs them, `make fuzz` explores.

// fuzzRequests are sent in this order, so they get cookies 1, 2, ...
var fuzzRequests = []struct {
	cmd, flags uint16
	off        uint64
	length     uint32
}{
	{nbd.CmdRead, 0, 4096, 16},
	{nbd.CmdBlockStatus, 0, 0, 1 << 20},
	{nbd.CmdBlockStatus, nbd.CmdFlagReqOne, 4096, 4096},
	{nbd.CmdFlush, 0, 0, 0},
	{nbd.CmdRead, 0, 0, 8},
}

// fuzzContexts are the meta contexts the fuzzed connection selected.
var fuzzContexts = map[uint32]string{10: "base:allocation", 11: "x-test:dirty"}

func simpleBytes(cookie uint64, errno uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, nbd.MagicSimpleReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return append(b, data...)
}

func chunkBytes(cookie uint64, flags, typ uint16, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, nbd.MagicStructuredReply)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func u32s(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func joinBytes(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// fuzzReplySeeds are replies to fuzzRequests: with structured replies
// (the bool) and without, valid and damaged.
func fuzzReplySeeds() []struct {
	structured bool
	data       []byte
} {
	const done = nbd.ReplyFlagDone
	valid := joinBytes(
		chunkBytes(1, 0, nbd.ReplyTypeOffsetHole, joinBytes(u64(4096), u32s(8))),
		chunkBytes(1, done, nbd.ReplyTypeOffsetData, joinBytes(u64(4104), []byte("abcdefgh"))),
		chunkBytes(2, 0, nbd.ReplyTypeBlockStatus, u32s(10, 4096, 0, 1<<20, nbd.StateHole|nbd.StateZero)),
		chunkBytes(2, done, nbd.ReplyTypeBlockStatus, u32s(11, 1<<20, 1)),
		chunkBytes(3, 0, nbd.ReplyTypeBlockStatus, u32s(10, 4096, 0)),
		chunkBytes(3, 0, nbd.ReplyTypeBlockStatus, u32s(11, 512, 1)),
		chunkBytes(3, done, nbd.ReplyTypeNone, nil),
		simpleBytes(4, 0, nil),
		chunkBytes(5, done, nbd.ReplyTypeError, joinBytes(u32s(nbd.EIO), []byte{0, 4}, []byte("oops"))),
	)
	errorOffset := joinBytes(u32s(nbd.EINVAL), []byte{0, 3}, []byte("bad"), u64(4100))
	return []struct {
		structured bool
		data       []byte
	}{
		{true, valid},
		{false, joinBytes(simpleBytes(1, 0, []byte("0123456789abcdef")), simpleBytes(2, nbd.EINVAL, nil),
			simpleBytes(3, nbd.ENOTSUP, nil), simpleBytes(4, 0, nil), simpleBytes(5, nbd.ESHUTDOWN, nil))},
		{true, joinBytes(chunkBytes(1, done, nbd.ReplyTypeErrorOffset, errorOffset), simpleBytes(4, nbd.ESHUTDOWN, nil))},
		{true, chunkBytes(1, done, nbd.ReplyTypeError, joinBytes(u32s(5), []byte{0, 9}, []byte("x")))},                                              // message past the chunk
		{true, chunkBytes(1, done, nbd.ReplyTypeOffsetData, joinBytes(u64(4100), make([]byte, 16)))},                                                // past the request
		{true, chunkBytes(2, done, nbd.ReplyTypeBlockStatus, u32s(10, 0, 0))},                                                                       // an empty extent
		{true, chunkBytes(3, done, nbd.ReplyTypeBlockStatus, u32s(10, 512, 0, 512, 0))},                                                             // two extents for REQ_ONE
		{true, joinBytes(chunkBytes(2, 0, nbd.ReplyTypeBlockStatus, u32s(12, 512, 0)), u32s(0xffffffff))},                                           // unknown context
		{true, joinBytes(chunkBytes(1, done, nbd.ReplyTypeBlockStatus, nil)[:16], u32s(0xffffffff))},                                                // huge chunk, cut short
		{true, joinBytes(chunkBytes(1, 0, nbd.ReplyTypeOffsetHole, joinBytes(u64(4096), u32s(16))), simpleBytes(1, 0, []byte("0123456789abcdef")))}, // simple after chunks
		{true, joinBytes(chunkBytes(4, 0, nbd.ReplyTypeError, joinBytes(u32s(nbd.EIO), []byte{0, 4}, []byte("oops"))), simpleBytes(4, 0, nil))},     // success after an error
		{false, chunkBytes(1, done, nbd.ReplyTypeNone, nil)},
		{false, []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}},
	}
}

func FuzzReply(f *testing.F) {
	for _, s := range fuzzReplySeeds() {
		f.Add(s.structured, s.data)
	}
	f.Fuzz(func(t *testing.T, structured bool, data []byte) {
		cli, srv := net.Pipe()
		c := newConn(cli, &exportInfo{size: 1 << 20, flags: fakeFlags, minBlock: 1, prefBlock: 4096,
			maxPayload: nbd.DefaultMaxPayload, structured: structured, contexts: fuzzContexts})
		defer c.Close()
		go func() { // read the requests, answer with data, hang up
			_, _ = io.ReadFull(srv, make([]byte, len(fuzzRequests)*nbd.RequestHeaderLen))
			_, _ = srv.Write(data)
			srv.Close()
		}()
		var reqs []*request
		for _, q := range fuzzRequests {
			var buf []byte
			if q.cmd == nbd.CmdRead {
				buf = make([]byte, q.length)
			}
			r, err := c.send(t.Context(), q.cmd, q.flags, int64(q.off), q.length, nil, buf)
			if err != nil {
				t.Fatalf("sending request %d: %v", len(reqs)+1, err)
			}
			reqs = append(reqs, r)
		}
		for _, r := range reqs {
			select {
			case <-r.done:
			case <-time.After(10 * time.Second):
				t.Fatalf("request %d still waits after the server hung up", r.cookie)
			}
			if r.result == nil {
				checkReplied(t, r)
			}
		}
	})
}

// checkReplied fails the test unless r, which succeeded, got what its
// command asks for.
func checkReplied(t *testing.T, r *request) {
	if r.err != nil {
		t.Fatalf("request %d succeeded after an error chunk: %v", r.cookie, r.err)
	}
	switch r.cmd {
	case nbd.CmdRead:
		if !r.covered.full(uint64(r.length)) && r.covered != nil {
			t.Fatalf("read %d succeeded with %v of [0, %d)", r.cookie, r.covered, r.length)
		}
	case nbd.CmdBlockStatus:
		if len(r.extents) != len(fuzzContexts) {
			t.Fatalf("block status %d succeeded with %d of %d contexts", r.cookie, len(r.extents), len(fuzzContexts))
		}
		for name, extents := range r.extents {
			var sum int64
			for _, e := range extents {
				if e.Length <= 0 {
					t.Fatalf("block status %d: an extent of %d bytes for %s", r.cookie, e.Length, name)
				}
				sum += e.Length
			}
			if len(extents) == 0 || sum > int64(r.length) || r.flags&nbd.CmdFlagReqOne != 0 && len(extents) != 1 {
				t.Fatalf("block status %d of %d bytes: %s has extents %v", r.cookie, r.length, name, extents)
			}
		}
	}
}
