package main

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// progress shows how a long operation goes on stderr: a bar with bytes,
// rate and time left on a terminal (schollz/progressbar), plain lines
// every few seconds otherwise (logs, CI). Safe for concurrent use.
type progress struct {
	desc  string
	total int64 // -1: unknown
	bar   *progressbar.ProgressBar
	out   io.Writer

	mu      sync.Mutex
	done    int64
	start   time.Time
	lastOut time.Time
	noteStr string
}

// progressEvery is how often a plain progress line is printed.
const progressEvery = 2 * time.Second

func newProgress(desc string, total int64) *progress {
	p := &progress{desc: desc, total: total, out: os.Stderr, start: time.Now()}
	p.lastOut = p.start
	if term.IsTerminal(int(os.Stderr.Fd())) {
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetDescription(desc),
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionShowBytes(total >= 0),
			progressbar.OptionShowCount(),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionSpinnerType(14),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(os.Stderr) }),
		)
	}
	return p
}

// add counts n more bytes done.
func (p *progress) add(n int64) {
	if p.bar != nil {
		_ = p.bar.Add64(n)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	p.maybePrintLocked()
}

// note shows a short state (for work measured in something else).
func (p *progress) note(s string) {
	if p.bar != nil {
		p.bar.Describe(p.desc + ": " + s)
		_ = p.bar.Add64(0)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.noteStr = s
	p.maybePrintLocked()
}

func (p *progress) maybePrintLocked() {
	if p.bar != nil || time.Since(p.lastOut) < progressEvery {
		return
	}
	p.lastOut = time.Now()
	fmt.Fprintln(p.out, p.lineLocked())
}

func (p *progress) lineLocked() string {
	elapsed := time.Since(p.start)
	if p.total < 0 && p.done == 0 {
		return fmt.Sprintf("%s: %s (%s)", p.desc, p.noteStr, elapsed.Round(time.Second))
	}
	rate := float64(p.done) / max(elapsed.Seconds(), 1e-3)
	s := fmt.Sprintf("%s: %s", p.desc, formatSize(p.done))
	if p.total > 0 {
		s += fmt.Sprintf(" of %s (%.0f%%)", formatSize(p.total), 100*float64(p.done)/float64(p.total))
	}
	s += fmt.Sprintf(", %s/s", formatSize(int64(rate)))
	if p.total > 0 && rate > 0 && p.done < p.total {
		left := time.Duration(float64(p.total-p.done) / rate * float64(time.Second))
		s += fmt.Sprintf(", %s left", left.Round(time.Second))
	}
	if p.noteStr != "" {
		s += ", " + p.noteStr
	}
	return s
}

// finish ends the display with a last line.
func (p *progress) finish() {
	if p.bar != nil {
		_ = p.bar.Finish()
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(p.out, p.lineLocked()+", done in "+time.Since(p.start).Round(100*time.Millisecond).String())
}
