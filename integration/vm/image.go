package vm

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nbdvault/nbdvault/integration/nbdtest"
)

//go:embed init.sh
var initScript []byte

// imageFormat changes whenever the way images are built changes in a way
// the package versions and init.sh do not show, so old cache entries are
// not reused.
const imageFormat = "1"

// kernelMeta is the Debian package that always depends on the current
// kernel; its Depends names the real package (linux-image-6.1.0-NN-amd64).
const kernelMeta = "linux-image-amd64"

// hostPackages are the packages whose files go into the initramfs; their
// versions are part of the cache key. libc6 stands for the shared
// libraries, which change with it far more often than alone.
var hostPackages = []string{"busybox-static", "nbd-client", "mdadm", "lvm2", "dmsetup", "socat", "e2fsprogs", "util-linux", "mount", "libc6"}

// guestTools are the host binaries copied into the guest with their shared
// libraries, by the name they are looked up as, with the package that has
// them for the error message.
var guestTools = []struct{ name, pkg string }{
	{"nbd-client", "nbd-client"},
	{"mdadm", "mdadm"},
	{"lvm", "lvm2"},
	{"dmsetup", "dmsetup"},
	{"socat", "socat"},
	{"mke2fs", "e2fsprogs"},
	{"e2fsck", "e2fsprogs"},
	{"blkid", "util-linux"},
	{"fsfreeze", "util-linux"},
	{"blockdev", "util-linux"},
	{"losetup", "mount"}, // nbdvault mount needs --sizelimit and --show
}

// hostTools are what building and booting need on the host.
var hostTools = []struct{ name, pkg string }{
	{"qemu-system-x86_64", "qemu-system-x86"},
	{"busybox", "busybox-static"},
	{"apt-get", "apt"},
	{"apt-cache", "apt"},
	{"dpkg-deb", "dpkg"},
	{"dpkg-query", "dpkg"},
	{"ldd", "libc-bin"},
}

// Image is what the guest boots: a Debian kernel and an initramfs built
// around it, kept in the cache.
type Image struct {
	Kernel  string // vmlinuz
	Initrd  string // initramfs, an uncompressed newc cpio
	Release string // the kernel's release, e.g. 6.1.0-56-amd64
}

// missingError is a tool or package the host lacks: the test is skipped,
// or failed under NBDVAULT_REQUIRE_TOOLS.
type missingError struct{ msg string }

func (e *missingError) Error() string { return e.msg }

func missing(name, pkg string) error {
	return &missingError{fmt.Sprintf("%s not found: run scripts/vm-deps.sh (or `apt-get install --no-install-recommends %s`)", name, pkg)}
}

var (
	imageOnce sync.Once
	image     Image
	imageErr  error
)

// CacheDir is where images and the kernel package are kept:
// $XDG_CACHE_HOME/nbdvault/vm, else ~/.cache/nbdvault/vm. Outside the
// checkout, so a fresh clone on the same machine reuses them.
func CacheDir() (string, error) {
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("no cache folder: set HOME or XDG_CACHE_HOME: %w", err)
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "nbdvault", "vm"), nil
}

// Prepare returns the image, building it on the first call of a cache
// that lacks it (a minute or so: the kernel package is 70 MB). Later
// calls, and later test runs with the same package versions, reuse it.
func Prepare() (Image, error) {
	imageOnce.Do(func() { image, imageErr = prepare() })
	return image, imageErr
}

func prepare() (Image, error) {
	for _, tool := range hostTools {
		if _, err := nbdtest.LookTool(tool.name); err != nil {
			return Image{}, missing(tool.name, tool.pkg)
		}
	}
	cache, err := CacheDir()
	if err != nil {
		return Image{}, err
	}
	kpkg, kver, err := kernelPackage()
	if err != nil {
		return Image{}, err
	}
	versions, err := packageVersions(hostPackages)
	if err != nil {
		return Image{}, err
	}
	h := sha256.New()
	fmt.Fprintf(h, "format %s\nkernel %s %s\n%s\nmodules %s\n", imageFormat, kpkg, kver, versions, strings.Join(guestModules, " "))
	h.Write(initScript)
	key := hex.EncodeToString(h.Sum(nil))[:16]
	dir := filepath.Join(cache, "image-"+key)
	img, err := readImage(dir)
	if err == nil {
		return img, nil
	}
	deb, err := kernelDeb(cache, kpkg, kver)
	if err != nil {
		return Image{}, err
	}
	return buildImage(cache, dir, deb)
}

