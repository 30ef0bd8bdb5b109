package client

import (
	"errors"
	"io"
	"net"
	"sync"
)

// pumpBuffer is the size of each direction's buffer in pump. A TLS read
// returns at most one record (16 KiB); a socket read returns what is
// queued, and 256 KiB takes a large request in a few reads, each then
// written to TLS as records of 16 KiB.
const pumpBuffer = 256 << 10

// pump copies bytes both ways between kernel, the end of a socket pair
// whose other end the kernel's NBD driver holds, and server, the TLS
// connection to the server at the start of transmission, as nbd-client's
// TLS proxy does: the handshake has settled everything, so transmission
// is a stream of bytes to pass on unchanged, requests one way (FLUSH, FUA
// and TRIM among them) and replies the other.
//
// When either direction ends (end of stream or an error) pump closes
// both connections, so the other side sees the end too: the kernel fails
// its queued I/O and NBD_DO_IT returns; the server sees its client gone.
// It returns once both directions have stopped, with the error that
// ended the first one, or nil when that was an end of stream or a
// connection closed by the caller (a detach).
func pump(kernel, server net.Conn) error {
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	relay := func(dst, src net.Conn) {
		defer wg.Done()
		err := copyStream(dst, src)
		once.Do(func() { first = err })
		_ = kernel.Close()
		_ = server.Close()
	}
	wg.Add(2)
	go relay(server, kernel)
	go relay(kernel, server)
	wg.Wait()
	if errors.Is(first, net.ErrClosed) {
		return nil
	}
	return first
}

// copyStream writes what it reads from src to dst until src ends (nil)
// or either fails.
func copyStream(dst io.Writer, src io.Reader) error {
	buf := make([]byte, pumpBuffer)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
