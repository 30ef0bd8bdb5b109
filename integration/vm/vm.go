// Package vm boots a small Linux guest under QEMU for tests that need a
// kernel of their own: NBD devices attached by the kernel, MD RAID1 with
// an NBD leg, LVM raid1. The host's kernel has no nbd, md or dm modules
// and no KVM; the guest runs Debian's kernel under software emulation
// (TCG) with an initramfs built here from the host's busybox-static,
// nbd-client, mdadm, lvm2 and socat (see image.go and docs/vm.md).
//
// The guest has no network. A host Unix socket (nbdvault's NBD listener)
// reaches it as a virtio-serial port; socat in the guest turns the port
// back into a Unix socket that nbd-client attaches. A port is one byte
// stream, so one NBD connection per port. Commands run through a small
// agent in the guest's /init on a control port (Machine.Run).
//
// A missing tool fails the test when CI or NBDVAULT_REQUIRE_TOOLS is set
// (as `make test` does) and skips it otherwise.
package vm

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdvault/nbdvault/integration/testenv"
)

// Disk is a virtio disk of the guest: /dev/vda, /dev/vdb… in order.
type Disk struct {
	File string // an existing raw image, used in place; or
	Size int64  // the size of a new sparse one in the test's temp folder
}

// Options say what machine to boot. All are optional.
type Options struct {
	Disks []Disk
	// Ports are virtio-serial ports by name (/dev/virtio-ports/NAME in the
	// guest), each connected to a host Unix socket path, such as an
	// nbdvault `--listen unix:PATH`. QEMU connects when it starts and
	// again within a second whenever the connection ends, so a port can
	// be attached, detached and attached again.
	Ports        map[string]string
	MemoryMiB    int           // default 512
	CPUs         int           // default 1
	BootTimeout  time.Duration // until the agent answers; default 3 minutes
	KernelParams string        // appended to the kernel command line
	// Files are host files copied into the guest, by guest path (an
	// nbdvault binary built for it, say). They go in a second cpio
	// archive after the cached one: the kernel unpacks both.
	Files map[string]string
}

// DefaultRunTimeout bounds a command run with Run or MustRun.
const DefaultRunTimeout = 2 * time.Minute

// controlPort is the name of the agent's port.
const controlPort = "nbdvault.ctl"

// Machine is a running guest.
type Machine struct {
	t        testing.TB
	cmd      *exec.Cmd
	done     chan struct{} // closed when qemu has exited
	exitErr  error
	Console  string        // the guest's serial console log
	BootTime time.Duration // from starting qemu to the agent's first answer

	mu     sync.Mutex // one command at a time on the control port
	ctl    net.Conn
	lines  *bufio.Scanner
	nextID int
}

