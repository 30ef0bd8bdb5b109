package nbd

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"
)

// The fuzz targets feed arbitrary client bytes to a server: it must never
// panic, and must end the connection once the client goes away. Seeds live
// in testdata/fuzz and in seedNegotiate/seedTransmit; `make test` runs
// them, `make fuzz` explores.

func clientFlagsBytes() []byte {
	return binary.BigEndian.AppendUint32(nil, FlagCFixedNewstyle|FlagCNoZeroes)
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, MagicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func reqBytes(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, MagicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// structuredGo is a client's negotiation up to transmission on "disk" with
// structured replies and base:allocation.
func structuredGo() []byte {
	return cat(clientFlagsBytes(),
		optBytes(OptStructuredReply, nil),
		optBytes(OptSetMetaContext, metaData("disk", ContextBaseAllocation)),
		optBytes(OptGo, goData("disk", InfoBlockSize)))
}

func seedNegotiate() [][]byte {
	return [][]byte{
		structuredGo(),
		cat(clientFlagsBytes(), optBytes(OptList, nil), optBytes(OptAbort, nil)),
		cat(clientFlagsBytes(), optBytes(OptInfo, goData("disk", InfoName, InfoDescription)), optBytes(OptExportName, []byte("disk"))),
		cat(clientFlagsBytes(), optBytes(OptListMetaContext, metaData("disk")), optBytes(OptStartTLS, nil)),
		cat(clientFlagsBytes(), optBytes(OptGo, []byte{0, 0, 0, 200, 1})),
		cat(clientFlagsBytes(), optBytes(99, []byte("x"))),
	}
}

func seedTransmit() [][]byte {
	return [][]byte{
		cat(reqBytes(CmdWrite, CmdFlagFUA, 1, 0, 4, []byte("abcd")), reqBytes(CmdRead, 0, 2, 0, 4, nil), reqBytes(CmdDisc, 0, 3, 0, 0, nil)),
		cat(reqBytes(CmdBlockStatus, CmdFlagReqOne, 1, 0, 1<<20, nil), reqBytes(CmdTrim, 0, 2, 4096, 4096, nil)),
		cat(reqBytes(CmdWriteZeroes, CmdFlagNoHole|CmdFlagFastZero, 1, 0, 8192, nil), reqBytes(CmdFlush, 0, 2, 0, 0, nil)),
		cat(reqBytes(CmdRead, CmdFlagDF, 1, 1<<20-1, 2, nil), reqBytes(77, 0xffff, 2, 0, 0, nil)),
		reqBytes(CmdWrite, 0, 1, 0, 100, []byte("short")),
	}
}

// runServerOn serves one connection whose client sends data and hangs up,
// and fails if the server has not let go within a few seconds.
func runServerOn(t *testing.T, data []byte) {
	srv := &Server{
		Exports:          NewExportMap(&Export{Name: "disk", Description: "fuzz", Backend: NewMem(1 << 20)}),
		HandshakeTimeout: 2 * time.Second,
		Logger:           slog.New(slog.DiscardHandler),
	}
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() { srv.ServeConn(server); close(done) }()
	go func() { _, _ = io.Copy(io.Discard, client) }()
	_ = client.SetWriteDeadline(time.Now().Add(3 * time.Second))
	_, _ = client.Write(data)
	client.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("server still holds a connection whose client left, after input %q", data)
	}
}

func FuzzNegotiate(f *testing.F) {
	for _, s := range seedNegotiate() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) { runServerOn(t, data) })
}

func FuzzTransmit(f *testing.F) {
	for _, s := range seedTransmit() {
		f.Add(s)
	}
	prefix := structuredGo()
	f.Fuzz(func(t *testing.T, data []byte) { runServerOn(t, cat(prefix, data)) })
}
