package chunkstore

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"

	"lukechampine.com/blake3"
)

// ID names a chunk: the 256-bit hash of its plaintext. The zero ID is never
// the hash of anything stored; it names a hole (a chunk of zeros).
type ID [32]byte

// ZeroID names a hole: an all-zero chunk, which is never stored.
var ZeroID ID

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// IsZero reports whether id names a hole.
func (id ID) IsZero() bool { return id == ZeroID }

// Compare orders IDs by their bytes, as slices.SortFunc takes it.
func (id ID) Compare(o ID) int { return bytes.Compare(id[:], o[:]) }

// MarshalText encodes id as 64 lowercase hex digits.
func (id ID) MarshalText() ([]byte, error) {
	out := make([]byte, hex.EncodedLen(len(id)))
	hex.Encode(out, id[:])
	return out, nil
}

// UnmarshalText parses 64 hex digits.
func (id *ID) UnmarshalText(text []byte) error {
	parsed, err := ParseID(string(text))
	if err != nil {
		return err
	}
	*id = parsed
	return nil
}

// ParseID parses the 64 hex digits of an ID.
func ParseID(s string) (ID, error) {
	var id ID
	if hex.DecodedLen(len(s)) != len(id) {
		return id, fmt.Errorf("chunk ID %q: want %d hex digits, got %d", s, 2*len(id), len(s))
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("chunk ID %q: %w", s, err)
	}
	return id, nil
}

// Hasher computes chunk IDs. Implementations are safe for concurrent use.
type Hasher interface {
	// Sum returns the ID of data.
	Sum(data []byte) ID
	// Scheme names the hash in the repository config, e.g. "blake3-256".
	Scheme() string
}

// BLAKE3 is the default Hasher: unkeyed BLAKE3 with a 256-bit output.
type BLAKE3 struct{}

func (BLAKE3) Sum(data []byte) ID { return blake3.Sum256(data) }
func (BLAKE3) Scheme() string     { return "blake3-256" }

// KeyedBLAKE3 hashes with a secret key (BLAKE3's keyed mode), so IDs reveal
// nothing about the plaintext to whoever can list the repository. It is what
// an encrypted repository will use.
type KeyedBLAKE3 struct {
	key   [32]byte
	words [8]uint32 // key as BLAKE3's tree takes it (tree.go)
}

// NewKeyedBLAKE3 returns a keyed hasher.
func NewKeyedBLAKE3(key [32]byte) *KeyedBLAKE3 {
	k := &KeyedBLAKE3{key: key}
	for i := range k.words {
		k.words[i] = binary.LittleEndian.Uint32(key[4*i:])
	}
	return k
}

func (k *KeyedBLAKE3) Sum(data []byte) ID {
	h := blake3.New(len(ID{}), k.key[:])
	_, _ = h.Write(data)
	var id ID
	h.Sum(id[:0])
	return id
}

func (k *KeyedBLAKE3) Scheme() string { return "blake3-256-keyed" }
