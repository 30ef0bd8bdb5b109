#!/usr/bin/env bash
# make bench: every benchmark in one run, results printed and kept in
# bench-results/ (not committed). docs/benchmarks.md quotes such runs.
# Needs root (the page cache is dropped before timed phases). For a quicker
# run, not for quoting: VOLUME_ARGS='-bench-mib 256 -bench-rewrite-mib 4096'
# RUNTIME=5 SIZE_MIB=256 BENCHTIME=1s RESTIC=0 make bench.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$(go env GOPATH)/bin:$PATH"
export NBDVAULT_REQUIRE_TOOLS=1
out=bench-results
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)

echo "== chunkstore: hash, zstd, Put and Get of 1 MiB chunks (local and MinIO)"
go test -run '^$' -bench . -benchtime "${BENCHTIME:-3s}" ./chunkstore/ | tee "$out/chunkstore-$stamp.txt"

echo "== volume: seal, cold and warm reads of a sealed snapshot, a 1% rewrite of 64 GiB, scattered writes"
# shellcheck disable=SC2086 # VOLUME_ARGS is split into flags on purpose
go test -run '^$' -bench 'SealIngest|SnapshotRead|Rewrite|ScatteredWrites' -benchtime 1x -timeout 2h ./nbdserver/volume/ \
  -args ${VOLUME_ARGS:--bench-mib 1024 -bench-rewrite-mib 65536 -bench-scattered-mib 1024 -bench-scattered-time 3m -bench-drop-caches} |
  tee "$out/volume-$stamp.txt"

echo "== verify: a structure verify of 100,000 chunks on MinIO (requests by kind, peak heap)"
go test -run '^$' -bench BenchmarkVerify -benchtime 1x -timeout 30m ./nbdserver/volume/ | tee "$out/verify-$stamp.txt"
echo "== prune: 10,000 snapshots to --keep-last 10 on MinIO"
go test -run '^$' -bench BenchmarkPrune -benchtime 1x ./nbdserver/volume/ | tee "$out/prune-$stamp.txt"
echo "== gc: a collection over 100,000 chunks on MinIO, half unreferenced (requests by kind, peak heap)"
go test -run '^$' -bench BenchmarkGC -benchtime 1x -timeout 30m ./nbdserver/volume/ | tee "$out/gc-$stamp.txt"

echo "== NBD: nbdvault serve next to qemu-nbd and nbdkit (nbdcopy, fio)"
bench/nbd.sh | tee "$out/nbd-$stamp.md"

if [ "${RESTIC:-1}" != 0 ]; then
  echo "== ingest, restore and a scattered change of a 2 GiB ext4 image next to restic, through the same MinIO"
  go run ./integration/nbdbench | tee "$out/restic-$stamp.md"
fi
echo "results in $out/*-$stamp.*"
