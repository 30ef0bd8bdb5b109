package chunkstore

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/chacha20poly1305"
)

// An encrypted repository keeps its master key wrapped by each password
// in an object of its own, keys/ID (JSON): the key-encryption key is
// Argon2id of the password, and the wrap is XChaCha20-Poly1305 with
// "nbdvault key v1" and the keyset ID as associated data. Adding or
// changing a password writes one such object; the data is never touched.

// KeysPrefix is where a repository keeps its key objects.
const KeysPrefix = "keys/"

// KDF are Argon2id's parameters.
type KDF struct {
	Time      uint32 `json:"time"`
	MemoryKiB uint32 `json:"memory_kib"`
	Threads   uint8  `json:"threads"`
}

// DefaultKDF is what new keys are made with: RFC 9106's second
// recommendation (t=3, 64 MiB, p=4), borg 2's values.
var DefaultKDF = KDF{Time: 3, MemoryKiB: 64 << 10, Threads: 4}

// The parameters a key object may ask for: at least OWASP's minimum (so
// a planted key cannot make guessing its password cheap), and at most
// what a start can afford (so a planted key cannot stall one).
var (
	minKDF = KDF{Time: 2, MemoryKiB: 19 << 10, Threads: 1}
	maxKDF = KDF{Time: 10, MemoryKiB: 256 << 10, Threads: 16}
)

// maxKeysTried bounds how many key objects a start unwraps (each costs
// an Argon2id run), and maxKeysRead how many it reads.
const (
	maxKeysTried = 20
	maxKeysRead  = 100
)

// KeyFile is one password's wrap of the master key.
type KeyFile struct {
	Version int       `json:"version"`
	Keyset  string    `json:"keyset"` // hex
	KDF     string    `json:"kdf"`    // "argon2id"
	Params  KDF       `json:"params"`
	Salt    []byte    `json:"salt"`
	Nonce   []byte    `json:"nonce"`
	Wrapped []byte    `json:"wrapped"`
	Created time.Time `json:"created"`
	Host    string    `json:"host,omitempty"`
	Label   string    `json:"label,omitempty"`
}

// ErrWrongPassword is a key that does not open with the password given.
var ErrWrongPassword = errors.New("wrong password")

// NewMasterKey returns a new random master key and keyset ID.
func NewMasterKey() (master []byte, keyset [KeysetSize]byte) {
	master = make([]byte, MasterKeySize)
	_, _ = rand.Read(master)
	_, _ = rand.Read(keyset[:])
	return master, keyset
}

// NewKeyID returns a new key object's ID.
func NewKeyID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func keyAAD(keyset [KeysetSize]byte) []byte {
	return append([]byte("nbdvault key v1\x00"), keyset[:]...)
}

// WrapKey wraps master (of keyset) with password.
func WrapKey(master []byte, keyset [KeysetSize]byte, password []byte, params KDF, label string) (*KeyFile, error) {
	if len(master) != MasterKeySize {
		return nil, fmt.Errorf("master key of %d bytes, want %d", len(master), MasterKeySize)
	}
	if len(password) == 0 {
		return nil, errors.New("an empty password")
	}
	f := &KeyFile{Version: 1, Keyset: hex.EncodeToString(keyset[:]), KDF: "argon2id", Params: params,
		Salt: make([]byte, 16), Nonce: make([]byte, chacha20poly1305.NonceSizeX), Created: time.Now().UTC(), Label: label}
	f.Host, _ = os.Hostname()
	if err := f.Params.check(); err != nil {
		return nil, err
	}
	_, _ = rand.Read(f.Salt)
	_, _ = rand.Read(f.Nonce)
	aead, err := f.aead(password)
	if err != nil {
		return nil, err
	}
	f.Wrapped = aead.Seal(nil, f.Nonce, master, keyAAD(keyset))
	return f, nil
}

func (p KDF) check() error {
	if p.Time < minKDF.Time || p.MemoryKiB < minKDF.MemoryKiB || p.Threads < minKDF.Threads ||
		p.Time > maxKDF.Time || p.MemoryKiB > maxKDF.MemoryKiB || p.Threads > maxKDF.Threads {
		return fmt.Errorf("Argon2id parameters t=%d m=%d KiB p=%d are outside t=%d..%d, m=%d..%d KiB, p=%d..%d",
			p.Time, p.MemoryKiB, p.Threads, minKDF.Time, maxKDF.Time, minKDF.MemoryKiB, maxKDF.MemoryKiB, minKDF.Threads, maxKDF.Threads)
	}
	return nil
}

// aead returns the cipher of the key-encryption key password derives; the
// derived key is cleared (the cipher keeps its own schedule).
func (f *KeyFile) aead(password []byte) (cipher.AEAD, error) {
	kek := argon2.IDKey(password, f.Salt, f.Params.Time, f.Params.MemoryKiB, f.Params.Threads, chacha20poly1305.KeySize)
	defer clear(kek)
	return chacha20poly1305.NewX(kek)
}

