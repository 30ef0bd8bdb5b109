package client

import (
	"cmp"
	"context"
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
func AttachKernel(ctx context.Context, addr, dev, export string, readOnly bool, blockSize int, timeout time.Duration, ready func()) error {
	// A connection closed before the greeting (a server restarting, a
	// relay reconnecting) is tried again a few times.
	var nc net.Conn
	var info KernelExport
	for attempt := 1; ; attempt++ {
		var err error
		if nc, err = dial(ctx, addr, &Options{}); err != nil {
			return err
		}
		if info, err = Handshake(ctx, nc, export); err == nil {
			break
		}
		if !errors.Is(err, io.EOF) || attempt == 3 || ctx.Err() != nil {
			return fmt.Errorf("nbd: %s at %s: %w", export, addr, err)
		}
		time.Sleep(time.Second)
	}
	defer nc.Close()
	fc, ok := nc.(interface{ File() (*os.File, error) })
	if !ok {
		return fmt.Errorf("nbd: cannot hand a %T to the kernel", nc)
	}
	sock, err := fc.File()
	if err != nil {
		return err
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
	if err != nil && !errors.Is(err, unix.EPIPE) && !errors.Is(err, unix.ECONNRESET) {
		return fmt.Errorf("nbd: %s: %w", dev, err)
	}
	return nil
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
