package main

import (
	"errors"
	"fmt"
	"os/exec"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/urfave/cli/v2"

	"github.com/nbdvault/nbdvault/client/mirror"
	"github.com/nbdvault/nbdvault/client/mount"
	"github.com/nbdvault/nbdvault/client/transfer"
	"github.com/nbdvault/nbdvault/nbdserver/api"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"1": 1, "512": 512, "4K": 4 << 10, "4k": 4 << 10, "20G": 20 << 30, "20GiB": 20 << 30,
		"20gb": 20 << 30, "1M": 1 << 20, "64T": 64 << 40, "1P": 1 << 50, " 3G ": 3 << 30,
	} {
		got, err := parseSize(in)
		if assert.NoError(t, err, in) {
			assert.Equal(t, want, got, in)
		}
	}
	for _, bad := range []string{"", "0", "-1", "12Q", "1.5G", "G", "9999999P", "1e9", "0x10"} {
		_, err := parseSize(bad)
		var ec cli.ExitCoder
		if assert.ErrorAs(t, err, &ec, "%q", bad) {
			assert.Equal(t, exitUsage, ec.ExitCode(), "%q", bad)
		}
	}
}

func TestFlagsFirst(t *testing.T) {
	app := newApp()
	for _, c := range []struct{ in, want []string }{
		{[]string{"nbdvault", "volume", "create", "db", "--size", "20G"}, []string{"nbdvault", "volume", "create", "--size", "20G", "db"}},
		{[]string{"nbdvault", "volume", "create", "db", "--size=20G", "--json"}, []string{"nbdvault", "volume", "create", "--size=20G", "--json", "db"}},
		{[]string{"nbdvault", "snapshot", "create", "db", "--wait", "--label", "x"}, []string{"nbdvault", "snapshot", "create", "--wait", "--label", "x", "db"}},
		{[]string{"nbdvault", "restore", "db@x", "--to", "-", "--force"}, []string{"nbdvault", "restore", "--to", "-", "--force", "db@x"}},
		{[]string{"nbdvault", "volume", "delete", "--", "-odd"}, []string{"nbdvault", "volume", "delete", "--", "-odd"}},
		{[]string{"nbdvault", "serve"}, []string{"nbdvault", "serve"}},
		{[]string{"nbdvault"}, []string{"nbdvault"}},
	} {
		assert.Equal(t, c.want, flagsFirst(app, c.in), "%q", c.in)
	}
}

func TestExitCode(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{nil, exitOK},
		{errors.New("boom"), exitFailure},
		{usageErrorf("bad"), exitUsage},
		{api.Errorf(api.ErrNotFound, "no"), exitNotFound},
		{fmt.Errorf("wrapped: %w", api.Errorf(api.ErrUnauthorized, "no")), exitAuth},
		{fmt.Errorf("%w at x", api.ErrUnreachable), exitUnreachable},
		{api.Errorf(api.ErrExists, "dup"), exitConflict},
		{api.Errorf(api.ErrNotSealed, "wait"), exitConflict},
		{api.Errorf(api.ErrInvalid, "bad"), exitUsage},
		{api.Errorf(api.ErrInternal, "oops"), exitFailure},
		{fmt.Errorf("mount: %w", &exec.ExitError{}), exitFailure},
		{fmt.Errorf("/x: %w", transfer.ErrExists), exitConflict},
		{fmt.Errorf("/x: %w", mount.ErrMountPoint), exitConflict},
		{fmt.Errorf("/x: %w", mount.ErrClaimed), exitConflict},
		{fmt.Errorf("/x: %w", mount.ErrNoDir), exitUsage},
		{fmt.Errorf("/x: %w", transfer.ErrNotFileOrDevice), exitUsage},
		{fmt.Errorf("vg: %w", mirror.ErrInvalid), exitUsage},
	} {
		assert.Equal(t, c.want, exitCode(c.err), "%v", c.err)
	}
}