// kernelPackage asks apt which kernel package linux-image-amd64 depends on
// now, and its version.
func kernelPackage() (name, version string, err error) {
	out, err := exec.Command("apt-cache", "depends", kernelMeta).CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache depends %s: %v: %s (run `apt-get update`, or scripts/vm-deps.sh)", kernelMeta, err, out)
	}
	m := regexp.MustCompile(`(?m)^\s*Depends:\s*(linux-image-\S+)`).FindSubmatch(out)
	if m == nil {
		return "", "", fmt.Errorf("apt-cache depends %s names no linux-image package:\n%s", kernelMeta, out)
	}
	name = string(m[1])
	out, err = exec.Command("apt-cache", "show", "--no-all-versions", name).CombinedOutput()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache show %s: %v: %s", name, err, out)
	}
	v := regexp.MustCompile(`(?m)^Version:\s*(\S+)`).FindSubmatch(out)
	if v == nil {
		return "", "", fmt.Errorf("apt-cache show %s gives no version", name)
	}
	return name, string(v[1]), nil
}

// packageVersions is "name version" per line for the installed packages,
// or a missingError naming the first that is not installed.
func packageVersions(pkgs []string) (string, error) {
	var lines []string
	for _, p := range pkgs {
		out, err := exec.Command("dpkg-query", "-W", "-f", "${Version}", p).Output()
		if err != nil || len(out) == 0 {
			return "", missing("Debian package "+p, p)
		}
		lines = append(lines, p+" "+string(out))
	}
	return strings.Join(lines, "\n"), nil
}

// kernelDeb returns the kernel package file in the cache, downloading it
// with apt-get download when it is not there.
func kernelDeb(cache, pkg, version string) (string, error) {
	debs := filepath.Join(cache, "debs")
	path := filepath.Join(debs, pkg+"_"+version+".deb")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(debs, ".download-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	// apt drops root to _apt for downloads and warns when _apt cannot
	// write the folder; the folder is ours, so let it.
	_ = os.Chmod(tmp, 0o777)
	cmd := exec.Command("apt-get", "download", pkg+"="+version)
	cmd.Dir = tmp
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download %s=%s: %v: %s (run `apt-get update`, or scripts/vm-deps.sh)", pkg, version, err, out)
	}
	got, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(got) != 1 {
		return "", fmt.Errorf("apt-get download %s=%s left %d .deb files", pkg, version, len(got))
	}
	if err := os.Rename(got[0], path); err != nil {
		return "", err
	}
	return path, nil
}

func readImage(dir string) (Image, error) {
	rel, err := os.ReadFile(filepath.Join(dir, "release"))
	if err != nil {
		return Image{}, err
	}
	img := Image{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.cpio"), Release: strings.TrimSpace(string(rel))}
	for _, f := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return Image{}, err
		}
	}
	return img, nil
}

