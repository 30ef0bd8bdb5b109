package mount

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// What mount and umount read from Linux: the mount table, loop devices'
// backing files, and processes, all from /proc and /sys.

// Entry is one line of /proc/self/mountinfo.
type Entry struct {
	Dir, Source, FSType string
}

// At returns the topmost mount on dir, if any. dir must be absolute
// with symbolic links resolved, as the kernel shows it.
func At(dir string) (Entry, bool, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return Entry{}, false, fmt.Errorf("reading the mount table: %w", err)
	}
	var found Entry
	ok := false
	for _, line := range strings.Split(string(data), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
		f := strings.Fields(line)
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+2 >= len(f) || unescapeMountinfo(f[4]) != dir {
			continue
		}
		// Later lines are mounted later: the last one is on top.
		found, ok = Entry{Dir: dir, FSType: f[sep+1], Source: unescapeMountinfo(f[sep+2])}, true
	}
	return found, ok, nil
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) the
// kernel writes in mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// loopBackingFile is the file loop device dev (/dev/loopN) reads, "" if it
// has none.
func loopBackingFile(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// newSessionAttr starts a process in a session of its own: no terminal,
// and no signal sent to our process group reaches it.
func newSessionAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setsid: true}
}

// processMark names one process across time: its PID and its start time
// (field 22 of /proc/PID/stat), so that a PID the kernel has given to
// another process since is never taken for it.
type processMark struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

func markProcess(pid int) (processMark, error) {
	start, _, err := procStat(pid)
	return processMark{PID: pid, Start: start}, err
}

// procStat reads a process's start time and state letter.
func procStat(pid int) (start uint64, state byte, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces:
	// count fields after its closing one. Field 3 is the state.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	return start, f[0][0], err
}

// alive reports whether the process is still running. A zombie is not:
// it has ended and waits only for its parent.
func (p processMark) alive() bool {
	start, state, err := procStat(p.PID)
	return err == nil && start == p.Start && state != 'Z' && state != 'X'
}

// waitGone waits up to d for the process to end. The process may not be
// our child, so there is nothing to wait on: poll.
func (p processMark) waitGone(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for p.alive() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// signal sends sig to the process if it is still the one marked.
func (p processMark) signal(sig syscall.Signal) {
	if p.alive() {
		_ = syscall.Kill(p.PID, sig)
	}
}