var portName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// Start boots a guest and waits until its agent answers. The guest is
// killed when the test ends; if the test failed, the end of its console
// log goes to the test log.
func Start(t testing.TB, opts Options) *Machine {
	t.Helper()
	img, err := Prepare()
	if err != nil {
		if isMissing(err) {
			testenv.Unavailable(t, err)
		}
		t.Fatalf("vm: preparing the guest image: %v", err)
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		testenv.Unavailable(t, missing("qemu-system-x86_64", "qemu-system-x86"))
	}
	if opts.MemoryMiB == 0 {
		opts.MemoryMiB = 512
	}
	if opts.CPUs == 0 {
		opts.CPUs = 1
	}
	if opts.BootTimeout == 0 {
		opts.BootTimeout = 3 * time.Minute
	}
	// Unix socket paths are limited to 108 bytes: a short folder of our
	// own rather than t.TempDir(), whose path grows with the test name.
	dir, err := os.MkdirTemp("", "nbdvault-vm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	// We listen and QEMU connects, so there is nothing to wait for before
	// dialling; the agent's port opens when the guest's /init gets there.
	ctlPath := filepath.Join(dir, "ctl.sock")
	ln, err := net.Listen("unix", ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	if len(opts.Files) > 0 {
		if img.Initrd, err = withFiles(img.Initrd, opts.Files, filepath.Join(dir, "initrd.cpio")); err != nil {
			t.Fatalf("vm: adding files to the initramfs: %v", err)
		}
	}
	m := &Machine{t: t, done: make(chan struct{}), Console: filepath.Join(dir, "console.log")}
	args, err := qemuArgs(t, img, opts, m.Console, ctlPath)
	if err != nil {
		t.Fatal(err)
	}
	qlog, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer qlog.Close()
	m.cmd = exec.Command(qemu, args...)
	m.cmd.Stdout, m.cmd.Stderr = qlog, qlog
	// QEMU dies with the test process even if the test is killed.
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := m.cmd.Start(); err != nil {
		t.Fatalf("vm: start %s: %v", qemu, err)
	}
	go func() {
		m.exitErr = m.cmd.Wait()
		close(m.done)
	}()
	t.Cleanup(func() { m.stop(dir) })

	m.ctl, err = m.accept(ln, 30*time.Second)
	if err != nil {
		t.Fatalf("vm: %v\nqemu: %s %s", err, qemu, strings.Join(args, " "))
	}
	m.lines = bufio.NewScanner(m.ctl)
	m.lines.Buffer(make([]byte, 64<<10), 1<<20)
	if out, code := m.run(opts.BootTimeout, "uname -r"); code != 0 {
		t.Fatalf("vm: the agent answered `uname -r` with status %d: %s", code, out)
	}
	m.BootTime = time.Since(start)
	t.Logf("vm: booted %s in %v (qemu -accel tcg, %d MiB, console %s)", img.Release, m.BootTime.Round(time.Millisecond), opts.MemoryMiB, m.Console)
	return m
}

// qemuArgs is the QEMU command line: no network, no display, the console
// on a file, the disks, and a virtio-serial bus with the control port and
// one port per Options.Ports.
func qemuArgs(t testing.TB, img Image, opts Options, console, ctlPath string) ([]string, error) {
	args := []string{
		"-accel", "tcg", // KVM does not work on these machines
		"-machine", "pc", "-m", strconv.Itoa(opts.MemoryMiB), "-smp", strconv.Itoa(opts.CPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
		"-nic", "none", // no network at all
		"-no-reboot", // a panic or poweroff ends qemu
		"-serial", "file:" + console, "-monitor", "none",
		"-kernel", img.Kernel, "-initrd", img.Initrd,
		"-append", strings.TrimSpace("console=ttyS0 panic=-1 loglevel=4 " + opts.KernelParams),
	}
	for i, d := range opts.Disks {
		path := d.File
		if path == "" {
			if d.Size <= 0 {
				return nil, fmt.Errorf("vm: disk %d has neither File nor Size", i)
			}
			path = filepath.Join(t.TempDir(), fmt.Sprintf("disk%d.img", i))
			f, err := os.Create(path)
			if err != nil {
				return nil, err
			}
			err = f.Truncate(d.Size)
			f.Close()
			if err != nil {
				return nil, err
			}
		}
		args = append(args, "-drive", fmt.Sprintf("file=%s,format=raw,if=virtio,cache=writeback", qemuEscape(path)))
	}
	args = append(args, "-device", "virtio-serial-pci,id=vser",
		"-chardev", "socket,id=ctl,path="+qemuEscape(ctlPath),
		"-device", "virtserialport,bus=vser.0,chardev=ctl,name="+controlPort)
	i := 0
	for name, sock := range opts.Ports {
		if !portName.MatchString(name) || name == controlPort {
			return nil, fmt.Errorf("vm: bad port name %q: letters, digits, '.', '_', '-'", name)
		}
		id := fmt.Sprintf("port%d", i)
		i++
		// reconnect=1: after the server closes the connection (a detach,
		// a server restart, its negotiation deadline), QEMU dials again.
		args = append(args, "-chardev", fmt.Sprintf("socket,id=%s,path=%s,reconnect=1", id, qemuEscape(sock)),
			"-device", fmt.Sprintf("virtserialport,bus=vser.0,chardev=%s,name=%s", id, name))
	}
	return args, nil
}

// qemuEscape doubles commas, QEMU's option separator, in a value.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// accept waits for QEMU to dial the control socket, or to exit.
func (m *Machine) accept(ln net.Listener, timeout time.Duration) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-m.done:
		return nil, fmt.Errorf("qemu exited at start: %v", m.exitErr)
	case <-time.After(timeout):
		return nil, fmt.Errorf("qemu did not connect to the control socket within %v", timeout)
	}
}

// Run runs a shell script in the guest (busybox sh, as root) with
// DefaultRunTimeout and returns its stdout and stderr together and its
// exit status. A script still running at the timeout is killed, with
// status 137.
func (m *Machine) Run(t testing.TB, script string) (string, int) {
	t.Helper()
	return m.RunTimeout(t, DefaultRunTimeout, script)
}

// RunTimeout is Run with a timeout of its own.
func (m *Machine) RunTimeout(t testing.TB, timeout time.Duration, script string) (string, int) {
	t.Helper()
	out, code := m.run(timeout, script)
	if code < 0 {
		t.Fatalf("vm: %s\ncommand: %s", out, script)
	}
	return out, code
}

// MustRun is Run that fails the test unless the script exits 0.
func (m *Machine) MustRun(t testing.TB, script string) string {
	t.Helper()
	out, code := m.Run(t, script)
	if code != 0 {
		t.Fatalf("vm: exit status %d from:\n%s\noutput:\n%s", code, script, out)
	}
	return out
}

// run sends a script to the agent and reads its answer. A status below 0
// means the agent did not answer; the string then says why.
func (m *Machine) run(timeout time.Duration, script string) (string, int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nextID++
	id := strconv.Itoa(m.nextID)
	secs := int(timeout.Seconds())
	if secs < 1 {
		secs = 1
	}
	// The guest kills the script at the timeout and still answers; the
	// host waits longer for that answer, which also covers a boot.
	deadline := time.Now().Add(timeout + 30*time.Second)
	_ = m.ctl.SetDeadline(deadline)
	line := fmt.Sprintf("%s %d %s\n", id, secs, base64.StdEncoding.EncodeToString([]byte(script)))
	if _, err := m.ctl.Write([]byte(line)); err != nil {
		return fmt.Sprintf("sending the command to the guest: %v", err), -1
	}
	var out []byte
	for m.lines.Scan() {
		f := strings.SplitN(m.lines.Text(), " ", 3)
		if len(f) != 3 || f[0] != id {
			continue // an answer to an earlier command that timed out on our side
		}
		switch f[1] {
		case "o":
			b, err := base64.StdEncoding.DecodeString(f[2])
			if err != nil {
				return fmt.Sprintf("bad output line from the guest %q: %v", f[2], err), -1
			}
			out = append(out, b...)
		case "x":
			code, err := strconv.Atoi(f[2])
			if err != nil {
				return fmt.Sprintf("bad exit status from the guest %q", f[2]), -1
			}
			return string(out), code
		}
	}
	err := m.lines.Err()
	if err == nil {
		err = fmt.Errorf("the guest closed the control port")
	}
	select {
	case <-m.done:
		err = fmt.Errorf("%v; qemu exited: %v", err, m.exitErr)
	default:
	}
	return fmt.Sprintf("no answer from the guest's agent: %v (output so far: %q)", err, out), -1
}

// AttachNBD attaches the NBD export behind the virtio-serial port named
// port (an Options.Ports key) as a kernel NBD device in the guest and
// returns its path, such as /dev/nbd0. It waits up to 30 s for QEMU to be
// connected to the port's host socket. socat relays between the port and
// /run/PORT.sock, which nbd-client connects to; nbd-client's -timeout (60
// s) fails requests the server does not answer in time.
func (m *Machine) AttachNBD(t testing.TB, port, export string) string {
	t.Helper()
	return m.attachNBD(t, port, export, "")
}

// AttachNBDTLS is AttachNBD over TLS: nbd-client presents the client
// certificate in the guest folder dir (client-cert.pem, client-key.pem)
// and checks the server's against dir/ca-cert.pem and the name
// localhost.
func (m *Machine) AttachNBDTLS(t testing.TB, port, export, dir string) string {
	t.Helper()
	return m.attachNBD(t, port, export, fmt.Sprintf("-certfile %[1]s/client-cert.pem -keyfile %[1]s/client-key.pem -cacertfile %[1]s/ca-cert.pem -tlshostname localhost", shellQuote(dir)))
}

// TryAttachNBD is AttachNBD that returns nbd-client's output and exit
// status instead of failing the test, for attaches that must fail.
func (m *Machine) TryAttachNBD(t testing.TB, port, export string) (string, int) {
	t.Helper()
	return m.Run(t, m.attachScript(port, export, ""))
}

func (m *Machine) attachNBD(t testing.TB, port, export, flags string) string {
	out := strings.TrimSpace(m.MustRun(t, m.attachScript(port, export, flags)))
	lines := strings.Split(out, "\n")
	return lines[len(lines)-1]
}

func (m *Machine) attachScript(port, export, flags string) string {
	return fmt.Sprintf(`set -e
port=%s; export=%s
modprobe nbd
vm-name-ports
[ -e /dev/virtio-ports/$port ] || { echo "no virtio-serial port $port: $(ls /dev/virtio-ports)"; exit 1; }
# QEMU dials the host socket again within a second of losing it (after a
# detach, say); a port opened before that would read EOF at once.
state=/sys/kernel/debug/virtio-ports/$(basename $(readlink /dev/virtio-ports/$port))
i=0
until grep -q "host_connected: 1" $state; do
	i=$((i + 1)); [ $i -lt 300 ] || { echo "the host end of port $port is not connected: is the server listening?"; cat $state; exit 1; }
	usleep 100000
done
dev=
for b in /sys/block/nbd*; do
	[ -e $b/pid ] && continue
	dev=/dev/${b##*/}; break
done
[ -n "$dev" ] || { echo "no free /dev/nbd*"; exit 1; }
sock=/run/$port.sock
rm -f $sock
# One connection per port: socat relays one client, then exits.
socat UNIX-LISTEN:$sock OPEN:/dev/virtio-ports/$port >/run/socat-$port.log 2>&1 &
i=0
while [ ! -S $sock ]; do
	i=$((i + 1)); [ $i -lt 100 ] || { echo "socat did not listen on $sock"; cat /run/socat-$port.log; exit 1; }
	usleep 50000
done
nbd-client -N "$export" -u $sock $dev -b 4096 -t 60 %s >/run/nbd-client-$port.log 2>&1 || { cat /run/nbd-client-$port.log /run/socat-$port.log; exit 1; }
echo $dev`, shellQuote(port), shellQuote(export), flags)
}

// DetachNBD disconnects an NBD device AttachNBD returned.
func (m *Machine) DetachNBD(t testing.TB, dev string) {
	t.Helper()
	m.MustRun(t, "nbd-client -d "+shellQuote(dev))
}

// Shutdown syncs the guest's disks and powers it off, then waits for QEMU
// to exit.
func (m *Machine) Shutdown(t testing.TB) {
	t.Helper()
	m.MustRun(t, "sync")
	m.mu.Lock()
	// No answer comes: poweroff -f stops the machine at once.
	m.nextID++
	line := fmt.Sprintf("%d 60 %s\n", m.nextID, base64.StdEncoding.EncodeToString([]byte("poweroff -f")))
	_, _ = m.ctl.Write([]byte(line))
	m.mu.Unlock()
	select {
	case <-m.done:
	case <-time.After(60 * time.Second):
		t.Errorf("vm: still running 60 s after poweroff -f; killing it")
		_ = m.cmd.Process.Kill()
		<-m.done
	}
}

// consoleShown is how much of the console a failure shows: all of a
// normal boot's.
const consoleShown = 64 << 10

// ConsoleTail is the last n bytes of the guest's console log.
func (m *Machine) ConsoleTail(n int) string {
	b, err := os.ReadFile(m.Console)
	if err != nil {
		return fmt.Sprintf("(no console log: %v)", err)
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return "--- guest console (end) ---\n" + string(b) + "--- end of guest console ---"
}

func (m *Machine) qemuLog(dir string) string {
	b, _ := os.ReadFile(filepath.Join(dir, "qemu.log"))
	return "qemu said: " + string(b) + "\n" + m.ConsoleTail(consoleShown)
}

// stop kills QEMU if it still runs and, if the test failed, shows what
// QEMU and the guest's console said: every failure above relies on it.
func (m *Machine) stop(dir string) {
	select {
	case <-m.done:
	default:
		if m.t.Failed() && m.lines != nil {
			// The kernel's messages below the console's loglevel (md,
			// dm, nbd) often say why.
			out, _ := m.run(5*time.Second, "dmesg | tail -n 150")
			m.t.Logf("vm: guest dmesg (end):\n%s", out)
		}
		_ = m.cmd.Process.Kill()
		<-m.done
	}
	if m.ctl != nil {
		m.ctl.Close()
	}
	if m.t.Failed() {
		m.t.Logf("vm: %s", m.qemuLog(dir))
	}
}

// shellQuote quotes s for sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// withFiles writes to out the initramfs base followed by a cpio archive
// of files (guest path → host path), and returns out.
func withFiles(base string, files map[string]string, out string) (string, error) {
	data, err := os.ReadFile(base)
	if err != nil {
		return "", err
	}
	extra := newCPIO()
	for guest, host := range files {
		b, err := os.ReadFile(host)
		if err != nil {
			return "", err
		}
		fi, err := os.Stat(host)
		if err != nil {
			return "", err
		}
		extra.dir(path.Dir(guest))
		extra.file(guest, uint32(fi.Mode().Perm()), b)
	}
	var buf bytes.Buffer
	buf.Write(data)
	if err := extra.writeTo(&buf); err != nil {
		return "", err
	}
	return out, os.WriteFile(out, buf.Bytes(), 0o644)
}

// ForwardPort makes the virtio-serial port a Unix socket in the guest:
// socat relays each connection to the port, one at a time. For a port
// whose host end is an HTTP server, sequential requests work; they share
// the one host connection.
//
// Called again, it first stops the relay it started before, so that no
// stale relay holds the port, and waits until QEMU has the port's host end
// connected: after the host server restarted, what it sends first (an NBD
// greeting) must reach a new connection, not the old relay.
func (m *Machine) ForwardPort(t testing.TB, port, guestSocket string) {
	t.Helper()
	m.MustRun(t, fmt.Sprintf(`set -e
vm-name-ports
[ -e /dev/virtio-ports/%[1]s ] || { echo "no virtio-serial port %[1]s"; exit 1; }
pkill -f "socat UNIX-LISTEN:%[2]s" || true
state=/sys/kernel/debug/virtio-ports/$(basename $(readlink /dev/virtio-ports/%[1]s))
i=0
until grep -q "host_connected: 1" $state; do
	i=$((i + 1)); [ $i -lt 300 ] || { echo "the host end of port %[1]s is not connected: is the server listening?"; cat $state; exit 1; }
	usleep 100000
done
rm -f %[2]s
socat UNIX-LISTEN:%[2]s,fork OPEN:/dev/virtio-ports/%[1]s >/run/socat-%[1]s.log 2>&1 &
i=0
while [ ! -S %[2]s ]; do
	i=$((i + 1)); [ $i -lt 100 ] || { echo "socat did not listen on %[2]s"; cat /run/socat-%[1]s.log; exit 1; }
	usleep 50000
done`, port, guestSocket))
}
