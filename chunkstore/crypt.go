package chunkstore

import (
	"bytes"
	"context"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/chacha20poly1305"
	"lukechampine.com/blake3"
)

// An encrypted repository (docs/architecture.md, "Encryption at rest, as
// built") seals every object but its config, its keys and its lease with
// XChaCha20-Poly1305 under keys derived from one random master key, and
// names chunks by a MAC of their hash, so that the bucket shows neither
// content nor anything that confirms it.
//
// A sealed unit is a random 24-byte nonce, then the ciphertext and its
// 16-byte tag. Its associated data binds it to its place:
//
//	"nbdvault seal v1\x00" ‖ keyset ID (16) ‖ kind (1) ‖ position (8, LE)
//	‖ count (8, LE) ‖ the object's key
//
// so a unit copied to another object, another kind, another frame of the
// same object, or another repository's keyset does not open.
const (
	// MasterKeySize is the size of a repository's master key.
	MasterKeySize = 32
	// KeysetSize is the size of a keyset ID.
	KeysetSize = 16

	nonceSize    = chacha20poly1305.NonceSizeX
	sealOverhead = nonceSize + chacha20poly1305.Overhead

	// sealedVersion is the codec version of a sealed object: "NV", 3, the
	// kind of unit, then the unit.
	sealedVersion   = 3
	sealedHeaderLen = 4
)

// Kinds of sealed units.
const (
	kindChunk     byte = 1 // a whole chunk object (its version 1 encoding)
	kindTable     byte = 2 // a framed chunk's frame table
	kindFrame     byte = 3 // one frame of a framed chunk
	kindPackFrame byte = 4 // one frame of a pack
	kindFooter    byte = 5 // a pack's footer
	kindObject    byte = 6 // any other object, whole (records, manifests)
)

// Keys are an encrypted repository's working keys, all derived from its
// master key with HKDF-SHA256 (the keyset ID as salt). Safe for
// concurrent use.
type Keys struct {
	master      []byte // kept to wrap it again with another password (Wrap)
	keyset      [KeysetSize]byte
	aead        cipher.AEAD
	id          *MACBLAKE3
	config      [32]byte
	state       [32]byte
	fingerprint [32]byte
}

// NewKeys derives the working keys of master for keyset.
func NewKeys(master []byte, keyset [KeysetSize]byte) (*Keys, error) {
	if len(master) != MasterKeySize {
		return nil, fmt.Errorf("master key of %d bytes, want %d", len(master), MasterKeySize)
	}
	derive := func(purpose string) [32]byte {
		b, err := hkdf.Key(sha256.New, master, keyset[:], "nbdvault 2026-12 "+purpose, 32)
		if err != nil {
			panic(err) // 32 bytes of SHA-256 output cannot fail
		}
		return [32]byte(b)
	}
	k := &Keys{master: bytes.Clone(master), keyset: keyset}
	seal := derive("seal")
	var err error
	if k.aead, err = chacha20poly1305.NewX(seal[:]); err != nil {
		return nil, err
	}
	k.id = &MACBLAKE3{mac: NewKeyedBLAKE3(derive("chunk id"))}
	k.config = derive("config")
	k.state = derive("state")
	k.fingerprint = derive("fingerprint")
	return k, nil
}

// Wrap wraps the master key with password in a new key object.
func (k *Keys) Wrap(password []byte, params KDF, label string) (*KeyFile, error) {
	return WrapKey(k.master, k.keyset, password, params, label)
}

// Keyset returns the keyset ID the keys were derived for.
func (k *Keys) Keyset() [KeysetSize]byte { return k.keyset }

// Hasher returns the chunk ID scheme of the repository: BLAKE3, then a
// MAC of the hash with the ID key.
func (k *Keys) Hasher() Hasher { return k.id }

// Fingerprint names the master key without revealing it: a state folder
// keeps it, so that a repository whose keys open to another master key is
// refused.
func (k *Keys) Fingerprint() string { return hex.EncodeToString(k.fingerprint[:16]) }

// ConfigMAC returns the MAC of a config's security parameters, which
// proves that whoever wrote them held the master key.
func (k *Keys) ConfigMAC(params string) string {
	h := blake3.New(32, k.config[:])
	_, _ = h.Write([]byte("nbdvault config v1\x00" + params))
	return hex.EncodeToString(h.Sum(nil))
}

// StateKey is the key the write log's records are sealed with.
func (k *Keys) StateKey() [32]byte { return k.state }

// aad is the associated data of a unit (see the package's comment).
func (k *Keys) aad(kind byte, key string, pos, count uint64) []byte {
	const label = "nbdvault seal v1\x00"
	b := make([]byte, 0, len(label)+KeysetSize+1+16+len(key))
	b = append(b, label...)
	b = append(b, k.keyset[:]...)
	b = append(b, kind)
	b = binary.LittleEndian.AppendUint64(b, pos)
	b = binary.LittleEndian.AppendUint64(b, count)
	return append(b, key...)
}