// buildImage unpacks the kernel package, builds the initramfs, and moves
// both into dir in one rename, so a half-built image is never used.
func buildImage(cache, dir, deb string) (Image, error) {
	start := time.Now()
	work, err := os.MkdirTemp(cache, ".build-")
	if err != nil {
		return Image{}, err
	}
	defer os.RemoveAll(work)
	root := filepath.Join(work, "deb")
	if out, err := exec.Command("dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
		return Image{}, fmt.Errorf("dpkg-deb -x %s: %v: %s", deb, err, out)
	}
	kernels, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		return Image{}, fmt.Errorf("%s holds %d kernels in /boot, want 1", deb, len(kernels))
	}
	release := strings.TrimPrefix(filepath.Base(kernels[0]), "vmlinuz-")
	out := filepath.Join(work, "image")
	if err := os.Mkdir(out, 0o755); err != nil {
		return Image{}, err
	}
	if err := os.Rename(kernels[0], filepath.Join(out, "vmlinuz")); err != nil {
		return Image{}, err
	}
	a := newCPIO()
	if err := addModules(a, filepath.Join(root, "lib", "modules", release), release); err != nil {
		return Image{}, err
	}
	if err := addUserland(a); err != nil {
		return Image{}, err
	}
	var buf bytes.Buffer
	if err := a.writeTo(&buf); err != nil {
		return Image{}, err
	}
	if err := os.WriteFile(filepath.Join(out, "initrd.cpio"), buf.Bytes(), 0o644); err != nil {
		return Image{}, err
	}
	if err := os.WriteFile(filepath.Join(out, "release"), []byte(release+"\n"), 0o644); err != nil {
		return Image{}, err
	}
	if err := os.Rename(out, dir); err != nil {
		// Another test process may have built the same image meanwhile.
		if img, rerr := readImage(dir); rerr == nil {
			return img, nil
		}
		return Image{}, err
	}
	prune(cache, dir, deb)
	fmt.Fprintf(os.Stderr, "vm: built %s (kernel %s, initramfs %d MiB) in %v\n", dir, release, buf.Len()>>20, time.Since(start).Round(time.Millisecond))
	return readImage(dir)
}

// prune removes the images and kernel packages of other versions, which
// no test will use again, so the cache does not grow with each kernel
// update.
func prune(cache, keepImage, keepDeb string) {
	olds, _ := filepath.Glob(filepath.Join(cache, "image-*"))
	debs, _ := filepath.Glob(filepath.Join(cache, "debs", "*.deb"))
	for _, p := range append(olds, debs...) {
		if p != keepImage && p != keepDeb {
			os.RemoveAll(p)
		}
	}
}

// addModules copies the guest's modules and their dependencies, with a
// modules.dep for busybox modprobe.
func addModules(a *cpioArchive, modDir, release string) error {
	deps, paths, err := moduleClosure(modDir, guestModules)
	if err != nil {
		return err
	}
	dst := "usr/lib/modules/" + release
	for name := range deps {
		data, err := os.ReadFile(filepath.Join(modDir, paths[name]))
		if err != nil {
			return err
		}
		a.file(dst+"/"+paths[name], 0o644, data)
	}
	a.file(dst+"/modules.dep", 0o644, []byte(modulesDep(deps, paths)))
	return nil
}

// addUserland adds busybox and its applets, the guest tools with their
// libraries, /init and the few files in /etc the tools want.
//
// The tools come from packages installed on the host, not from unpacked
// .debs: ldd then resolves their libraries with the host's own loader,
// where unpacked .debs would need their whole dependency tree fetched and
// resolved by hand. The host and the guest kernel are both Debian 12, and
// scripts/vm-deps.sh installs the packages without starting their
// services.
func addUserland(a *cpioArchive) error {
	// The guest has the merged-/usr layout whatever the host has.
	for _, d := range []string{"bin", "sbin", "lib", "lib64"} {
		a.symlink(d, "usr/"+d)
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "root", "mnt", "etc", "usr/bin", "usr/sbin", "usr/lib64"} {
		a.dir(d)
	}
	// The kernel opens /dev/console for /init before devtmpfs is mounted.
	a.charDev("dev/console", 0o600, 5, 1)
	a.file("init", 0o755, initScript)

	tools := map[string]bool{}
	for _, tool := range guestTools {
		p, err := nbdtest.LookTool(tool.name)
		if err != nil {
			return missing(tool.name, tool.pkg)
		}
		if err := addBinary(a, p, "usr/sbin/"+tool.name); err != nil {
			return err
		}
		tools[tool.name] = true
	}
	a.symlink("usr/sbin/mkfs.ext4", "mke2fs")
	tools["mkfs.ext4"] = true
	if err := addLVMCommands(a, tools); err != nil {
		return err
	}
	if err := addBusybox(a, tools); err != nil {
		return err
	}
	for _, f := range []string{"/etc/mke2fs.conf"} {
		if data, err := os.ReadFile(f); err == nil {
			a.file(f, 0o644, data)
		}
	}
	a.file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	a.file("etc/group", 0o644, []byte("root:x:0:\ndisk:x:6:\n"))
	a.file("etc/lvm/lvm.conf", 0o644, []byte(lvmConf))
	a.file("etc/mdadm/mdadm.conf", 0o644, []byte("# no udev, no arrays to assemble at boot\nCREATE owner=root group=root mode=0660\nHOMEHOST <ignore>\n"))
	return nil
}

