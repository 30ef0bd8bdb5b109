package nbdserver

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/internal/testcerts"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

func mustRules(t *testing.T, text string) *atomic.Pointer[accessRules] {
	t.Helper()
	rs, err := parseAccessRules("rules", []byte(text))
	require.NoError(t, err)
	var p atomic.Pointer[accessRules]
	p.Store(rs)
	return &p
}

// TestAccessRules: the first rule that matches the identity and the
// volume decides; rw opens heads, ro snapshots and points in time,
// snapshots snapshots only; nothing matching is none; dn: matches the
// whole subject exactly, never as a glob.
func TestAccessRules(t *testing.T) {
	rules := mustRules(t, `
# comment
cert:db*            db-*      rw   # a trailing comment
cert:restore        *         ro
cert:audit          *         snapshots
dn:CN=ops,O=Example *         rw
uid:0               *         rw
gid:12345           web       ro
cert:*              {name}    rw
anonymous           public    ro
`)
	checkpoint := &nbd.Export{Name: "db-1@2026-12-01T10:00:00Z", Backend: snapshot{checkpoint: true}}
	snap := &nbd.Export{Name: "db-1@x", Backend: snapshot{}}
	for _, tc := range []struct {
		p      peer
		export string
		e      *nbd.Export
		why    string // "" when allowed
	}{
		{peer{cert: "db1", uid: -1}, "db-1", nil, ""},
		{peer{cert: "db1", uid: -1}, "db-1@x", snap, ""},
		{peer{cert: "db1", uid: -1}, "web", nil, `cert:db1 may not use volume "web": no access rule gives it that volume`},
		{peer{cert: "restore", uid: -1}, "db-1", nil, `cert:restore may not use the head of volume "db-1", only its snapshots (line 4 of the access rules gives it ro): open db-1@SNAPSHOT`},
		{peer{cert: "restore", uid: -1}, "db-1@x", snap, ""},
		{peer{cert: "restore", uid: -1}, "db-1@2026-12-01T10:00:00Z", checkpoint, ""},
		{peer{cert: "audit", uid: -1}, "db-1@x", nil, ""},
		{peer{cert: "audit", uid: -1}, "db-1@2026-12-01T10:00:00Z", checkpoint, `cert:audit may not use points in time of volume "db-1", only its snapshots (line 5 of the access rules gives it snapshots)`},
		{peer{cert: "x", dn: "CN=ops,O=Example", uid: -1}, "anything", nil, ""},
		{peer{cert: "x", dn: "CN=evil\\,O=Example", uid: -1}, "anything", nil, `cert:x may not use volume "anything"`},
		{peer{uid: 0, user: "root"}, "anything", nil, ""},
		{peer{uid: 1000, gids: []string{"12345"}}, "web@s", nil, ""},
		{peer{uid: 1000, gids: []string{"12345"}}, "web", nil, `uid:1000 may not use the head of volume "web"`},
		{peer{uid: 1000, gids: []string{"1000"}}, "web@s", nil, `uid:1000 may not use volume "web"`},
		{peer{cert: "mail", uid: -1}, "mail", nil, ""},
		{peer{cert: "mail", uid: -1}, "mail2", nil, `cert:mail may not use volume "mail2"`},
		{peer{uid: -1}, "public@s", nil, ""},
		{peer{uid: -1}, "db-1@s", nil, `anonymous may not use volume "db-1"`},
		{peer{uid: 1000}, "public@s", nil, `uid:1000 may not use volume "public"`},
	} {
		err := (&access{p: &tc.p, rules: rules}).Allow(tc.export, tc.e)
		if tc.why == "" {
			assert.NoError(t, err, "%s on %s", &tc.p, tc.export)
		} else if assert.Error(t, err, "%s on %s", &tc.p, tc.export) {
			assert.Contains(t, err.Error(), tc.why)
		}
	}
}

