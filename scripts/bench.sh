#!/usr/bin/env bash
# make bench: every benchmark in one run, results printed and kept in
# bench-results/ (not committed). docs/benchmarks.md quotes one such run.
# NBDBENCH_FLAGS passes flags to integration/nbdbench, for example
# NBDBENCH_FLAGS='-rewrite-size-mib 1024 -runtime 5s' for a quicker run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$(go env GOPATH)/bin:$PATH"
export NBDVAULT_REQUIRE_TOOLS=1
out=bench-results
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)

echo "== chunkstore: hash, zstd, Put and Get of 1 MiB chunks (local and MinIO)"
go test -run '^$' -bench . -benchtime "${BENCHTIME:-3s}" ./chunkstore/ | tee "$out/chunkstore-$stamp.txt"
echo "results in $out/chunkstore-$stamp.txt"

echo "== NBD: nbdvault's server and a volume next to qemu-nbd and nbdkit (nbdcopy, fio);"
echo "   snapshot, seal and sealed reads of the volume; snapshot cost of a 64 GiB volume after a 1% rewrite;"
echo "   ingest, restore and a scattered change of a 2 GiB ext4 image next to restic, through the same MinIO"
# shellcheck disable=SC2086 # NBDBENCH_FLAGS is split into flags on purpose
go run ./integration/nbdbench ${NBDBENCH_FLAGS:-} | tee "$out/nbd-$stamp.md"
echo "results in $out/nbd-$stamp.md"
