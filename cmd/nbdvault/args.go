package main

import (
	"strings"

	"github.com/urfave/cli/v2"
)

// flagsFirst moves a command's flags ahead of its positional arguments, so
// that `nbdvault volume create NAME --size 20G` works: urfave/cli v2 stops
// reading flags at the first positional argument. It walks the command
// path in args, then reorders what follows the leaf command; "--" ends the
// flags as usual.
func flagsFirst(app *cli.App, args []string) []string {
	if len(args) < 2 {
		return args
	}
	out := []string{args[0]}
	cmds := app.Commands
	flags := app.Flags
	i := 1
	for i < len(args) {
		c := findCommand(cmds, args[i])
		if c == nil {
			break
		}
		out = append(out, args[i])
		cmds, flags = c.Subcommands, c.Flags
		i++
	}
	var opts, pos []string
	for ; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i:]...)
			break
		}
		if !strings.HasPrefix(a, "-") || a == "-" {
			pos = append(pos, a)
			continue
		}
		opts = append(opts, a)
		name := strings.TrimLeft(a, "-")
		if strings.Contains(name, "=") {
			continue
		}
		if f := findFlag(flags, name); f != nil && takesValue(f) && i+1 < len(args) {
			i++
			opts = append(opts, args[i])
		}
	}
	return append(append(out, opts...), pos...)
}

func findCommand(cmds []*cli.Command, name string) *cli.Command {
	for _, c := range cmds {
		if c.HasName(name) {
			return c
		}
	}
	return nil
}

func findFlag(flags []cli.Flag, name string) cli.Flag {
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				return f
			}
		}
	}
	return nil
}

func takesValue(f cli.Flag) bool {
	if dv, ok := f.(cli.DocGenerationFlag); ok {
		return dv.TakesValue()
	}
	return true
}
