package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/nbdvault/nbdvault/integration/testenv"
	"github.com/nbdvault/nbdvault/nbdserver/api"
	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// TestMemoryBoundedUnderGreedyClients: 24 connections each ask for four
// 32 MiB READs (3 GiB in all) and never read a reply. The server's memory
// stays under --max-memory plus a constant, the greedy connections are
// cut off once their replies have been stuck for --reply-timeout, and a
// client that reads its replies gets a WRITE and a READ through meanwhile.
//
// It runs a binary built without -race: the race detector's shadow memory
// would triple what a payload buffer costs, and production runs without it.
// The settings go in by environment so that a server without them (before
// the budget existed) starts too, and fails on memory.
func TestMemoryBoundedUnderGreedyClients(t *testing.T) {
	const (
		maxMemory    = 512 << 20
		replyTimeout = 5 * time.Second
		greedyConns  = 24
		readsEach    = 4
		readSize     = 32 << 20
		// slack: what the process holds besides what --max-memory
		// bounds: the binary's text and data, goroutine stacks, the
		// runtime's own structures, connection buffers (measured: an idle
		// server is about 30 MiB), and the Go memory limit being soft.
		slack = 128 << 20
		// roundTripBound: a well-behaved client may wait for budget
		// while greedy connections hold it, at worst a few reply
		// timeouts (the budget frees a round of them each time); far
		// more than that on a loaded machine still means no stall.
		roundTripBound = 2 * time.Minute
	)
	bin := plainBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	nbdAddr, adminAddr := testenv.FreeAddr(t), testenv.FreeAddr(t)
	logPath := filepath.Join(t.TempDir(), "serve.log")
	logf, err := os.Create(logPath)
	require.NoError(t, err)
	defer logf.Close()
	cmd := exec.Command(bin, "serve", "--data", data, "--listen", nbdAddr, "--admin", adminAddr)
	cmd.Env = append(os.Environ(),
		"NBDVAULT_MAX_MEMORY="+strconv.Itoa(maxMemory),
		"NBDVAULT_REPLY_TIMEOUT="+replyTimeout.String())
	cmd.Stdout, cmd.Stderr = logf, logf
	require.NoError(t, cmd.Start())
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(60 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	})
	serverLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }

	// Up, then a 1 GiB volume to read.
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + adminAddr + "/v1/status")
		if err == nil {
			resp.Body.Close()
			break
		}
		require.True(t, time.Now().Before(deadline), "server not up after 60s:\n%s", serverLog())
		time.Sleep(50 * time.Millisecond)
	}
	token, err := os.ReadFile(filepath.Join(data, "admin-token"))
	require.NoError(t, err)
	cl, err := api.NewClient("http://"+adminAddr, strings.TrimSpace(string(token)))
	require.NoError(t, err)
	_, err = cl.CreateVolume(context.Background(), api.CreateVolume{Name: "disk", Size: 1 << 30})
	require.NoError(t, err)
	idle := procStatus(t, cmd.Process.Pid, "VmRSS")
	t.Logf("idle server: VmRSS %d MiB", idle>>20)

	// The greedy clients: every request sent, no reply read.
	greedy := make([]net.Conn, greedyConns)
	for i := range greedy {
		c := dialNBD(t, nbdAddr, "disk")
		greedy[i] = c
		var reqs []byte
		for j := range readsEach {
			reqs = append(reqs, nbdRequest(nbd.CmdRead, uint64(i*readsEach+j), uint64(j)*readSize, readSize)...)
		}
		_, err := c.Write(reqs)
		require.NoError(t, err)
	}
	start := time.Now()

	// A client that reads its replies: a WRITE, then a READ of it.
	good := dialNBD(t, nbdAddr, "disk")
	require.NoError(t, good.SetDeadline(time.Now().Add(roundTripBound)))
	br := bufio.NewReader(good)
	payload := make([]byte, 4096)
	_, _ = rand.Read(payload)
	_, err = good.Write(append(nbdRequest(nbd.CmdWrite, 1, 4096, 4096), payload...))
	require.NoError(t, err)
	require.NoError(t, simpleReply(br, 1, nil), "WRITE of the well-behaved client\nserver log:\n%s", lastChars(serverLog(), 4000))
	_, err = good.Write(nbdRequest(nbd.CmdRead, 2, 4096, 4096))
	require.NoError(t, err)
	got := make([]byte, 4096)
	require.NoError(t, simpleReply(br, 2, got), "READ of the well-behaved client\nserver log:\n%s", lastChars(serverLog(), 4000))
	require.True(t, bytes.Equal(payload, got), "the READ returned other data than written")
	t.Logf("well-behaved round trip: %v after the greedy clients sent their reads", time.Since(start).Round(time.Millisecond))

	// Hold the greedy connections until the server has cut them all off
	// (each has had memory and left its reply unread), then read the peak.
	cutDeadline := time.Now().Add(roundTripBound)
	for strings.Count(serverLog(), "did not read its replies") < greedyConns && time.Now().Before(cutDeadline) {
		if procStatus(t, cmd.Process.Pid, "VmRSS") > maxMemory+slack {
			break // no budget: fail now rather than wait
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("%d greedy connections cut off after %v", strings.Count(serverLog(), "did not read its replies"), time.Since(start).Round(time.Millisecond))
	hwm := procStatus(t, cmd.Process.Pid, "VmHWM")
	t.Logf("peak VmHWM %d MiB (--max-memory %d MiB + slack %d MiB allowed)", hwm>>20, maxMemory>>20, slack>>20)
	require.LessOrEqual(t, hwm, int64(maxMemory+slack), "the server's peak memory is past its budget")

	// The server cut the greedy clients off, once each: reading what it
	// sent ends in EOF or a reset, not in a wait.
	require.Equal(t, greedyConns, strings.Count(serverLog(), "did not read its replies"))
	for i, c := range greedy {
		require.NoError(t, c.SetReadDeadline(time.Now().Add(roundTripBound)))
		_, err := io.Copy(io.Discard, c)
		var ne net.Error
		require.False(t, errors.As(err, &ne) && ne.Timeout(), "greedy connection %d was never cut off", i)
	}
}

// plainBinary builds cmd/nbdvault without -race into the test's folder.
func plainBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "nbdvault")
	_, file, _, _ := runtime.Caller(0)
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/nbdvault")
	cmd.Dir = filepath.Join(filepath.Dir(file), "..")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go build ./cmd/nbdvault:\n%s", out)
	return bin
}

