package volume

import (
	"crypto/cipher"
	"crypto/rand"
	"errors"

	"golang.org/x/crypto/chacha20poly1305"
)

// In an encrypted repository each volume's write log seals its records'
// data (docs/architecture.md, "The sealed write log, as built"): the data
// becomes a random 24-byte nonce, the ciphertext and a 16-byte tag, under
// the repository's state key, with the volume's name and the record's
// header up to its CRC as associated data, so a record does not open in
// another volume's log, at another sequence number, or with another type,
// offset or length. Header byte 5 says a record is sealed; the CRC covers
// the sealed bytes, so replay, torn tails and damage are found as in a
// plain log, and Pos keeps plaintext lengths.
const (
	recordSealed    = 1 // header byte 5
	logSealOverhead = chacha20poly1305.NonceSizeX + chacha20poly1305.Overhead
)

// logSeal seals and opens one volume's log records.
type logSeal struct {
	aead cipher.AEAD
	name string
}

// newLogSeal returns the sealer of volume name's log under key.
func newLogSeal(key [32]byte, name string) *logSeal {
	aead, err := chacha20poly1305.NewX(key[:])
	if err != nil {
		panic(err) // a 32-byte key cannot fail
	}
	return &logSeal{aead: aead, name: name}
}

func (s *logSeal) aad(hdr []byte) []byte {
	b := make([]byte, 0, 32+len(s.name)+36)
	b = append(b, "nbdvault log v1\x00"...)
	b = append(b, s.name...)
	b = append(b, 0)
	return append(b, hdr[:36]...)
}

// seal returns the sealed form of plain for the record whose header
// (its data length set to the sealed length) is hdr.
func (s *logSeal) seal(hdr, plain []byte) []byte {
	out := make([]byte, chacha20poly1305.NonceSizeX, len(plain)+logSealOverhead)
	_, _ = rand.Read(out)
	return s.aead.Seal(out, out, plain, s.aad(hdr))
}

// open returns the plaintext of a sealed record's data, decrypted in
// place: it is a part of sealed.
func (s *logSeal) open(hdr, sealed []byte) ([]byte, error) {
	if len(sealed) < logSealOverhead {
		return nil, errors.New("sealed data shorter than its nonce and tag")
	}
	n := chacha20poly1305.NonceSizeX
	plain, err := s.aead.Open(sealed[n:n], sealed[:n], sealed[n:], s.aad(hdr))
	if err != nil {
		return nil, errors.New("the record does not open with the repository's state key: damaged, or written by another volume or repository")
	}
	return plain, nil
}
