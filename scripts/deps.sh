#!/usr/bin/env bash
# Installs what the tests and benchmarks need, outside the checkout, so a
# fresh clone on the same machine reuses it. Idempotent: fast when all is
# there.
set -euo pipefail

GOBIN=$(go env GOPATH)/bin
export GOBIN
export PATH="$GOBIN:$PATH"

# Pinned versions. MinIO has no tagged Go module: this pseudo-version is a
# release build from the module proxy (integration/miniotest.Version).
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
STATICCHECK_VERSION=v0.8.2
GOLANGCI_LINT_VERSION=v2.15.0
# SeaweedFS, the second S3 server the tests run (integration/seaweedtest.Version).
WEED_VERSION=v0.0.0-20261109003541-7506e5f91cd6

# Debian packages the tests use: mount (full-disk test); the third-party NBD
# clients and servers (libnbd-bin: nbdinfo, nbdcopy, nbdfuse; qemu-utils:
# qemu-img, qemu-io, qemu-nbd; nbdkit; fio); fuse3 and e2fsprogs for
# nbdfuse + mkfs.ext4; b3sum, to check the BLAKE3 that restore prints;
# restic, which make bench compares nbdvault with (integration/nbdbench/restic.go).
APT_PACKAGES=(util-linux libnbd-bin fuse3 e2fsprogs qemu-utils nbdkit fio b3sum restic)

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "deps: installing Debian packages: ${need_apt[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

stamp_dir="${XDG_CACHE_HOME:-$HOME/.cache}/nbdvault"
mkdir -p "$stamp_dir"

# go_install BIN MODULE@VERSION: install unless this version already is.
go_install() {
  local bin=$1 mod=$2 stamp="$stamp_dir/$1.version"
  if [ -x "$GOBIN/$bin" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$mod" ]; then
    return
  fi
  echo "deps: go install $mod (MinIO builds in a few minutes the first time)"
  (cd "$stamp_dir" && GOFLAGS=-mod=mod go install "$mod")
  echo "$mod" >"$stamp"
}

# weed_build: SeaweedFS's go.mod has replace directives, so `go install
# module@version` refuses it. Build its ./weed inside the (read-only) module
# cache instead, where those directives apply.
weed_build() {
  local mod="github.com/seaweedfs/seaweedfs@$WEED_VERSION" stamp="$stamp_dir/weed.version"
  if [ -x "$GOBIN/weed" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$mod" ]; then
    return
  fi
  echo "deps: go build $mod ./weed (SeaweedFS builds in about five minutes the first time)"
  (cd "$stamp_dir" && go mod download "$mod")
  mkdir -p "$GOBIN"
  go build -C "$(go env GOMODCACHE)/$mod" -o "$GOBIN/weed.tmp" ./weed
  mv "$GOBIN/weed.tmp" "$GOBIN/weed"
  echo "$mod" >"$stamp"
}

go_install minio "github.com/minio/minio@$MINIO_VERSION"
weed_build
go_install staticcheck "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION"
# golangci-lint for its depguard: the import graph (.golangci.yml).
go_install golangci-lint "github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$GOLANGCI_LINT_VERSION"

# The VM tests' host packages (QEMU and the guest's tools).
"$(dirname "$0")/vm-deps.sh"
