package client

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// The kernel NBD driver's ioctls (linux/nbd.h: _IO(0xab, n)).
const (
	nbdSetSock       = 0xab00
	nbdSetBlksize    = 0xab01
	nbdDoIt          = 0xab03
	nbdClearSock     = 0xab04
	nbdClearQue      = 0xab05
	nbdSetSizeBlocks = 0xab07
	nbdDisconnect    = 0xab08
	nbdSetTimeout    = 0xab09
	nbdSetFlags      = 0xab0a
)

// AttachKernel connects the kernel's NBD device dev (/dev/nbdN) to export
// at addr ("host:port" or "unix:/path") and serves it: it returns only
// when the device is disconnected (DetachKernel, or the server gone past
// the I/O timeout), as nbd-client's background process does. ready is
// called once the device is usable. The export's transmission flags go
// to the kernel, so FLUSH and FUA reach the server (a mirror leg's
// durability depends on them); readOnly makes the device read-only.
//
// This is not github.com/pojntfx/go-nbd's client.Connect: v0.3.2 sends
// NBD_OPT_GO with a zero length field before its data, which a server
// following the protocol reads as a malformed option, and it never tells
// the kernel the transmission flags, so the device would drop flushes.
//
// blockSize is the device's logical block size, 512 to 4096 (0: 512, the
// kernel's default and most disks'): a mirror leg must match the local
// disk's, or LVM refuses to mix them.
//
// With tlsConfig the handshake starts with NBD_OPT_STARTTLS. The kernel
// has no TLS, so it is then given one end of a socket pair, and this
// process pumps bytes between the other end and the TLS connection while
// the device is attached (nbd-client's TLS proxy); closing either side
// ends the other. tlsConfig MUST name the server (ServerName) for a Unix
// socket; for TCP an empty one is the address's host. Without TLS the
// kernel takes the TCP or Unix socket itself, and nothing is pumped.
func AttachKernel(ctx context.Context, addr, dev, export string, tlsConfig *tls.Config, readOnly bool, blockSize int, timeout time.Duration, ready func()) error {
	// A connection closed before the greeting (a server restarting, a
	// relay reconnecting) is tried again a few times.
	var nc net.Conn
	var info KernelExport
	for attempt := 1; ; attempt++ {
		var err error
		opts := Options{TLS: tlsConfig}
		if nc, err = dial(ctx, addr, &opts); err != nil {
			return err
		}
		if nc, info, err = Handshake(ctx, nc, export, opts.TLS); err == nil {
			break
		}
		if !errors.Is(err, io.EOF) || attempt == 3 || ctx.Err() != nil {
			return fmt.Errorf("nbd: %s at %s: %w", export, addr, err)
		}
		time.Sleep(time.Second)
	}
	defer nc.Close()
	var sock *os.File
	var pumped chan error // pump's result, with TLS
	if tlsConfig != nil {
		kernelEnd, ours, err := socketPair()
		if err != nil {
			return fmt.Errorf("nbd: a socket pair for the kernel's end of TLS: %w", err)
		}
		sock, pumped = kernelEnd, make(chan error, 1)
		go func() { pumped <- pump(ours, nc) }()
		defer func() { _ = ours.Close() }() // ends the pump, if the kernel did not
	} else {
		fc, ok := nc.(interface{ File() (*os.File, error) })
		if !ok {
			return fmt.Errorf("nbd: cannot hand a %T to the kernel", nc)
		}
		var err error
		if sock, err = fc.File(); err != nil {
			return err
		}
	}
	defer sock.Close()
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("nbd: %w (is the nbd module loaded? modprobe nbd)", err)
	}
	defer f.Close()

	bs := int64(blockSize)
	bs = cmp.Or(bs, 512)
	if bs < 512 || bs > 4096 || bs&(bs-1) != 0 {
		return fmt.Errorf("nbd: block size %d: want 512, 1024, 2048 or 4096", bs)
	}
	flags := info.Flags
	if readOnly {
		flags |= nbd.FlagReadOnly
	}
	fd := int(f.Fd())
	for _, s := range []struct {
		what string
		req  uint
		arg  int
	}{
		{"set the socket", nbdSetSock, int(sock.Fd())},
		{"set the block size", nbdSetBlksize, int(bs)},
		{"set the size", nbdSetSizeBlocks, int(info.Size / bs)},
		{"set the flags", nbdSetFlags, int(flags)},
		{"set the timeout", nbdSetTimeout, int(timeout / time.Second)},
	} {
		if err := unix.IoctlSetInt(fd, s.req, s.arg); err != nil {
			if errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("nbd: %s is in use (nbdvault client detach %s frees it)", dev, dev)
			}
			return fmt.Errorf("nbd: %s: %s: %w", dev, s.what, err)
		}
	}
	if info.Size%bs != 0 {
		return fmt.Errorf("nbd: %s is %d bytes, not a whole number of %d-byte blocks", export, info.Size, bs)
	}
	done := make(chan struct{})
	defer close(done)
	go waitReady(dev, done, ready)
	err = unix.IoctlSetInt(fd, nbdDoIt, 0) // serves until disconnected
	_ = unix.IoctlSetInt(fd, nbdClearQue, 0)
	_ = unix.IoctlSetInt(fd, nbdClearSock, 0)
	failed := err != nil && !errors.Is(err, unix.EPIPE) && !errors.Is(err, unix.ECONNRESET)
	if pumped != nil {
		_ = nc.Close() // the kernel let go: end the pump
		// The pump's end is often why the kernel let go (a TLS alert, the
		// server gone): say it with the kernel's error.
		if perr := <-pumped; perr != nil && !errors.Is(perr, unix.EPIPE) && !errors.Is(perr, unix.ECONNRESET) {
			if failed {
				return fmt.Errorf("nbd: %s: %w (the TLS connection to %s: %w)", dev, err, addr, perr)
			}
			return fmt.Errorf("nbd: %s: the TLS connection to %s: %w", dev, addr, perr)
		}
	}
	if failed {
		return fmt.Errorf("nbd: %s: %w", dev, err)
	}
	return nil
}

