package chunkstore

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"regexp"

	"lukechampine.com/blake3"
)

// Descriptive objects (volume records, manifests) carry their own
// checksum: the document, then one last line
//
//	nbdvault-sum blake3-256 <64 hex digits>
//
// holding the BLAKE3-256 of "nbdvault-object", the repository's ID and
// the object's key (each followed by a newline), then every byte of the
// document before that line. Binding the sum to the repository and the key
// makes an object copied from another volume or repository, or renamed,
// fail its check like a damaged one. The document stays readable as
// text. The sum finds accidents, not tampering: anyone who can write the
// repository can compute it.
const sumPrefix = "nbdvault-sum blake3-256 "

func objectSum(repoID, key string, doc []byte) [32]byte {
	h := blake3.New(32, nil)
	h.Write([]byte("nbdvault-object\n" + repoID + "\n" + key + "\n"))
	h.Write(doc)
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}

// Checked returns doc, the object at key of the repository with ID
// repoID, followed by its checksum line. doc should end with a newline
// (one is added if not).
func Checked(repoID, key string, doc []byte) []byte {
	out := make([]byte, 0, len(doc)+len(sumPrefix)+66)
	out = append(out, doc...)
	if len(out) == 0 || out[len(out)-1] != '\n' {
		out = append(out, '\n')
	}
	sum := objectSum(repoID, key, out)
	out = append(out, sumPrefix...)
	out = hex.AppendEncode(out, sum[:])
	return append(out, '\n')
}

// Unchecked checks obj, the object at key, against its checksum line and
// returns the document without it. One whose line does not match, or is
// malformed, or is missing when required, is a *KeyError matching
// ErrCorrupt that names key. Without required (a format 1 repository, from
// before checksums), an object without the line is returned as it is,
// with summed false.
func Unchecked(repoID, key string, obj []byte, required bool) (doc []byte, summed bool, err error) {
	corrupt := func(why string) ([]byte, bool, error) {
		return nil, true, &KeyError{Op: "check", Key: key, Err: fmt.Errorf("%w: %s", ErrCorrupt, why)}
	}
	body := bytes.TrimSuffix(obj, []byte("\n"))
	i := bytes.LastIndexByte(body, '\n') + 1
	last := body[i:]
	if !bytes.HasPrefix(last, []byte("nbdvault-sum ")) {
		if required {
			return corrupt("no checksum line at its end: damaged, cut short, or changed by hand")
		}
		return obj, false, nil
	}
	hexSum, ok := bytes.CutPrefix(last, []byte(sumPrefix))
	if !ok || len(hexSum) != 64 || len(obj) != len(body)+1 {
		return corrupt("malformed checksum line")
	}
	var want [32]byte
	if _, err := hex.Decode(want[:], hexSum); err != nil {
		return corrupt("malformed checksum line")
	}
	doc = obj[:i]
	if objectSum(repoID, key, doc) != want {
		return corrupt("checksum mismatch: the object was changed or damaged after it was written, or copied from elsewhere")
	}
	return doc, true, nil
}

// A repository's config is plain JSON whose last member is
//
//	"sum": "<64 hex digits>"
//
// the BLAKE3-256 of "nbdvault-config" and a newline, then the document's
// bytes with those 64 digits as zeros: an nbdvault that reads it without
// knowing of sums still finds its format and refuses a newer one, and
// members a later version adds are covered too.
var configSumRE = regexp.MustCompile(`"sum": "([0-9a-f]{64})"\s*}\s*$`)

const zeroSum = "0000000000000000000000000000000000000000000000000000000000000000"

func configSum(doc []byte) [32]byte {
	h := blake3.New(32, nil)
	h.Write([]byte("nbdvault-config\n"))
	h.Write(doc)
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}

// SumConfig fills in doc's sum member, which must end the document with
// the value zeroSum (SumConfigPlaceholder).
func SumConfig(doc []byte) ([]byte, error) {
	m := configSumRE.FindSubmatchIndex(doc)
	if m == nil || string(doc[m[2]:m[3]]) != zeroSum {
		return nil, fmt.Errorf("config document does not end with a zero sum member")
	}
	sum := configSum(doc)
	out := bytes.Clone(doc)
	hex.Encode(out[m[2]:m[3]], sum[:])
	return out, nil
}

// SumConfigPlaceholder is the sum member's value before SumConfig.
const SumConfigPlaceholder = zeroSum

// CheckConfig checks a config document's sum member. summed is false for
// a document without one (written before sums); a sum that does not match
// is a *KeyError matching ErrCorrupt.
func CheckConfig(key string, doc []byte) (summed bool, err error) {
	m := configSumRE.FindSubmatchIndex(doc)
	if m == nil {
		return false, nil
	}
	var want [32]byte
	if _, err := hex.Decode(want[:], doc[m[2]:m[3]]); err != nil {
		return true, &KeyError{Op: "check", Key: key, Err: fmt.Errorf("%w: malformed sum", ErrCorrupt)}
	}
	zeroed := bytes.Clone(doc)
	copy(zeroed[m[2]:m[3]], zeroSum)
	if configSum(zeroed) != want {
		return true, &KeyError{Op: "check", Key: key, Err: fmt.Errorf("%w: checksum mismatch: the config was changed or damaged after it was written", ErrCorrupt)}
	}
	return true, nil
}
