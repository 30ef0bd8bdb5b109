package retention

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func at(s string) time.Time {
	t, err := time.Parse("2006-01-02 15:04", s)
	if err != nil {
		panic(err)
	}
	return t
}

// daily is a snapshot at noon UTC every day of 2026's first quarter
// (January 1 is a Thursday, March 31 a Tuesday), and two more on March
// 31, at 08:00 and 18:00: 92 snapshots, named by their time.
func daily() []Snapshot {
	var snaps []Snapshot
	for d := at("2026-01-01 12:00"); !d.After(at("2026-03-31 12:00")); d = d.AddDate(0, 0, 1) {
		snaps = append(snaps, Snapshot{ID: d.Format("2006-01-02 15:04"), Time: d})
	}
	for _, s := range []string{"2026-03-31 08:00", "2026-03-31 18:00"} {
		snaps = append(snaps, Snapshot{ID: s, Time: at(s)})
	}
	return snaps
}

// kept lists the IDs kept, newest first, with their reasons.
func kept(t *testing.T, p Policy, snaps []Snapshot, loc *time.Location) []string {
	t.Helper()
	ds, err := p.Apply(snaps, loc)
	require.NoError(t, err)
	require.Len(t, ds, len(snaps), "every snapshot gets a decision")
	var out []string
	for i, d := range ds {
		if i > 0 {
			require.False(t, d.Time.After(ds[i-1].Time), "newest first")
		}
		if d.Keep {
			out = append(out, fmt.Sprintf("%s %v", d.ID, d.Reasons))
		} else {
			require.Empty(t, d.Reasons)
		}
	}
	return out
}

func TestApply(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy Policy
		want   []string
	}{
		{"last", Policy{Last: 3}, []string{
			"2026-03-31 18:00 [last snapshot]", "2026-03-31 12:00 [last snapshot]", "2026-03-31 08:00 [last snapshot]"}},
		{"daily: the newest of each day", Policy{Daily: 3}, []string{
			"2026-03-31 18:00 [daily snapshot]", "2026-03-30 12:00 [daily snapshot]", "2026-03-29 12:00 [daily snapshot]"}},
		{"hourly", Policy{Hourly: 2}, []string{
			"2026-03-31 18:00 [hourly snapshot]", "2026-03-31 12:00 [hourly snapshot]"}},
		{"weekly: ISO weeks, Monday to Sunday", Policy{Weekly: 2}, []string{
			"2026-03-31 18:00 [weekly snapshot]", "2026-03-29 12:00 [weekly snapshot]"}},
		{"monthly", Policy{Monthly: 2}, []string{
			"2026-03-31 18:00 [monthly snapshot]", "2026-02-28 12:00 [monthly snapshot]"}},
		{"a rule with counts left keeps the oldest too", Policy{Yearly: 5}, []string{
			"2026-03-31 18:00 [yearly snapshot]", "2026-01-01 12:00 [oldest yearly snapshot]"}},
		{"within: after the span before the newest", Policy{Within: Span{Days: 2}}, []string{
			"2026-03-31 18:00 [within 2d]", "2026-03-31 12:00 [within 2d]", "2026-03-31 08:00 [within 2d]",
			"2026-03-30 12:00 [within 2d]"}},
		{"rules add up, with every reason", Policy{Last: 1, Daily: 2, Monthly: 1}, []string{
			"2026-03-31 18:00 [last snapshot daily snapshot monthly snapshot]", "2026-03-30 12:00 [daily snapshot]"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, kept(t, tc.policy, daily(), time.UTC))
		})
	}

	// Unlimited: one a day, every day; the two earlier ones of March 31 go.
	ds, err := Policy{Daily: Unlimited}.Apply(daily(), time.UTC)
	require.NoError(t, err)
	n := 0
	for _, d := range ds {
		if d.Keep {
			n++
		} else {
			assert.Contains(t, []string{"2026-03-31 08:00", "2026-03-31 12:00"}, d.ID)
		}
	}
	assert.Equal(t, 90, n)
}