// seal appends the unit of plain to dst.
func (k *Keys) seal(dst []byte, kind byte, key string, pos, count uint64, plain []byte) []byte {
	n := len(dst)
	dst = append(dst, make([]byte, nonceSize)...)
	nonce := dst[n:]
	_, _ = rand.Read(nonce) // never fails (crypto/rand)
	return k.aead.Seal(dst, nonce, plain, k.aad(kind, key, pos, count))
}

// open returns the plaintext of unit, in a new slice.
func (k *Keys) open(kind byte, key string, pos, count uint64, unit []byte) ([]byte, error) {
	return k.openTo(nil, kind, key, pos, count, unit)
}

// openInPlace is open, decrypting into unit's own bytes (the caller owns
// unit and uses nothing of it but the plaintext returned): no copy and
// no allocation on the read path.
func (k *Keys) openInPlace(kind byte, key string, pos, count uint64, unit []byte) ([]byte, error) {
	var dst []byte
	if len(unit) >= nonceSize {
		dst = unit[nonceSize:nonceSize] // the ciphertext's own storage
	}
	return k.openTo(dst, kind, key, pos, count, unit)
}

// openTo appends the plaintext of unit to dst.
func (k *Keys) openTo(dst []byte, kind byte, key string, pos, count uint64, unit []byte) ([]byte, error) {
	if len(unit) < sealOverhead {
		return nil, fmt.Errorf("sealed unit of %d bytes is shorter than its nonce and tag", len(unit))
	}
	plain, err := k.aead.Open(dst, unit[:nonceSize], unit[nonceSize:], k.aad(kind, key, pos, count))
	if err != nil {
		return nil, errors.New("it does not open with this repository's key: damaged, or written elsewhere (another object, place or repository)")
	}
	return plain, nil
}

// sealObject appends the sealed object ("NV", 3, kind, unit) of plain.
func (k *Keys) sealObject(dst []byte, kind byte, key string, pos uint64, plain []byte) []byte {
	dst = append(dst, codecMagic0, codecMagic1, sealedVersion, kind)
	return k.seal(dst, kind, key, pos, 0, plain)
}

// openObject opens a sealed object of kind, in place (openInPlace).
func (k *Keys) openObject(kind byte, key string, pos uint64, obj []byte) ([]byte, error) {
	if err := sealedHeader(obj, kind); err != nil {
		return nil, err
	}
	return k.openInPlace(kind, key, pos, 0, obj[sealedHeaderLen:])
}

// LooksSealed reports whether obj is, by its header, an encrypted
// repository's object: a sealed unit or a sealed framed chunk. (Packs end
// with their sealed footer instead.)
func LooksSealed(obj []byte) bool {
	return isSealed(obj) || (len(obj) >= 3 && obj[0] == codecMagic0 && obj[1] == codecMagic1 && obj[2] == framedSealedVersion)
}

// SealedAsItShould reports whether obj, the object at key of an encrypted
// repository, is sealed as that kind of object is: the config, keys and
// lease not at all, chunks as sealed chunk objects, journal packs with a
// sealed footer, everything else whole (kind 6). For tests and checks.
func SealedAsItShould(key string, obj []byte) bool {
	switch {
	case SealsWhole(key):
		return isSealed(obj) && obj[3] == kindObject
	case strings.HasPrefix(key, "chunks/"):
		return LooksSealed(obj) && (obj[2] == framedSealedVersion || obj[3] == kindChunk)
	case strings.HasPrefix(key, "volumes/"): // a journal pack
		return sealedPack(obj) && isSealed(obj) && obj[3] == kindPackFrame
	}
	return true // the config, keys and the lease: read before the keys
}

// sealedPack reports whether pack ends with a sealed footer.
func sealedPack(pack []byte) bool {
	if len(pack) < packTrailerLen+len(packSealedMagic) {
		return false
	}
	n := int(binary.LittleEndian.Uint32(pack[len(pack)-packTrailerLen:]))
	start := len(pack) - packTrailerLen - n
	return n >= len(packSealedMagic) && start >= 0 && string(pack[start:start+len(packSealedMagic)]) == packSealedMagic
}

// isSealed reports whether obj starts as a sealed object does.
func isSealed(obj []byte) bool {
	return len(obj) >= 3 && obj[0] == codecMagic0 && obj[1] == codecMagic1 && obj[2] == sealedVersion
}

// sealedHeader checks obj's header: a sealed object of kind.
func sealedHeader(obj []byte, kind byte) error {
	switch {
	case len(obj) < sealedHeaderLen:
		return fmt.Errorf("object of %d bytes is shorter than a sealed header", len(obj))
	case obj[0] != codecMagic0 || obj[1] != codecMagic1:
		return fmt.Errorf("bad magic %q", obj[:2])
	case obj[2] != sealedVersion:
		return fmt.Errorf("not sealed (format version %d), in an encrypted repository: written by someone without its key", obj[2])
	case obj[3] != kind:
		return fmt.Errorf("a sealed unit of kind %d where one of kind %d belongs", obj[3], kind)
	}
	return nil
}