// procStatus reads a size field (kB) of /proc/PID/status, in bytes.
func procStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			require.NoError(t, err)
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// dialNBD connects and negotiates export name with fixed newstyle and
// NO_ZEROES: simple replies only.
func dialNBD(t *testing.T, addr, export string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(time.Minute)))
	hello := make([]byte, 18)
	_, err = io.ReadFull(c, hello)
	require.NoError(t, err)
	require.Equal(t, nbd.MagicInit, binary.BigEndian.Uint64(hello))
	msg := binary.BigEndian.AppendUint32(nil, nbd.FlagCFixedNewstyle|nbd.FlagCNoZeroes)
	msg = binary.BigEndian.AppendUint64(msg, nbd.MagicOpt)
	msg = binary.BigEndian.AppendUint32(msg, nbd.OptExportName)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	_, err = c.Write(msg)
	require.NoError(t, err)
	_, err = io.ReadFull(c, make([]byte, 10)) // size and transmission flags
	require.NoError(t, err)
	require.NoError(t, c.SetDeadline(time.Time{}))
	return c
}

func nbdRequest(typ uint16, cookie, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, nbd.MagicRequest)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// simpleReply reads a simple reply to cookie and its data into data.
func simpleReply(r io.Reader, cookie uint64, data []byte) error {
	hdr := make([]byte, 16)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return err
	}
	if m := binary.BigEndian.Uint32(hdr); m != nbd.MagicSimpleReply {
		return fmt.Errorf("reply magic %#x", m)
	}
	if e := binary.BigEndian.Uint32(hdr[4:]); e != 0 {
		return fmt.Errorf("errno %d", e)
	}
	if c := binary.BigEndian.Uint64(hdr[8:]); c != cookie {
		return fmt.Errorf("reply to cookie %d, want %d", c, cookie)
	}
	_, err := io.ReadFull(r, data)
	return err
}

func lastChars(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
