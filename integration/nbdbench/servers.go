package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/nbdvault/nbdvault/nbdserver/nbd"
)

// allServers are the servers the benchmark knows, in their default order.
// "nbdvault" is nbdvault's NBD server over a raw file (nbd.File), which
// measures the protocol layer; "volume" is the same server over a volume's
// head (write log, uploader, repository), which is what users run.
var allServers = []string{"nbdvault", "volume", "qemu-nbd", "nbdkit"}

// serverArgs is the command line of an external server: each tool's
// defaults for a plain raw file, plus what the benchmark needs to reach it.
//
// qemu-nbd: --format=raw (no probing: a raw export, which is what probing
// would pick for random data, without the warning); --shared=0 because
// nbdcopy opens up to 4 connections (the default, 1, refuses the rest;
// more than 1 also makes qemu-nbd advertise multi-conn); --persistent
// because the phases connect one after another (by default qemu-nbd exits
// when its last client leaves). Its cache mode is its default,
// writeback, and aio its default, threads.
//
// nbdkit: the file plugin with its defaults (cache=default,
// fadvise=normal, 16 threads per connection). It serves its file under any
// export name, so there is no name to set.
func serverArgs(name, file, sock string) []string {
	switch name {
	case "qemu-nbd":
		return []string{"qemu-nbd", "--socket=" + sock, "--format=raw", "--export-name=bench",
			"--shared=0", "--persistent", file}
	case "nbdkit":
		return []string{"nbdkit", "--foreground", "--unix", sock, "--exit-with-parent", "file", file}
	}
	return nil
}

// nbdvaultCmdline describes the in-process server the way the others'
// command lines do.
func nbdvaultCmdline(file, sock string) string {
	return fmt.Sprintf("in process: (&nbd.Server{Exports: nbd.NewExportMap(&nbd.Export{Name: \"bench\", "+
		"Backend: nbd.OpenFile(%q, false)})}).Serve(nbd.Listen(%q)), other fields default", file, "unix:"+sock)
}

// server is a running NBD server.
type server struct {
	cmdline string
	pid     int // of the external process; 0 for nbdvault and volume, in this one
	// vol is the volume behind the "volume" server; nil for the others.
	vol *volumeServer
	// alive returns an error if the server has exited.
	alive func() error
	// stop stops the server and reports how it ended.
	stop func() error
}

// startServer starts server name on the Unix socket sock. file is the raw
// target file of the servers that use one; the volume keeps its
// repository and state in work instead.
func startServer(ctx context.Context, name, file, work, sock, logPath string, size int64) (*server, error) {
	switch name {
	case "nbdvault":
		return startNbdvault(file, sock, logPath)
	case "volume":
		return startVolume(ctx, work, sock, logPath, size, phaseInterval)
	}
	return startExternal(ctx, serverArgs(name, file, sock), sock, logPath)
}

func startNbdvault(file, sock, logPath string) (*server, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	b, err := nbd.OpenFile(file, false)
	if err != nil {
		logFile.Close()
		return nil, err
	}
	srv := &nbd.Server{
		Exports: nbd.NewExportMap(&nbd.Export{Name: "bench", Backend: b}),
		Logger:  slog.New(slog.NewTextHandler(logFile, nil)), // as the others' stderr, to a log file
	}
	alive, stop, err := serveInProcess(srv, sock, func() error { return errors.Join(b.Close(), logFile.Close()) })
	if err != nil {
		return nil, err
	}
	return &server{cmdline: nbdvaultCmdline(file, sock), alive: alive, stop: stop}, nil
}

func startExternal(ctx context.Context, args []string, sock, logPath string) (*server, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child has its own descriptor
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Should this program die without stopping it. The signal is the
	// harness's; it does not change how the server runs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	failed := func(what string) error {
		out, _ := os.ReadFile(logPath)
		return fmt.Errorf("%s %s (%v); its output:\n%s", args[0], what, waitErr, out)
	}

	// Ready when the socket accepts a connection.
	deadline := time.Now().Add(15 * time.Second)
	for {
		select {
		case <-exited:
			return nil, failed("exited while starting")
		default:
		}
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-exited
			return nil, failed("did not listen within 15s")
		}
		time.Sleep(20 * time.Millisecond)
	}

	alive := func() error {
		select {
		case <-exited:
			return failed("exited during the benchmark")
		default:
			return nil
		}
	}
	stop := func() error {
		if err := alive(); err != nil {
			return err
		}
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
			return failed("did not exit within 10s of SIGTERM")
		}
		// Ending on our SIGTERM, with status 0 or by the signal, is fine.
		var ee *exec.ExitError
		if waitErr == nil {
			return nil
		}
		if errors.As(waitErr, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGTERM {
				return nil
			}
		}
		return failed("failed on SIGTERM")
	}
	return &server{cmdline: shellJoin(args), pid: cmd.Process.Pid, alive: alive, stop: stop}, nil
}

// serveInProcess serves srv on the Unix socket sock, and returns the
// alive and stop functions of a server. release frees what the server
// uses; it runs when stop is called, or at once if listening fails.
func serveInProcess(srv *nbd.Server, sock string, release func() error) (alive, stop func() error, err error) {
	l, err := nbd.Listen("unix:" + sock)
	if err != nil {
		return nil, nil, errors.Join(err, release())
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	alive = func() error {
		select {
		case err := <-served:
			served <- err
			return fmt.Errorf("nbd.Server.Serve returned early: %v", err)
		default:
			return nil
		}
	}
	stop = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		serr := srv.Shutdown(ctx)
		err := <-served
		served <- err
		if !errors.Is(err, nbd.ErrServerClosed) {
			serr = errors.Join(serr, fmt.Errorf("nbd.Server.Serve: %v", err))
		}
		return errors.Join(serr, release())
	}
	return alive, stop, nil
}
