package chunkstore

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// A stored chunk is a self-describing object:
//
//	offset size  field
//	0      2     magic "NV"
//	2      1     format version (1)
//	3      1     compression (Compression)
//	4      4     plaintext length, little endian
//	8      ...   payload: the plaintext, or its zstd frame
//
// Encryption, when it comes, is a new compression/format value, so old
// objects stay readable.
const (
	headerLen     = 8
	formatVersion = 1
	codecMagic0   = 'N'
	codecMagic1   = 'V'

	// MaxChunkSize bounds a chunk's plaintext, and so what decoding a
	// corrupt or hostile object may allocate.
	MaxChunkSize = 16 << 20
)

// Compression is the codec of a stored chunk's payload.
type Compression byte

const (
	// CompressionNone stores the plaintext as is. The store picks it for any
	// chunk that zstd does not shrink.
	CompressionNone Compression = 0
	// CompressionZstd stores one zstd frame.
	CompressionZstd Compression = 1
)

func (c Compression) String() string {
	switch c {
	case CompressionNone:
		return "none"
	case CompressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("compression(%d)", byte(c))
}

// codec encodes and decodes chunk objects. Its zstd encoder and decoder
// are safe for concurrent use and keep one state per CPU.
type codec struct {
	compress Compression
	enc      *zstd.Encoder
	dec      *zstd.Decoder
}

func newCodec(c Compression, level zstd.EncoderLevel) (*codec, error) {
	if c != CompressionNone && c != CompressionZstd {
		return nil, fmt.Errorf("unknown compression %v", c)
	}
	// Each object is verified against its BLAKE3 ID on read, so zstd's own
	// checksum would only cost time.
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderCRC(false))
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(MaxChunkSize), zstd.WithDecoderConcurrency(0))
	if err != nil {
		return nil, err
	}
	return &codec{compress: c, enc: enc, dec: dec}, nil
}

// bufPool recycles encode buffers: a backend does not keep what Put gives it.
var bufPool = sync.Pool{New: func() any { return new([]byte) }}

// encode returns the object for plain in a buffer from bufPool; the caller
// puts it back when the backend is done with it.
func (c *codec) encode(plain []byte) *[]byte {
	bp := bufPool.Get().(*[]byte)
	need := headerLen + len(plain)
	if cap(*bp) < need {
		*bp = make([]byte, 0, need)
	}
	out := (*bp)[:headerLen]
	out[0], out[1], out[2] = codecMagic0, codecMagic1, formatVersion
	binary.LittleEndian.PutUint32(out[4:], uint32(len(plain)))
	method := CompressionNone
	if c.compress == CompressionZstd {
		out = c.enc.EncodeAll(plain, out)
		method = CompressionZstd
		if len(out) >= need { // zstd did not shrink it: keep it raw
			out = out[:headerLen]
			method = CompressionNone
		}
	}
	if method == CompressionNone {
		out = append(out, plain...)
	}
	out[3] = byte(method)
	*bp = out
	return bp
}

// decode returns the plaintext of obj. Any malformed object is an error
// with a reason; the caller wraps it as a CorruptError.
func (c *codec) decode(obj []byte) ([]byte, error) {
	if len(obj) < headerLen {
		return nil, fmt.Errorf("object of %d bytes is shorter than its header", len(obj))
	}
	if obj[0] != codecMagic0 || obj[1] != codecMagic1 {
		return nil, fmt.Errorf("bad magic %q", obj[:2])
	}
	if obj[2] != formatVersion {
		return nil, fmt.Errorf("unknown format version %d (this nbdvault reads %d)", obj[2], formatVersion)
	}
	n := binary.LittleEndian.Uint32(obj[4:])
	if n > MaxChunkSize {
		return nil, fmt.Errorf("plaintext length %d exceeds the maximum %d", n, MaxChunkSize)
	}
	payload := obj[headerLen:]
	switch Compression(obj[3]) {
	case CompressionNone:
		if uint32(len(payload)) != n {
			return nil, fmt.Errorf("raw payload is %d bytes, header says %d", len(payload), n)
		}
		return payload, nil
	case CompressionZstd:
		plain, err := c.dec.DecodeAll(payload, make([]byte, 0, n))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		if uint32(len(plain)) != n {
			return nil, fmt.Errorf("decompressed to %d bytes, header says %d", len(plain), n)
		}
		return plain, nil
	default:
		return nil, fmt.Errorf("unknown compression %d", obj[3])
	}
}
