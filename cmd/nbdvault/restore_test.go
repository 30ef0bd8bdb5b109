package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/urfave/cli/v2"
)

// --checksum defaults to blake3 and refuses what transfer does not know
// as a usage error that names the values.
func TestChecksumFlag(t *testing.T) {
	var def string
	for _, f := range restoreCommand().Flags {
		if sf, ok := f.(*cli.StringFlag); ok && sf.Name == "checksum" {
			def = sf.Value
		}
	}
	assert.Equal(t, "blake3", def, "--checksum defaults to blake3")
	_, err := parseChecksum(def)
	assert.NoError(t, err)

	for _, bad := range []string{"", "md5", "BLAKE3", "sha-256", "blake3 "} {
		_, err := parseChecksum(bad)
		var ec cli.ExitCoder
		if assert.ErrorAs(t, err, &ec, "%q", bad) {
			assert.Equal(t, exitUsage, ec.ExitCode(), "%q", bad)
			assert.Contains(t, err.Error(), "want blake3", "%q: the error names the values", bad)
		}
	}
}
