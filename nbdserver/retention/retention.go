// Package retention decides which snapshots a retention policy keeps:
// restic's rules (keep the last N; the newest of each of the last N
// hours, days, weeks, months, years that have one; everything within a
// duration of the newest), as users of restic and Proxmox Backup Server
// know them, with the reasons each snapshot is kept.
package retention

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Unlimited as a count keeps every bucket (restic's "unlimited").
const Unlimited = -1

// Policy says which snapshots to keep. Counts are 0 (the rule is off),
// positive, or Unlimited. The zero Policy keeps everything: Apply
// refuses it rather than remove every snapshot.
type Policy struct {
	Last    int `json:"last,omitempty"`
	Hourly  int `json:"hourly,omitempty"`
	Daily   int `json:"daily,omitempty"`
	Weekly  int `json:"weekly,omitempty"`
	Monthly int `json:"monthly,omitempty"`
	Yearly  int `json:"yearly,omitempty"`
	// Within keeps every snapshot taken after this span before the
	// newest snapshot (not before now: a volume that stopped taking
	// snapshots keeps its last ones).
	Within Span `json:"within,omitzero"`
}

// ErrEmpty is a policy with no rule: it would remove every snapshot.
var ErrEmpty = errors.New("the policy has no rule: give at least one --keep-… (it would remove every snapshot)")

// Empty says whether no rule is set.
func (p Policy) Empty() bool { return p == Policy{} }

// Validate says what is wrong with p, if anything.
func (p Policy) Validate() error {
	for _, r := range p.rules() {
		if *r.count < Unlimited {
			return fmt.Errorf("--keep-%s %d: want a count of 0 or more, or unlimited", r.name, *r.count)
		}
	}
	if p.Within.negative() {
		return fmt.Errorf("--keep-within %s: want a span of 0 or more", p.Within)
	}
	if p.Empty() {
		return ErrEmpty
	}
	return nil
}

// String is the policy as flags, e.g. "--keep-last 2 --keep-daily 7".
func (p Policy) String() string {
	var parts []string
	for _, r := range p.rules() {
		switch *r.count {
		case 0:
		case Unlimited:
			parts = append(parts, "--keep-"+r.name+" unlimited")
		default:
			parts = append(parts, fmt.Sprintf("--keep-%s %d", r.name, *r.count))
		}
	}
	if !p.Within.IsZero() {
		parts = append(parts, "--keep-within "+p.Within.String())
	}
	if len(parts) == 0 {
		return "(no rule: keep everything)"
	}
	return strings.Join(parts, " ")
}

type rule struct {
	name   string
	count  *int
	bucket func(t time.Time) int // the time's bucket; equal for times in one
}

// rules are the counted rules, in restic's order.
func (p *Policy) rules() []rule {
	return []rule{
		{"last", &p.Last, nil},
		{"hourly", &p.Hourly, func(t time.Time) int { return t.Year()*1_000_000 + t.YearDay()*100 + t.Hour() }},
		{"daily", &p.Daily, func(t time.Time) int { return t.Year()*1000 + t.YearDay() }},
		{"weekly", &p.Weekly, func(t time.Time) int { y, w := t.ISOWeek(); return y*100 + w }},
		{"monthly", &p.Monthly, func(t time.Time) int { return t.Year()*100 + int(t.Month()) }},
		{"yearly", &p.Yearly, func(t time.Time) int { return t.Year() }},
	}
}

// Snapshot is what the rules look at.
type Snapshot struct {
	ID        string
	Time      time.Time
	Protected bool
}

// Decision is a snapshot and what the policy does with it.
type Decision struct {
	Snapshot
	Keep    bool
	Reasons []string // why it is kept; empty when removed
}

// Apply decides, for each snapshot, whether p keeps it and why; loc is
// the time zone of the hours, days, weeks, months and years (weeks are
// ISO 8601, Monday to Sunday). The decisions come newest first.
//
// As in restic: each counted rule walks the snapshots newest first and
// keeps the first one of each bucket it has not seen, until it has kept
// its count; a rule that runs out of snapshots before its count also
// keeps the oldest ("oldest daily snapshot"), so the history kept is as
// long as it can be. Protected snapshots are always kept and take no
// part in the rules (as in Proxmox Backup Server).
func (p Policy) Apply(snaps []Snapshot, loc *time.Location) ([]Decision, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	ds := make([]Decision, len(snaps))
	for i, s := range snaps {
		ds[i] = Decision{Snapshot: s}
	}
	slices.SortStableFunc(ds, func(a, b Decision) int { return b.Time.Compare(a.Time) })

	var subject []*Decision // the snapshots the rules look at
	for i := range ds {
		if ds[i].Protected {
			ds[i].keep("protected")
		} else {
			subject = append(subject, &ds[i])
		}
	}
	if len(subject) == 0 {
		return ds, nil
	}
	newest := subject[0].Time
	for _, r := range p.rules() {
		left := *r.count
		last, seen := 0, false
		for i, d := range subject {
			if left == 0 {
				break
			}
			if r.bucket == nil {
				d.keep("last snapshot")
				left--
				continue
			}
			b := r.bucket(d.Time.In(loc))
			switch {
			case !seen || b != last:
				d.keep(r.name + " snapshot")
				left--
			case i == len(subject)-1:
				// The rule has counts left and no older snapshot: keep
				// the oldest too, for the longest history.
				d.keep("oldest " + r.name + " snapshot")
				left--
			}
			last, seen = b, true
		}
	}
	if !p.Within.IsZero() {
		from := p.Within.Before(newest)
		for _, d := range subject {
			if d.Time.After(from) {
				d.keep("within " + p.Within.String())
			}
		}
	}
	return ds, nil
}

func (d *Decision) keep(reason string) {
	d.Keep = true
	d.Reasons = append(d.Reasons, reason)
}

// Span is a calendar span, as restic's --keep-within takes it: years,
// months, days and hours ("1y6m", "7d", "36h", "2w"). Months and years
// are calendar ones: 1m before March 31 is March 3 (time.AddDate's).
type Span struct {
	Years, Months, Days, Hours int
}

// ParseSpan reads a span: numbers each followed by y, m (months), w, d
// or h, e.g. "1y6m", "7d12h".
func ParseSpan(s string) (Span, error) {
	var sp Span
	rest := strings.TrimSpace(s)
	if rest == "" {
		return sp, fmt.Errorf("span %q: want numbers with units y, m (months), w, d or h, e.g. 7d or 1y6m", s)
	}
	for rest != "" {
		i := strings.IndexFunc(rest, func(r rune) bool { return r < '0' || r > '9' })
		if i <= 0 {
			return Span{}, fmt.Errorf("span %q: want numbers with units y, m (months), w, d or h, e.g. 7d or 1y6m", s)
		}
		n, err := strconv.Atoi(rest[:i])
		if err != nil || n > 1_000_000 {
			return Span{}, fmt.Errorf("span %q: %q is too large", s, rest[:i])
		}
		switch rest[i] {
		case 'y':
			sp.Years += n
		case 'm':
			sp.Months += n
		case 'w':
			sp.Days += 7 * n
		case 'd':
			sp.Days += n
		case 'h':
			sp.Hours += n
		default:
			return Span{}, fmt.Errorf("span %q: unit %q: want y, m (months), w, d or h", s, rest[i])
		}
		rest = rest[i+1:]
	}
	return sp, nil
}

// IsZero says whether the span is empty.
func (s Span) IsZero() bool { return s == Span{} }

func (s Span) negative() bool { return s.Years < 0 || s.Months < 0 || s.Days < 0 || s.Hours < 0 }

// Before is the time s before t.
func (s Span) Before(t time.Time) time.Time {
	return t.AddDate(-s.Years, -s.Months, -s.Days).Add(-time.Duration(s.Hours) * time.Hour)
}

// String writes s as ParseSpan reads it, "0h" when empty.
func (s Span) String() string {
	var b strings.Builder
	for _, u := range []struct {
		n    int
		unit string
	}{{s.Years, "y"}, {s.Months, "m"}, {s.Days, "d"}, {s.Hours, "h"}} {
		if u.n != 0 {
			b.WriteString(strconv.Itoa(u.n) + u.unit)
		}
	}
	if b.Len() == 0 {
		return "0h"
	}
	return b.String()
}

// MarshalText and UnmarshalText write a span as its string in JSON.
func (s Span) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

func (s *Span) UnmarshalText(b []byte) error {
	sp, err := ParseSpan(string(b))
	if err != nil {
		return err
	}
	*s = sp
	return nil
}
