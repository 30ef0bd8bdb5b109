package chunkstore

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A key object opens with its password only, to the master key it wraps;
// OpenKeys tries each key, and says how many it tried when none opens.
func TestKeyFiles(t *testing.T) {
	ctx := context.Background()
	mem := NewMem()
	master, keyset := NewMasterKey()
	want, err := NewKeys(master, keyset)
	require.NoError(t, err)
	for _, pw := range []string{"first password", "second password"} {
		f, err := WrapKey(master, keyset, []byte(pw), DefaultKDF, "test")
		require.NoError(t, err)
		for _, enc := range []string{base64.StdEncoding.EncodeToString(master), hex.EncodeToString(master), string(master)} {
			assert.NotContains(t, string(f.Marshal()), enc, "the master key is not in the key object")
		}
		require.NoError(t, mem.Put(ctx, KeysPrefix+NewKeyID(), f.Marshal()))
	}
	for _, pw := range []string{"first password", "second password"} {
		k, _, err := OpenKeys(ctx, mem, []byte(pw), "", nil)
		require.NoError(t, err, pw)
		assert.Equal(t, want.Fingerprint(), k.Fingerprint())
		assert.Equal(t, want.Hasher().Sum([]byte("x")), k.Hasher().Sum([]byte("x")))
	}
	_, _, err = OpenKeys(ctx, mem, []byte("wrong"), "", nil)
	require.ErrorIs(t, err, ErrWrongPassword)
	assert.Contains(t, err.Error(), "no key in mem:/keys/ opens with this password (2 tried)")
	// A password that opens a key the config refuses is not "wrong".
	_, _, err = OpenKeys(ctx, mem, []byte("first password"), "", func(*Keys) error { return ErrCorrupt })
	require.NotErrorIs(t, err, ErrWrongPassword)
	assert.ErrorContains(t, err, "the config was changed, or the key was planted")

	// A key that unwraps but that the config's MAC refuses is passed over.
	other, otherSet := NewMasterKey()
	planted, err := WrapKey(other, otherSet, []byte("first password"), DefaultKDF, "planted")
	require.NoError(t, err)
	require.NoError(t, mem.Put(ctx, KeysPrefix+"0000", planted.Marshal()))
	k, id, err := OpenKeys(ctx, mem, []byte("first password"), "", func(k *Keys) error {
		if k.Fingerprint() != want.Fingerprint() {
			return ErrCorrupt
		}
		return nil
	})
	require.NoError(t, err)
	assert.NotEqual(t, "0000", id)
	assert.Equal(t, want.Fingerprint(), k.Fingerprint())
}

// Key objects asking for weak or ruinous Argon2id parameters, or of the
// wrong shape, are refused before any unwrap.
func TestParseKeyFile(t *testing.T) {
	master, keyset := NewMasterKey()
	f, err := WrapKey(master, keyset, []byte("pw"), DefaultKDF, "")
	require.NoError(t, err)
	_, err = ParseKeyFile(f.Marshal())
	require.NoError(t, err)
	for name, change := range map[string]func(*KeyFile){
		"cheap":     func(f *KeyFile) { f.Params.Time, f.Params.MemoryKiB = 1, 8 },
		"ruinous":   func(f *KeyFile) { f.Params.MemoryKiB = 4 << 20 },
		"version":   func(f *KeyFile) { f.Version = 2 },
		"kdf":       func(f *KeyFile) { f.KDF = "scrypt" },
		"salt":      func(f *KeyFile) { f.Salt = f.Salt[:4] },
		"wrapped":   func(f *KeyFile) { f.Wrapped = f.Wrapped[1:] },
		"keyset":    func(f *KeyFile) { f.Keyset = "zz" },
		"no params": func(f *KeyFile) { f.Params = KDF{} },
	} {
		g := *f
		change(&g)
		_, err := ParseKeyFile(g.Marshal())
		assert.Error(t, err, name)
	}
	_, err = WrapKey(master, keyset, []byte("pw"), KDF{Time: 1, MemoryKiB: 1024, Threads: 1}, "")
	assert.Error(t, err, "new keys are not made weak either")
	// The wrap is bound to its keyset.
	g := *f
	g.Keyset = "00000000000000000000000000000000"
	_, err = g.Unwrap([]byte("pw"))
	require.ErrorIs(t, err, ErrWrongPassword)
}

// FuzzKeyFile: whatever a key object holds, parsing it returns an error
// or a key whose parameters are within bounds; nothing panics.
func FuzzKeyFile(f *testing.F) {
	master, keyset := NewMasterKey()
	kf, err := WrapKey(master, keyset, []byte("pw"), DefaultKDF, "")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(kf.Marshal())
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		k, err := ParseKeyFile(data)
		if err != nil {
			return
		}
		if k.Params.check() != nil {
			t.Fatalf("parsed a key with parameters %+v", k.Params)
		}
		if _, err := json.Marshal(k); err != nil {
			t.Fatal(err)
		}
		_ = bytes.Clone(k.Wrapped)
	})
}

// More keys than a start unwraps, planted under IDs that sort first and
// with other parameters, do not hide the real key: keys made with this
// nbdvault's parameters are tried first (review L3).
func TestOpenKeysPlantedFirst(t *testing.T) {
	ctx := context.Background()
	mem := NewMem()
	master, keyset := NewMasterKey()
	cheap := KDF{Time: minKDF.Time, MemoryKiB: minKDF.MemoryKiB, Threads: 1}
	for i := range maxKeysTried + 1 {
		other, otherSet := NewMasterKey()
		f, err := WrapKey(other, otherSet, []byte("planted"), cheap, "")
		require.NoError(t, err)
		require.NoError(t, mem.Put(ctx, KeysPrefix+fmt.Sprintf("%04d", i), f.Marshal()))
	}
	f, err := WrapKey(master, keyset, []byte("right"), DefaultKDF, "")
	require.NoError(t, err)
	require.NoError(t, mem.Put(ctx, KeysPrefix+"ffff", f.Marshal()))
	_, id, err := OpenKeys(ctx, mem, []byte("right"), "", nil)
	require.NoError(t, err)
	assert.Equal(t, "ffff", id)
}
