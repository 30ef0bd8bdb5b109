package nbdserver

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestParseVerifySubset: n/m and N% are read, anything else is refused
// with a message that says what is wanted.
func TestParseVerifySubset(t *testing.T) {
	for _, c := range []struct {
		in    string
		n, m  int
		width uint64
		pct   bool
	}{
		{in: "1/10", n: 1, m: 10},
		{in: "10/10", n: 10, m: 10},
		{in: "25%", width: 1 << 62, pct: true},
		{in: "50%", width: 1 << 63, pct: true},
		{in: "100%", width: 0, pct: true},                    // all of it
		{in: "10%", width: 1844674407370955162, pct: true},   // 2^64/10, rounded up
		{in: "0.5%", width: 92233720368547759, pct: true},    // 2^64/200, rounded up
		{in: "33.3%", width: 6142765776545280689, pct: true}, // 2^64 × 0.333, rounded up
	} {
		sub, err := parseVerifySubset(c.in)
		require.NoError(t, err, c.in)
		assert.Equal(t, c.n, sub.n, c.in)
		assert.Equal(t, c.m, sub.m, c.in)
		assert.Equal(t, c.width, sub.width, c.in)
		assert.Equal(t, c.pct, sub.pct != "", c.in)
	}
	for in, why := range map[string]string{
		"0%":     "more than 0%",
		"0.0%":   "more than 0%",
		"100.1%": "at most 100%",
		"250%":   "at most 100%",
		"10":     "want N%",
		"%":      "want N%",
		"-5%":    "want N%",
		"ten%":   "want N%",
		"1e2%":   "want N%",
		"0/10":   "want N%",
		"11/10":  "want N%",
		"1/":     "want N%",
		"":       "want N%",
	} {
		_, err := parseVerifySubset(in)
		require.Error(t, err, in)
		assert.Contains(t, err.Error(), why, in)
	}
}
