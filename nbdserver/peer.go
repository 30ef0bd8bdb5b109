package nbdserver

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// peerUID is the user of the process at the other end of nc, for a Unix
// socket (SO_PEERCRED) or a loopback TCP connection (the kernel's table
// of this host's TCP sockets); false for anything else.
func peerUID(nc net.Conn) (int, bool) {
	switch c := nc.(type) {
	case *net.UnixConn:
		raw, err := c.SyscallConn()
		if err != nil {
			return 0, false
		}
		var cred *unix.Ucred
		var cerr error
		if err := raw.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil || cerr != nil {
			return 0, false
		}
		return int(cred.Uid), true
	case *net.TCPConn:
		remote, ok1 := c.RemoteAddr().(*net.TCPAddr)
		local, ok2 := c.LocalAddr().(*net.TCPAddr)
		if !ok1 || !ok2 || !remote.IP.IsLoopback() {
			return 0, false
		}
		return loopbackUID(remote.AddrPort(), local.AddrPort())
	}
	return 0, false
}

// loopbackUID finds the owner of the TCP socket on this host whose local
// address is client and whose remote address is server: the client's end
// of a loopback connection to us. Netlink's sock_diag would answer the
// same; /proc/net/tcp{,6} needs no privilege and is read once per
// connection.
func loopbackUID(client, server netip.AddrPort) (int, bool) {
	client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	server = netip.AddrPortFrom(server.Addr().Unmap(), server.Port())
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		if uid, ok := scanTCPTable(file, client, server); ok {
			return uid, true
		}
	}
	return 0, false
}

func scanTCPTable(file string, client, server netip.AddrPort) (int, bool) {
	f, err := os.Open(file)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	return tcpTableOwner(f, client, server)
}

// tcpTableOwner reads a table in /proc/net/tcp{,6}'s format for the open
// socket from client to server, and says its owner.
func tcpTableOwner(table io.Reader, client, server netip.AddrPort) (int, bool) {
	sc := bufio.NewScanner(table)
	sc.Scan() // the header
	for sc.Scan() {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		l, ok1 := parseProcAddr(fields[1])
		r, ok2 := parseProcAddr(fields[2])
		if !ok1 || !ok2 || l != client || r != server {
			continue
		}
		// Only an open socket has its owner: one closed (TIME_WAIT and
		// the like, inode 0) shows uid 0, which is not who connected.
		if fields[3] != "01" || fields[9] == "0" {
			return 0, false
		}
		uid, err := strconv.Atoi(fields[7])
		return uid, err == nil
	}
	return 0, false
}

// parseProcAddr reads /proc/net/tcp's "HEXADDR:HEXPORT": the address as
// 32-bit words in the host's byte order, the port as a number.
func parseProcAddr(s string) (netip.AddrPort, bool) {
	a, p, ok := strings.Cut(s, ":")
	if !ok || (len(a) != 8 && len(a) != 32) {
		return netip.AddrPort{}, false
	}
	raw, err := hex.DecodeString(a)
	port, perr := strconv.ParseUint(p, 16, 16)
	if err != nil || perr != nil {
		return netip.AddrPort{}, false
	}
	b := make([]byte, len(raw))
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(b[i:], binary.NativeEndian.Uint32(raw[i:]))
	}
	addr, _ := netip.AddrFromSlice(b)
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), true
}