// socketPair returns the two ends of a new Unix stream socket pair: one
// as a file to hand the kernel, the other as a connection.
func socketPair() (*os.File, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	kernelEnd := os.NewFile(uintptr(fds[0]), "nbd-kernel")
	f := os.NewFile(uintptr(fds[1]), "nbd-pump")
	defer f.Close()
	ours, err := net.FileConn(f) // a dup of fds[1]
	if err != nil {
		_ = kernelEnd.Close()
		return nil, nil, err
	}
	return kernelEnd, ours, nil
}

// waitReady calls ready once dev has its size in sysfs.
func waitReady(dev string, done <-chan struct{}, ready func()) {
	path := filepath.Join("/sys/block", filepath.Base(dev), "size")
	for {
		if b, err := os.ReadFile(path); err == nil {
			if n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); n > 0 {
				ready()
				return
			}
		}
		select {
		case <-done:
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// DetachKernel disconnects the kernel's NBD device dev: requests still
// queued fail, and AttachKernel's process returns.
func DetachKernel(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("nbd: %w", err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), nbdDisconnect, 0); err != nil {
		return fmt.Errorf("nbd: disconnect %s: %w", dev, err)
	}
	return nil
}

// FreeKernelDevice returns an NBD device with no connection, or an error
// saying there is none (or no nbd module).
func FreeKernelDevice() (string, error) {
	devs, _ := filepath.Glob("/sys/block/nbd*")
	if len(devs) == 0 {
		return "", errors.New("nbd: no /dev/nbd* devices: load the nbd module (modprobe nbd)")
	}
	for _, d := range devs {
		if _, err := os.Stat(filepath.Join(d, "pid")); errors.Is(err, os.ErrNotExist) {
			return "/dev/" + filepath.Base(d), nil
		}
	}
	return "", fmt.Errorf("nbd: all %d /dev/nbd* devices are in use (modprobe nbd nbds_max=N for more)", len(devs))
}

// WaitDetached waits a little (up to 5 s) for a disconnected kernel NBD
// device to be free.
func WaitDetached(dev string) {
	for range 100 {
		if _, err := os.Stat("/sys/block/" + strings.TrimPrefix(dev, "/dev/") + "/pid"); errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}