// TestAccessRulesErrors: a bad line is named, with what is wanted.
func TestAccessRulesErrors(t *testing.T) {
	for text, want := range map[string]string{
		"cert:a b":                    "rules line 1: want three fields (identity, volumes, mode), got 2",
		"\n\ncert:a b rwx":            "rules line 3: mode \"rwx\": want rw, ro, snapshots, none or admin",
		"host:a * rw":                 `identity "host:a": want cert:NAME, dn:DN, uid:USER, gid:GROUP, anonymous or *`,
		"cert: * rw":                  `identity "cert:"`,
		"cert:[ * rw":                 `identity "cert:["`,
		"cert:a [ rw":                 `volume pattern "["`,
		"uid:no-such-user-here * rw":  `identity "uid:no-such-user-here": no such user`,
		"gid:no-such-group-here * rw": `identity "gid:no-such-group-here": no such group`,
	} {
		_, err := parseAccessRules("rules", []byte(text))
		if assert.Error(t, err, text) {
			assert.Contains(t, err.Error(), want, text)
		}
	}
	rs, err := parseAccessRules("rules", []byte("uid:root * rw\ngid:root * ro\nanonymous pub ro\n"))
	require.NoError(t, err)
	assert.Equal(t, "0", rs.rules[0].pattern, "a user's name becomes its uid")
	assert.Equal(t, "0", rs.rules[1].pattern, "a group's name its gid")
	assert.True(t, rs.anonymousAllowed)
	assert.Contains(t, rs.describe(), "uid:root")
}

// TestDefaultAccess: without rules, the server's user and root open
// everything, a certificate the volume of its name, others nothing;
// --insecure lets everyone in.
func TestDefaultAccess(t *testing.T) {
	var p atomic.Pointer[accessRules]
	p.Store(defaultAccessRules(false))
	self := os.Getuid()
	assert.NoError(t, (&access{p: &peer{uid: self}, rules: &p}).Allow("db", nil))
	assert.NoError(t, (&access{p: &peer{uid: 0}, rules: &p}).Allow("db", nil))
	assert.NoError(t, (&access{p: &peer{cert: "db", uid: -1}, rules: &p}).Allow("db", nil))
	assert.Error(t, (&access{p: &peer{cert: "db", uid: -1}, rules: &p}).Allow("web", nil))
	assert.Error(t, (&access{p: &peer{uid: 65534}, rules: &p}).Allow("db", nil))
	assert.Error(t, (&access{p: &peer{uid: -1}, rules: &p}).Allow("db", nil))
	p.Store(defaultAccessRules(true))
	assert.NoError(t, (&access{p: &peer{uid: -1}, rules: &p}).Allow("db", nil))
}

type fakeListener struct {
	net.Listener
	addr net.Addr
}

func (f fakeListener) Addr() net.Addr { return f.addr }

// TestCheckListeners: a listener off loopback needs TLS and (client
// certificates or rules), unless --insecure; loopback and Unix sockets
// need nothing.
func TestCheckListeners(t *testing.T) {
	remote := fakeListener{addr: &net.TCPAddr{IP: net.ParseIP("192.0.2.7"), Port: 10809}}
	any6 := fakeListener{addr: &net.TCPAddr{IP: net.IPv6unspecified, Port: 10809}}
	local := fakeListener{addr: &net.TCPAddr{IP: net.IPv6loopback, Port: 10809}}
	sock := fakeListener{addr: &net.UnixAddr{Name: "/run/nbd.sock", Net: "unix"}}
	for _, tc := range []struct {
		s    *security
		ls   []net.Listener
		want string
	}{
		{&security{}, []net.Listener{local, sock}, ""},
		{&security{}, []net.Listener{local, remote}, "NBD listener 192.0.2.7:10809 is not on loopback and has no TLS"},
		{&security{}, []net.Listener{any6}, "NBD listener [::]:10809 is not on loopback and has no TLS"},
		{&security{insecure: true}, []net.Listener{remote}, ""},
		{&security{files: TLSFiles{Cert: "c"}}, []net.Listener{remote}, "has TLS but no --tls-client-ca and no --access rules"},
		{&security{files: TLSFiles{Cert: "c"}, current: TLSFiles{Cert: "c", ClientCA: "ca"}}, []net.Listener{remote}, ""},
		{&security{files: TLSFiles{Cert: "c"}, access: "rules"}, []net.Listener{remote}, ""},
	} {
		err := tc.s.checkListeners(tc.ls, nil)
		if tc.want == "" {
			assert.NoError(t, err)
		} else if assert.Error(t, err) {
			assert.Contains(t, err.Error(), tc.want)
		}
	}
}