// ParseKeyFile decodes and checks a key object (it does not unwrap it).
func ParseKeyFile(data []byte) (*KeyFile, error) {
	var f KeyFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("not a key object: %w", err)
	}
	switch {
	case f.Version != 1:
		return nil, fmt.Errorf("key object version %d (this nbdvault reads 1)", f.Version)
	case f.KDF != "argon2id":
		return nil, fmt.Errorf("key derivation %q (this nbdvault knows argon2id)", f.KDF)
	case len(f.Salt) < 16 || len(f.Salt) > 64:
		return nil, fmt.Errorf("a salt of %d bytes", len(f.Salt))
	case len(f.Nonce) != chacha20poly1305.NonceSizeX:
		return nil, fmt.Errorf("a nonce of %d bytes", len(f.Nonce))
	case len(f.Wrapped) != MasterKeySize+chacha20poly1305.Overhead:
		return nil, fmt.Errorf("a wrapped key of %d bytes", len(f.Wrapped))
	}
	if _, err := f.keyset(); err != nil {
		return nil, err
	}
	if err := f.Params.check(); err != nil {
		return nil, err
	}
	return &f, nil
}

func (f *KeyFile) keyset() ([KeysetSize]byte, error) {
	var ks [KeysetSize]byte
	b, err := hex.DecodeString(f.Keyset)
	if err != nil || len(b) != KeysetSize {
		return ks, fmt.Errorf("keyset %q: want %d hex digits", f.Keyset, 2*KeysetSize)
	}
	return [KeysetSize]byte(b), nil
}

// Unwrap returns the working keys of the master key f wraps, or an error
// matching ErrWrongPassword.
func (f *KeyFile) Unwrap(password []byte) (*Keys, error) {
	ks, err := f.keyset()
	if err != nil {
		return nil, err
	}
	aead, err := f.aead(password)
	if err != nil {
		return nil, err
	}
	master, err := aead.Open(nil, f.Nonce, f.Wrapped, keyAAD(ks))
	if err != nil {
		return nil, ErrWrongPassword
	}
	defer clear(master) // NewKeys keeps its own copy
	return NewKeys(master, ks)
}

// Marshal encodes f as its object.
func (f *KeyFile) Marshal() []byte {
	b, _ := json.MarshalIndent(f, "", "  ")
	return append(b, '\n')
}

// KeyIDs lists the IDs of b's key objects, sorted.
func KeyIDs(ctx context.Context, b Backend) ([]string, error) {
	var ids []string
	err := b.List(ctx, KeysPrefix, func(k string) error {
		ids = append(ids, k[len(KeysPrefix):])
		return nil
	})
	slices.Sort(ids)
	return ids, err
}

// OpenKeys unwraps the master key of the repository b with password. It
// tries the key with ID first (if any; a state folder remembers which key
// worked), then keys made with this nbdvault's parameters, then the
// others: at most maxKeysTried unwraps and maxKeysRead reads, so that keys
// planted in the bucket can slow a start down only so much. check, if
// set, must accept the keys (the config's MAC): a key that unwraps but
// fails it is passed over, and if no key passes, the error says that the
// password is right and the config or keys are not (it does not match
// ErrWrongPassword). It returns the keys and the ID of the key object that
// opened them.
func OpenKeys(ctx context.Context, b Backend, password []byte, first string, check func(*Keys) error) (*Keys, string, error) {
	ids, err := KeyIDs(ctx, b)
	if err != nil {
		return nil, "", fmt.Errorf("list %s%s: %w", b.Location(), "/"+KeysPrefix, err)
	}
	if len(ids) == 0 {
		return nil, "", fmt.Errorf("repository %s has no keys (%s is empty): it is not encrypted, or its keys were deleted", b.Location(), KeysPrefix)
	}
	if i := slices.Index(ids, first); i > 0 {
		ids[0], ids[i] = ids[i], ids[0]
	}
	// Read them (bounded), then order: the remembered one, then those of
	// the default parameters, then the rest.
	type candidate struct {
		id string
		f  *KeyFile
	}
	var cands []candidate
	var problems []string
	for i, id := range ids {
		if i == maxKeysRead {
			problems = append(problems, fmt.Sprintf("%d more keys not read", len(ids)-i))
			break
		}
		data, err := b.Get(ctx, KeysPrefix+id)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, "", fmt.Errorf("read key %s: %w", id, err)
		}
		f, err := ParseKeyFile(data)
		if err != nil {
			problems = append(problems, fmt.Sprintf("key %s: %v", id, err))
			continue
		}
		cands = append(cands, candidate{id, f})
	}
	slices.SortStableFunc(cands, func(x, y candidate) int {
		rank := func(c candidate) int {
			switch {
			case c.id == first:
				return 0
			case c.f.Params == DefaultKDF:
				return 1
			}
			return 2
		}
		return rank(x) - rank(y)
	})
	tried := 0
	var refused []string // keys the password opens that check refuses
	for _, c := range cands {
		if tried == maxKeysTried {
			problems = append(problems, fmt.Sprintf("%d more keys not tried", len(cands)-tried))
			break
		}
		tried++
		k, err := c.f.Unwrap(password)
		if errors.Is(err, ErrWrongPassword) {
			continue
		}
		if err == nil && check != nil {
			if err = check(k); err != nil {
				refused = append(refused, fmt.Sprintf("key %s: %v", c.id, err))
				continue
			}
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("key %s: %v", c.id, err))
			continue
		}
		return k, c.id, nil
	}
	if len(refused) > 0 {
		return nil, "", fmt.Errorf("the password opens a key of %s, but the repository's config does not check with it (%s): the config was changed, or the key was planted; restore the config and keys/ from a copy of the repository",
			b.Location(), strings.Join(refused, "; "))
	}
	msg := fmt.Sprintf("no key in %s/%s opens with this password (%d tried)", b.Location(), KeysPrefix, tried)
	if len(problems) > 0 {
		msg += "; " + strings.Join(problems, "; ")
	}
	return nil, "", fmt.Errorf("%w: %s", ErrWrongPassword, msg)
}