// errNoKey is the reason given for a sealed object read without keys.
const errNoKey = "it is encrypted, and the repository was opened without its key"

// MACBLAKE3 is the chunk ID scheme of an encrypted repository:
// keyed-BLAKE3(ID key, BLAKE3(plaintext)). Equal plaintext has one ID, so
// chunks dedup as in a plain repository; an ID reveals nothing to whoever
// reads the bucket; and the inner hash is what a client computes without
// the key, so the server can compare a client's hashes with its chunks
// (client push) without handing out the key.
type MACBLAKE3 struct{ mac *KeyedBLAKE3 }

func (m *MACBLAKE3) Sum(data []byte) ID { return m.MAC(blake3.Sum256(data)) }

// MAC returns the ID of a plaintext whose BLAKE3-256 is sum.
func (m *MACBLAKE3) MAC(sum [32]byte) ID { return m.mac.Sum(sum[:]) }

func (m *MACBLAKE3) Scheme() string { return "blake3-256-mac" }

// finishRoot turns the root of a chunk's BLAKE3 tree into its ID under h.
func finishRoot(h Hasher, root ID) ID {
	if m, ok := h.(*MACBLAKE3); ok {
		return m.MAC(root)
	}
	return root
}

// Sealed is a Backend that seals every object it stores whole, and opens
// every object it reads, except those a Store seals itself (chunks, and
// journal packs, read by ranges) and those read before the keys are known
// (the config, keys/ and locks/). docs/architecture.md, "Encryption at
// rest, as built".
type Sealed struct {
	next Backend
	keys *Keys
}

// NewSealed returns b with whole objects sealed under keys.
func NewSealed(b Backend, keys *Keys) *Sealed { return &Sealed{next: b, keys: keys} }

// SealsWhole reports whether an encrypted repository's object at key is
// sealed whole by Sealed (true) or not at all or unit by unit by a Store.
func SealsWhole(key string) bool {
	switch {
	case key == "config", strings.HasPrefix(key, "keys/"), strings.HasPrefix(key, "locks/"),
		strings.HasPrefix(key, "chunks/"):
		return false
	case strings.HasPrefix(key, "volumes/"):
		parts := strings.Split(key, "/") // volumes/VOL/journal/PACK
		return !(len(parts) == 4 && parts[2] == "journal")
	}
	return true
}

func (s *Sealed) Put(ctx context.Context, key string, data []byte) error {
	if !SealsWhole(key) {
		// What a store seals itself must come sealed: a new kind of
		// object written here in plaintext would go out as it is.
		if (strings.HasPrefix(key, "chunks/") && !LooksSealed(data)) || (strings.HasPrefix(key, "volumes/") && !sealedPack(data)) {
			return &KeyError{Op: "put", Key: key, Err: errors.New("refused: not sealed, in an encrypted repository (a bug: every object there is sealed)")}
		}
		return s.next.Put(ctx, key, data)
	}
	obj := s.keys.sealObject(make([]byte, 0, sealedHeaderLen+sealOverhead+len(data)), kindObject, key, 0, data)
	return s.next.Put(ctx, key, obj)
}

func (s *Sealed) Get(ctx context.Context, key string) ([]byte, error) {
	obj, err := s.next.Get(ctx, key)
	if err != nil || !SealsWhole(key) {
		return obj, err
	}
	plain, err := s.keys.openObject(kindObject, key, 0, obj)
	if err != nil {
		return nil, &KeyError{Op: "open", Key: key, Err: fmt.Errorf("%w: %s", ErrCorrupt, err.Error())}
	}
	return plain, nil
}

func (s *Sealed) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	if SealsWhole(key) {
		return nil, &KeyError{Op: "get range", Key: key, Err: errors.New("an object sealed whole is read whole")}
	}
	return s.next.GetRange(ctx, key, off, n)
}

func (s *Sealed) Has(ctx context.Context, key string) (bool, error) { return s.next.Has(ctx, key) }
func (s *Sealed) Delete(ctx context.Context, key string) error      { return s.next.Delete(ctx, key) }
func (s *Sealed) DeleteMany(ctx context.Context, keys []string) error {
	return s.next.DeleteMany(ctx, keys)
}
func (s *Sealed) List(ctx context.Context, prefix string, fn func(string) error) error {
	return s.next.List(ctx, prefix, fn)
}
func (s *Sealed) ListSizes(ctx context.Context, prefix string, fn func(string, int64) error) error {
	return s.next.ListSizes(ctx, prefix, fn)
}
func (s *Sealed) Location() string { return s.next.Location() }

// Keys returns the keys s seals with: a Store over s takes them too.
func (s *Sealed) Keys() *Keys     { return s.keys }
func (s *Sealed) Unwrap() Backend { return s.next }
