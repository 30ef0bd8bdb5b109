package vm

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"path/filepath"
	"sort"
	"strings"
)

// guestModules are the kernel modules the guest gets, by name; their
// dependencies come along. virtio_* run the machine (Debian builds them
// as modules); nbd, raid1, dm-raid (LVM raid1) and the dm targets LVM
// uses for mirrors and snapshots are what the scenarios test; ext4 and
// loop for file systems on top.
var guestModules = []string{
	"virtio_pci", "virtio_blk", "virtio_console",
	"nbd", "raid1", "dm-mod", "dm-raid", "dm-mirror", "dm-snapshot", "dm-zero",
	"ext4", "loop", "crc32c_generic",
}

// modName is a module's canonical name: the kernel treats - and _ alike.
func modName(s string) string {
	return strings.ReplaceAll(strings.TrimSuffix(filepath.Base(s), ".ko"), "-", "_")
}

// kernelModules indexes the .ko files under modDir (lib/modules/RELEASE
// of an unpacked linux-image package) by module name, as paths relative
// to modDir.
func kernelModules(modDir string) (map[string]string, error) {
	mods := map[string]string{}
	err := filepath.WalkDir(filepath.Join(modDir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			rel, _ := filepath.Rel(modDir, p)
			mods[modName(p)] = rel
		}
		return nil
	})
	return mods, err
}

// moduleDepends reads the depends= field of a module's .modinfo section:
// the modules whose symbols it uses, what depmod writes into modules.dep.
// The linux-image package ships no modules.dep (its postinst runs depmod),
// so we read the field ourselves.
func moduleDepends(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("%s: no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	for _, field := range bytes.Split(data, []byte{0}) {
		if v, ok := bytes.CutPrefix(field, []byte("depends=")); ok {
			if len(v) == 0 {
				return nil, nil
			}
			return strings.Split(string(v), ","), nil
		}
	}
	return nil, nil
}

// moduleClosure returns the modules wanted and everything they depend on,
// with each one's direct dependencies, as modules.dep lines want them.
func moduleClosure(modDir string, wanted []string) (map[string][]string, map[string]string, error) {
	all, err := kernelModules(modDir)
	if err != nil {
		return nil, nil, err
	}
	deps := map[string][]string{}
	var visit func(name string) error
	visit = func(name string) error {
		name = modName(name)
		if _, done := deps[name]; done {
			return nil
		}
		rel, ok := all[name]
		if !ok {
			return fmt.Errorf("kernel module %s is not in %s", name, modDir)
		}
		d, err := moduleDepends(filepath.Join(modDir, rel))
		if err != nil {
			return err
		}
		deps[name] = d
		for _, dep := range d {
			if err := visit(dep); err != nil {
				return err
			}
		}
		return nil
	}
	for _, w := range wanted {
		if err := visit(w); err != nil {
			return nil, nil, err
		}
	}
	return deps, all, nil
}

// modulesDep renders a modules.dep for the modules in deps: each module's
// path, then the paths of everything it needs, nearest first, which is
// the order busybox modprobe loads them in reverse.
func modulesDep(deps map[string][]string, paths map[string]string) string {
	names := make([]string, 0, len(deps))
	for n := range deps {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		b.WriteString(paths[n] + ":")
		for _, d := range transitive(n, deps) {
			b.WriteString(" " + paths[d])
		}
		b.WriteString("\n")
	}
	return b.String()
}

// transitive lists every module name needs, each after all that depend on
// it (so loading the list backwards works), as depmod does.
func transitive(name string, deps map[string][]string) []string {
	var order []string
	seen := map[string]bool{}
	var visit func(n string)
	visit = func(n string) {
		for _, d := range deps[n] {
			d = modName(d)
			if seen[d] {
				continue
			}
			seen[d] = true
			visit(d)
			order = append(order, d)
		}
	}
	visit(name)
	// visit appended dependencies before their dependents; modules.dep
	// lists dependents first.
	for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
		order[i], order[j] = order[j], order[i]
	}
	return order
}
