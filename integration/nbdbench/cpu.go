package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// clockTicks is USER_HZ, the unit of /proc/stat and /proc/PID/stat; 100
// on every Linux architecture Go supports.
const clockTicks = 100

// cpuSample is a moment's CPU accounting: the machine's busy time, and the
// time used by this program, its waited-for children (nbdcopy, fio) and
// the external server process, if any.
type cpuSample struct {
	at      time.Time
	machine time.Duration
	ours    time.Duration
	// server is the server's CPU time: the external process's, or for
	// nbdvault this process's (the harness idles while a client runs).
	server time.Duration
}

// sampleCPU reads the counters; serverPID is the external server's
// process, 0 for none.
func sampleCPU(serverPID int) (cpuSample, error) {
	s := cpuSample{at: time.Now()}
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return s, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return s, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	// user nice system idle iowait irq softirq steal: all but idle and
	// iowait are busy.
	var busy int64
	for i, v := range f[1:9] {
		if i == 3 || i == 4 {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return s, fmt.Errorf("/proc/stat: %v", err)
		}
		busy += n
	}
	s.machine = ticks(busy)
	for _, who := range []int{unix.RUSAGE_SELF, unix.RUSAGE_CHILDREN} {
		var ru unix.Rusage
		if err := unix.Getrusage(who, &ru); err != nil {
			return s, err
		}
		d := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		s.ours += d
		if who == unix.RUSAGE_SELF && serverPID == 0 {
			s.server = d
		}
	}
	if serverPID > 0 {
		d, err := processCPU(serverPID)
		if err != nil {
			return s, err
		}
		s.ours += d
		s.server = d
	}
	return s, nil
}

func ticks(n int64) time.Duration { return time.Duration(n) * time.Second / clockTicks }

// processCPU is the user and system time of a live process, all its
// threads.
func processCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: count fields
	// after its closing parenthesis. utime and stime are fields 14 and 15,
	// the 12th and 13th after it.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	var sum int64
	for _, v := range f[11:13] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %v", pid, err)
		}
		sum += n
	}
	return ticks(sum), nil
}

// otherCPU is the CPU time between a and b that neither the benchmark nor
// the server used (other processes, and kernel threads such as writeback),
// and the wall time, both summed over phases.
type otherCPU struct {
	other, wall time.Duration
}

func (o *otherCPU) add(a, b cpuSample) {
	o.other += max(0, (b.machine-a.machine)-(b.ours-a.ours))
	o.wall += b.at.Sub(a.at)
}

// share is other's share of the machine's capacity, in percent.
func (o otherCPU) share(cpus int) float64 {
	if o.wall <= 0 {
		return 0
	}
	return 100 * o.other.Seconds() / (o.wall.Seconds() * float64(cpus))
}

// processPeakRSS is the peak resident memory of process pid since it
// started (VmHWM in /proc/PID/status), in bytes.
func processPeakRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest) // "123456 kB"
			if len(f) == 2 && f[1] == "kB" {
				n, err := strconv.ParseInt(f[0], 10, 64)
				return n << 10, err
			}
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmHWM", pid)
}