// lvmConf makes LVM work without udev: the guest has none, so device
// nodes are made by libdevmapper and nothing waits for udev events.
const lvmConf = `devices {
	obtain_device_list_from_udev = 0
	external_device_info_source = "none"
}
activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
global {
	use_lvmpolld = 0
}
`

// addBinary copies the host binary src to dst in the guest, with every
// shared library ldd finds for it and the loader.
func addBinary(a *cpioArchive, src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	a.file(dst, 0o755, data)
	libs, err := sharedLibraries(src)
	if err != nil {
		return err
	}
	for _, lib := range libs {
		if a.has(guestPath(lib)) {
			continue
		}
		data, err := os.ReadFile(lib)
		if err != nil {
			return fmt.Errorf("library of %s: %w", src, err)
		}
		a.file(guestPath(lib), 0o755, data)
	}
	return nil
}

// sharedLibraries lists the libraries ldd resolves for bin, the loader
// included.
func sharedLibraries(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %v: %s", bin, err, out)
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0]) // the loader
		case strings.Contains(line, "not found"):
			return nil, fmt.Errorf("ldd %s: %s", bin, strings.TrimSpace(line))
		}
	}
	return libs, nil
}

// guestPath is where a host path goes in the guest's merged-/usr layout:
// /lib/x/libc.so.6 becomes usr/lib/x/libc.so.6.
func guestPath(p string) string {
	p = clean(p)
	top, _, _ := strings.Cut(p, "/")
	switch top {
	case "bin", "sbin", "lib", "lib64":
		return "usr/" + p
	}
	return p
}

// addLVMCommands links lvcreate, vgs, pvcreate… to lvm, as lvm2 does on
// the host: lvm picks the command by the name it was run as.
func addLVMCommands(a *cpioArchive, tools map[string]bool) error {
	lvm, err := nbdtest.LookTool("lvm")
	if err != nil {
		return missing("lvm", "lvm2")
	}
	entries, err := os.ReadDir(filepath.Dir(lvm))
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type()&os.ModeSymlink == 0 {
			continue
		}
		target, err := os.Readlink(filepath.Join(filepath.Dir(lvm), e.Name()))
		if err == nil && filepath.Base(target) == "lvm" && !tools[e.Name()] {
			a.symlink("usr/sbin/"+e.Name(), "lvm")
			tools[e.Name()] = true
		}
	}
	return nil
}

// addBusybox adds the static busybox as /usr/bin/busybox and a link for
// each applet that no real tool above provides.
func addBusybox(a *cpioArchive, tools map[string]bool) error {
	p, err := nbdtest.LookTool("busybox")
	if err != nil {
		return missing("busybox", "busybox-static")
	}
	if f, err := elf.Open(p); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	} else {
		dynamic := f.Section(".interp") != nil
		f.Close()
		if dynamic {
			return &missingError{fmt.Sprintf("%s is not static (package busybox, not busybox-static): run `apt-get install busybox-static`", p)}
		}
	}
	data, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	a.file("usr/bin/busybox", 0o755, data)
	out, err := exec.Command(p, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busybox --list-full: %w", err)
	}
	applets := strings.Fields(string(out))
	sort.Strings(applets)
	for _, ap := range applets {
		name := filepath.Base(ap)
		dst := guestPath(ap)
		if tools[name] || a.has(dst) || name == "busybox" {
			continue
		}
		a.symlink(dst, "/usr/bin/busybox")
	}
	return nil
}

// isMissing reports whether err is a tool or package the host lacks.
func isMissing(err error) bool {
	var m *missingError
	return errors.As(err, &m)
}
