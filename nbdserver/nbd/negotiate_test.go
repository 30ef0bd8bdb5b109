package nbd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func memServer(t testing.TB, exports ...*Export) (*Server, string) {
	if len(exports) == 0 {
		exports = []*Export{{Name: "disk", Description: "a test disk", Backend: NewMem(1 << 20)}}
	}
	srv := &Server{Exports: NewExportMap(exports...)}
	return srv, startServer(t, srv)
}

func TestNegotiateGo(t *testing.T) {
	_, sock := memServer(t)
	w := dialWire(t, sock)
	w.greet(FlagCFixedNewstyle | FlagCNoZeroes)

	w.option(OptInfo, goData("disk", InfoName, InfoDescription, InfoBlockSize))
	infos := map[uint16][]byte{}
	for {
		r := w.optReply()
		require.Equal(t, OptInfo, r.opt)
		if r.typ == RepAck {
			break
		}
		require.Equal(t, RepInfo, r.typ)
		infos[binary.BigEndian.Uint16(r.data)] = r.data[2:]
	}
	require.Contains(t, infos, InfoExport)
	assert.EqualValues(t, 1<<20, binary.BigEndian.Uint64(infos[InfoExport]))
	flags := binary.BigEndian.Uint16(infos[InfoExport][8:])
	for _, f := range []uint16{FlagHasFlags, FlagSendFlush, FlagSendFUA, FlagSendTrim, FlagSendWriteZeroes, FlagCanMultiConn, FlagSendFastZero, FlagSendCache} {
		assert.NotZero(t, flags&f, "flag %#x", f)
	}
	assert.Zero(t, flags&FlagSendDF, "DF needs structured replies")
	assert.Zero(t, flags&FlagReadOnly)
	assert.Equal(t, "disk", string(infos[InfoName]))
	assert.Equal(t, "a test disk", string(infos[InfoDescription]))
	bs := infos[InfoBlockSize]
	assert.Equal(t, []uint32{1, 4096, DefaultMaxPayload},
		[]uint32{binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:])})

	size, _ := w.goExport("disk")
	assert.EqualValues(t, 1<<20, size)
	w.request(CmdRead, 0, 7, 0, 512, nil)
	cookie, errno, data := w.simple(512)
	assert.EqualValues(t, 7, cookie)
	assert.Zero(t, errno)
	assert.Equal(t, make([]byte, 512), data)
}

func TestNegotiateErrorsKeepTheSession(t *testing.T) {
	_, sock := memServer(t)
	w := dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)

	w.option(99, []byte("whatever"))
	r := w.optReply()
	assert.Equal(t, RepErrUnsup, r.typ)
	assert.Equal(t, uint32(99), r.opt)

	w.option(OptGo, goData("nope"))
	r = w.optReply()
	assert.Equal(t, RepErrUnknown, r.typ)
	assert.Contains(t, string(r.data), `"nope"`, "the message names the export")

	w.option(OptList, []byte{1})
	assert.Equal(t, RepErrInvalid, w.optReply().typ)

	w.option(OptGo, []byte{0, 0, 0, 9, 'x'}) // name longer than the data
	assert.Equal(t, RepErrInvalid, w.optReply().typ)

	w.option(OptSetMetaContext, metaData("disk", ContextBaseAllocation))
	assert.Equal(t, RepErrInvalid, w.optReply().typ, "SET_META_CONTEXT before STRUCTURED_REPLY")

	w.option(OptStartTLS, nil)
	assert.Equal(t, RepErrPolicy, w.optReply().typ, "no TLS configured")

	w.option(OptStructuredReply, []byte{1})
	assert.Equal(t, RepErrInvalid, w.optReply().typ)

	// An option too long to be real is read, refused, and the session goes on.
	w.option(OptList, make([]byte, maxOptionLen+1))
	assert.Equal(t, RepErrTooBig, w.optReply().typ)

	w.option(OptList, nil)
	r = w.optReply()
	require.Equal(t, RepServer, r.typ)
	assert.Equal(t, "disk", string(r.data[4:4+binary.BigEndian.Uint32(r.data)]))
	assert.Equal(t, "a test disk", string(r.data[4+binary.BigEndian.Uint32(r.data):]))
	assert.Equal(t, RepAck, w.optReply().typ)

	size, _ := w.goExport("disk")
	assert.EqualValues(t, 1<<20, size)
}