// TestPeerUID finds the user at the other end of a loopback TCP
// connection and of a Unix socket: this process's own.
func TestPeerUID(t *testing.T) {
	for _, network := range []string{"tcp4", "tcp6", "unix"} {
		addr := "localhost:0"
		switch network {
		case "tcp6":
			addr = "[::1]:0"
		case "unix":
			addr = t.TempDir() + "/s"
		}
		l, err := net.Listen(network, addr)
		require.NoError(t, err)
		c, err := net.Dial(network, l.Addr().String())
		require.NoError(t, err)
		s, err := l.Accept()
		require.NoError(t, err)
		uid, ok := peerUID(s)
		assert.True(t, ok, network)
		assert.Equal(t, os.Getuid(), uid, network)
		c.Close()
		s.Close()
		l.Close()
	}
	a, ok := parseProcAddr("0100007F:2A39")
	assert.True(t, ok)
	assert.Equal(t, netip.MustParseAddrPort("127.0.0.1:10809"), a)
	a, ok = parseProcAddr("0000000000000000FFFF00000100007F:2A39")
	assert.True(t, ok)
	assert.Equal(t, netip.MustParseAddrPort("127.0.0.1:10809"), a, "v4-mapped")
	a, ok = parseProcAddr("00000000000000000000000001000000:0016")
	assert.True(t, ok)
	assert.Equal(t, "[::1]:22", a.String())
	for _, bad := range []string{"", "0100007F", "0100007G:1", "0100007F:10000", "01:1"} {
		_, ok := parseProcAddr(bad)
		assert.False(t, ok, bad)
	}
}

// FuzzAccessRules: any rules file parses or is refused with its line
// named; parsed rules decide without panicking.
func FuzzAccessRules(f *testing.F) {
	f.Add([]byte("cert:db db rw\nanonymous * none\n"))
	f.Add([]byte("dn:CN=a,O=b * ro # x\nuid:0 * admin\ngid:0 w* snapshots\n* {name} rw"))
	f.Add([]byte("cert:[ ] rw"))
	f.Fuzz(func(t *testing.T, b []byte) {
		rs, err := parseAccessRules("rules", b)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "rules") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		var p atomic.Pointer[accessRules]
		p.Store(rs)
		for _, who := range []*peer{{uid: -1}, {cert: "db", dn: "CN=a,O=b", uid: -1}, {uid: 0, gids: []string{"0"}}} {
			_ = (&access{p: who, rules: &p}).Allow("db@x", nil)
		}
		_ = rs.describe()
	})
}

// TestCertWithSeveralCNsHasNoName: a client certificate whose subject
// holds two common names, and no SAN, is nobody's: neither cert:db nor
// cert:web, though the CA signed it for client use. One common name
// names it.
func TestCertWithSeveralCNsHasNoName(t *testing.T) {
	ca := testcerts.NewCA(t, "clients")
	issue := func(subject pkix.Name) *x509.Certificate {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
			SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: subject,
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}, ca.Cert, &key.PublicKey, ca.Key)
		require.NoError(t, err)
		leaf, err := x509.ParseCertificate(der)
		require.NoError(t, err)
		roots := x509.NewCertPool()
		roots.AddCert(ca.Cert)
		_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
		require.NoError(t, err, "the handshake would accept it")
		return leaf
	}
	who := func(leaf *x509.Certificate) string {
		nc, other := net.Pipe()
		defer nc.Close()
		defer other.Close()
		cs := &tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}, VerifiedChains: [][]*x509.Certificate{{leaf, ca.Cert}}}
		return identify(nc, cs).String()
	}

	assert.Equal(t, "cert:db", who(issue(pkix.Name{CommonName: "db"})))

	two := issue(pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{{Type: oidCommonName, Value: "db"}, {Type: oidCommonName, Value: "web"}}})
	require.Len(t, two.Subject.Names, 2, "both common names are in the certificate")
	id := who(two)
	assert.NotEqual(t, "cert:db", id)
	assert.NotEqual(t, "cert:web", id)
	assert.Equal(t, "anonymous", id)
}
