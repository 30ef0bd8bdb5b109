package nbdserver

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

// procAddr writes an IPv4 address and port as /proc/net/tcp does: the
// address as a 32-bit word in the host's byte order, in hex.
func procAddr(ap netip.AddrPort) string {
	a := ap.Addr().As4()
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], binary.BigEndian.Uint32(a[:]))
	return fmt.Sprintf("%X:%04X", b, ap.Port())
}

// TestTCPTableOwner: the owner of a loopback peer is read from its open
// socket's row; a row of a closed socket (TIME_WAIT, inode 0), which
// the kernel shows with uid 0, makes nobody root.
func TestTCPTableOwner(t *testing.T) {
	server := netip.MustParseAddrPort("127.0.0.1:10809")
	open := netip.MustParseAddrPort("127.0.0.1:40001")
	closed := netip.MustParseAddrPort("127.0.0.1:40002")
	closing := netip.MustParseAddrPort("127.0.0.1:40003")
	row := func(sl int, client netip.AddrPort, st string, uid, inode int) string {
		return fmt.Sprintf("%4d: %s %s %s 00000000:00000000 00:00000000 00000000 %5d        0 %d 1 0000000000000000 20 4 30 10 -1",
			sl, procAddr(client), procAddr(server), st, uid, inode)
	}
	table := strings.Join([]string{
		"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
		fmt.Sprintf("   0: %s 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0", procAddr(server)),
		row(1, open, "01", 1000, 51234),
		row(2, closed, "06", 0, 0),  // TIME_WAIT: closed, shown as uid 0
		row(3, closing, "01", 0, 0), // ESTABLISHED in name but without its socket
	}, "\n") + "\n"

	uid, ok := tcpTableOwner(strings.NewReader(table), open, server)
	assert.True(t, ok, "an open socket's row names its owner")
	assert.Equal(t, 1000, uid)

	for _, c := range []netip.AddrPort{closed, closing} {
		uid, ok := tcpTableOwner(strings.NewReader(table), c, server)
		assert.False(t, ok, "a socket without inode (row for %s) has no owner, got uid %d", c, uid)
	}
	_, ok = tcpTableOwner(strings.NewReader(table), netip.MustParseAddrPort("127.0.0.1:40004"), server)
	assert.False(t, ok, "no row, no owner")
}