func TestNegotiateMetaContexts(t *testing.T) {
	_, sock := memServer(t, &Export{Name: "disk", Backend: NewMem(1 << 20), Contexts: map[string]ContextFunc{"x-nbdvault:dirty": nil}})
	w := dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.option(OptStructuredReply, nil)
	require.Equal(t, RepAck, w.optReply().typ)

	list := func(queries ...string) []string {
		w.option(OptListMetaContext, metaData("disk", queries...))
		var names []string
		for {
			r := w.optReply()
			if r.typ == RepAck {
				return names
			}
			require.Equal(t, RepMetaContext, r.typ)
			names = append(names, string(r.data[4:]))
		}
	}
	assert.Equal(t, []string{"base:allocation", "x-nbdvault:dirty"}, list())
	assert.Equal(t, []string{"base:allocation"}, list("base:"))
	assert.Equal(t, []string{"x-nbdvault:dirty"}, list("x-nbdvault:"))
	assert.Empty(t, list("qemu:dirty-bitmap:a"), "an unknown namespace is ignored")

	w.option(OptSetMetaContext, metaData("disk", "base:", "base:allocation", "x-nbdvault:dirty", "other:thing"))
	var ids []uint32
	for {
		r := w.optReply()
		if r.typ == RepAck {
			break
		}
		require.Equal(t, RepMetaContext, r.typ)
		ids = append(ids, binary.BigEndian.Uint32(r.data))
	}
	assert.Equal(t, []uint32{1, 2}, ids, "\"base:\" selects nothing in SET; unique IDs for the two real contexts")
}

func TestNegotiateExportName(t *testing.T) {
	_, sock := memServer(t)
	for _, noZeroes := range []bool{false, true} {
		w := dialWire(t, sock)
		flags := FlagCFixedNewstyle
		if noZeroes {
			flags |= FlagCNoZeroes
		}
		w.greet(flags)
		w.option(OptExportName, []byte("disk"))
		want := 10 + 124
		if noZeroes {
			want = 10
		}
		b := w.read(want)
		assert.EqualValues(t, 1<<20, binary.BigEndian.Uint64(b))
		w.request(CmdFlush, 0, 1, 0, 0, nil)
		_, errno, _ := w.simple(0)
		assert.Zero(t, errno, "transmission starts right after the %d bytes", want)
	}
	// EXPORT_NAME cannot carry an error: an unknown name closes the session.
	w := dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.option(OptExportName, []byte("nope"))
	w.closed()
}

func TestNegotiateBrokenStreams(t *testing.T) {
	_, sock := memServer(t)
	w := dialWire(t, sock)
	w.greet(1 << 7) // unknown client flag
	w.closed()

	w = dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.write(make([]byte, 16)) // bad option magic
	w.closed()

	w = dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.option(OptAbort, nil)
	assert.Equal(t, RepAck, w.optReply().typ)
	w.closed()
}

// testTLS returns a server config with a fresh self-signed certificate and
// a client config that trusts it.
func testTLS(t testing.TB) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "nbdvault test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, IsCA: true, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}},
		&tls.Config{RootCAs: pool, ServerName: "localhost"}
}

func TestNegotiateRequireTLS(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	srv := &Server{Exports: NewExportMap(&Export{Name: "disk", Backend: NewMem(1 << 20)}), TLSConfig: serverTLS, RequireTLS: true}
	sock := startServer(t, srv)

	w := dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	for _, opt := range []uint32{OptList, OptInfo, OptGo, OptStructuredReply, 99} {
		w.option(opt, goData("disk"))
		assert.Equal(t, RepErrTLSReqd, w.optReply().typ, "option %d before TLS", opt)
	}
	w.option(OptExportName, []byte("disk"))
	w.closed()

	w = dialWire(t, sock)
	w.greet(FlagCFixedNewstyle)
	w.option(OptStructuredReply, nil) // refused before TLS, and forgotten after
	assert.Equal(t, RepErrTLSReqd, w.optReply().typ)
	w.option(OptStartTLS, nil)
	require.Equal(t, RepAck, w.optReply().typ)
	tc := tls.Client(w.c, clientTLS)
	require.NoError(t, tc.Handshake())
	w.c, w.br = tc, bufioReader(tc)
	w.option(OptStartTLS, nil)
	assert.Equal(t, RepErrInvalid, w.optReply().typ, "a second STARTTLS")
	size, _ := w.goExport("disk")
	assert.EqualValues(t, 1<<20, size)
	w.request(CmdWrite, 0, 1, 0, 3, []byte("abc"))
	_, errno, _ := w.simple(0)
	require.Zero(t, errno)
	w.request(CmdRead, 0, 2, 0, 3, nil)
	_, _, data := w.simple(3)
	assert.Equal(t, "abc", string(data))
}