// Protected snapshots are kept, and the rules count the others only.
func TestApplyProtected(t *testing.T) {
	snaps := daily()
	for i := range snaps {
		if snaps[i].ID == "2026-03-31 18:00" || snaps[i].ID == "2026-01-15 12:00" {
			snaps[i].Protected = true
		}
	}
	assert.Equal(t, []string{
		"2026-03-31 18:00 [protected]", "2026-03-31 12:00 [last snapshot]", "2026-01-15 12:00 [protected]",
	}, kept(t, Policy{Last: 1}, snaps, time.UTC))
	assert.Equal(t, []string{
		"2026-03-31 18:00 [protected]", "2026-03-31 12:00 [within 5h]", "2026-03-31 08:00 [within 5h]", "2026-01-15 12:00 [protected]",
	}, kept(t, Policy{Within: Span{Hours: 5}}, snaps, time.UTC), "within counts from the newest unprotected snapshot")
}

// Days are the given zone's, weeks ISO 8601 across a year's end.
func TestApplyCalendar(t *testing.T) {
	snaps := []Snapshot{
		{ID: "a", Time: at("2026-03-30 12:00")},
		{ID: "b", Time: at("2026-03-30 23:30")},
		{ID: "c", Time: at("2026-03-31 00:30")},
	}
	assert.Equal(t, []string{"c [daily snapshot]", "b [daily snapshot]"}, kept(t, Policy{Daily: 2}, snaps, time.UTC))
	east := time.FixedZone("UTC+2", 2*3600) // b and c are both on March 31 there
	assert.Equal(t, []string{"c [daily snapshot]", "a [daily snapshot]"}, kept(t, Policy{Daily: 2}, snaps, east))

	// 2026-12-28 (Monday) and 2027-01-01 (Friday) are both in ISO week
	// 53 of 2026; 2027-01-04 starts week 1 of 2027.
	snaps = []Snapshot{
		{ID: "mon", Time: at("2026-12-28 12:00")},
		{ID: "fri", Time: at("2027-01-01 12:00")},
		{ID: "next", Time: at("2027-01-04 12:00")},
		{ID: "old", Time: at("2026-12-20 12:00")},
	}
	assert.Equal(t, []string{"next [weekly snapshot]", "fri [weekly snapshot]"}, kept(t, Policy{Weekly: 2}, snaps, time.UTC))

	// Equal times keep their order; no snapshot at all is no decision.
	ds, err := Policy{Last: 1}.Apply(nil, time.UTC)
	require.NoError(t, err)
	assert.Empty(t, ds)
}

func TestPolicyRefused(t *testing.T) {
	_, err := Policy{}.Apply(daily(), time.UTC)
	require.ErrorIs(t, err, ErrEmpty, "an empty policy would remove everything")
	_, err = Policy{Daily: -2}.Apply(daily(), time.UTC)
	assert.ErrorContains(t, err, "--keep-daily -2")
	assert.Equal(t, "--keep-last 2 --keep-daily unlimited --keep-within 1y6m", Policy{Last: 2, Daily: Unlimited, Within: Span{Years: 1, Months: 6}}.String())
}

func TestParseSpan(t *testing.T) {
	for in, want := range map[string]Span{
		"7d": {Days: 7}, "2w": {Days: 14}, "1y6m": {Years: 1, Months: 6}, "36h": {Hours: 36},
		"1y2m3d4h": {Years: 1, Months: 2, Days: 3, Hours: 4}, " 1d ": {Days: 1},
	} {
		got, err := ParseSpan(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, bad := range []string{"", "d", "7", "7s", "1.5d", "-1d", "99999999999d", "7d x"} {
		_, err := ParseSpan(bad)
		assert.Error(t, err, "%q", bad)
	}
	// A month is a calendar month.
	assert.Equal(t, at("2026-02-28 12:00"), Span{Months: 1}.Before(at("2026-03-28 12:00")))
	assert.Equal(t, at("2026-03-03 12:00"), Span{Months: 1}.Before(at("2026-03-31 12:00")), "February 31 is March 3, as time.AddDate has it")

	var p Policy
	require.NoError(t, json.Unmarshal([]byte(`{"last":2,"within":"1y6m"}`), &p))
	assert.Equal(t, Policy{Last: 2, Within: Span{Years: 1, Months: 6}}, p)
	b, err := json.Marshal(Policy{Daily: 7})
	require.NoError(t, err)
	assert.JSONEq(t, `{"daily":7}`, string(b))
	assert.Error(t, json.Unmarshal([]byte(`{"within":"soon"}`), &p))
}
