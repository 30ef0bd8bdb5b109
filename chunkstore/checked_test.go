package chunkstore

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCheckedObjects(t *testing.T) {
	doc := []byte("{\n  \"size\": 16777216\n}\n")
	obj := Checked("r1", "volumes/v/snapshots/x", doc)
	got, summed, err := Unchecked("r1", "volumes/v/snapshots/x", obj, true)
	require.NoError(t, err)
	assert.True(t, summed)
	assert.Equal(t, doc, got)

	// Every single changed byte is found, and the error names the key.
	for i := range obj {
		bad := bytes.Clone(obj)
		bad[i] ^= 0x04
		_, _, err := Unchecked("r1", "volumes/v/snapshots/x", bad, true)
		if !assert.ErrorIs(t, err, ErrCorrupt, "byte %d changed", i) {
			continue
		}
		assert.Contains(t, err.Error(), "volumes/v/snapshots/x")
	}
	// Cut short, or with something after the line.
	for _, bad := range [][]byte{obj[:len(obj)-1], obj[:len(obj)-10], append(bytes.Clone(obj), "x\n"...)} {
		_, _, err := Unchecked("r1", "k", bad, true)
		assert.Error(t, err, "%q", bad)
	}

	// The same bytes under another key, or in another repository, fail.
	for _, where := range [][2]string{{"r1", "volumes/w/snapshots/x"}, {"r2", "volumes/v/snapshots/x"}} {
		_, _, err := Unchecked(where[0], where[1], obj, true)
		assert.ErrorIs(t, err, ErrCorrupt, "%v", where)
	}

	// An object from before checksums is returned as it is where that is
	// allowed (format 1), and refused where not.
	_, _, err = Unchecked("r1", "k", doc, true)
	require.ErrorIs(t, err, ErrCorrupt)
	got, summed, err = Unchecked("r1", "k", doc, false)
	require.NoError(t, err)
	assert.False(t, summed)
	assert.Equal(t, doc, got)
}

func FuzzUnchecked(f *testing.F) {
	f.Add(Checked("r", "k", []byte(`{"a":1}`)))
	f.Add([]byte(`{"a":1}`))
	f.Add([]byte("nbdvault-sum blake3-256 00\n"))
	f.Add([]byte("\n\nnbdvault-sum x\n"))
	f.Fuzz(func(t *testing.T, obj []byte) {
		doc, summed, err := Unchecked("r", "k", obj, true)
		if err != nil || !summed {
			return
		}
		// A document that passed is exactly what Checked would wrap.
		if !bytes.Equal(Checked("r", "k", doc), obj) {
			t.Fatalf("%q passed its check but is not Checked(%q)", obj, doc)
		}
	})
}

func TestConfigSum(t *testing.T) {
	doc := []byte("{\n  \"format\": 2,\n  \"id\": \"abc\",\n  \"sum\": \"" + SumConfigPlaceholder + "\"\n}\n")
	summed, err := SumConfig(doc)
	require.NoError(t, err)
	ok, err := CheckConfig("config", summed)
	require.NoError(t, err)
	assert.True(t, ok)
	for i := range summed {
		bad := bytes.Clone(summed)
		bad[i] ^= 0x04
		ok, err := CheckConfig("config", bad)
		if ok || err != nil {
			assert.ErrorIs(t, err, ErrCorrupt, "byte %d changed", i)
		} else {
			// The change broke the sum member's form: a reader of
			// format 2 requires it.
			assert.NotRegexp(t, configSumRE, string(bad))
		}
	}
	ok, err = CheckConfig("config", []byte(`{"format": 1}`))
	require.NoError(t, err)
	assert.False(t, ok)
}
