#!/usr/bin/env bash
# bench/nbd.sh: a volume served by the real `nbdvault serve` (bin/nbdvault,
# `make build`; local repository in its data folder, server defaults) next
# to qemu-nbd and nbdkit's file plugin on a sparse raw file, all on Unix
# sockets in one work directory, with the same clients:
#
#   seqwrite   nbdcopy SRC URI     1 GiB of random data, one pass (nbdcopy's
#                                   defaults: 256 KiB requests, 64 in flight)
#   seqread    nbdcopy URI null:
#   fio*       bench/nbd.fio: 1 MiB sequential writes, 4 KiB random writes,
#              4 KiB random reads, iodepth 32, ioengine=nbd, $RUNTIME s each
#
# Hygiene, before every phase: the volume is brought to rest (`snapshot
# create --wait`: the open layer sealed, an empty write log, an idle
# uploader; its reads then come from the repository); the page cache is
# written back and dropped, then $SETTLE s of waiting. The wait is for VMs
# with free page reporting (a virtio balloon, as on the project's machine):
# the guest hands freed memory back to the host about 2 s after the drop,
# and the next touch of such a page is slow; phases started right after it
# ran at random speeds (one 1 GiB nbdcopy read from nbdkit: 0.5 to 2.6 s),
# after 6 s or more they took the same time every run. After seqwrite and
# seqread the export is read back and compared with the source (untimed).
#
# Prints a markdown table with the ratios, and the servers' CPU. Needs
# root (drop_caches). Environment: SIZE_MIB (1024), RUNTIME (20), SETTLE
# (10), SERVERS ("nbdvault qemu-nbd nbdkit"), BENCH_DIR (/tmp).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/../bin/nbdvault
size_mib=${SIZE_MIB:-1024} runtime=${RUNTIME:-20} settle=${SETTLE:-10}
servers=${SERVERS:-nbdvault qemu-nbd nbdkit}
phases="seqwrite seqread fioseqwrite randwrite randread"

for t in nbdcopy fio qemu-nbd nbdkit "$bin"; do
  command -v "$t" >/dev/null || { echo "bench/nbd.sh: $t is missing (make deps build)" >&2; exit 1; }
done
[ -w /proc/sys/vm/drop_caches ] || { echo "bench/nbd.sh: needs root to drop the page cache" >&2; exit 1; }
work=$(mktemp -d "${BENCH_DIR:-/tmp}/nbdbench.XXXXXX")
pid=
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# The source, a raw file per server, and the volume's write log (up to its
# 8 GiB limit in the fio write phases) and repository.
need=$(( (size_mib * 6 + 12 * 1024) * 1024 ))
free=$(df -Pk "$work" | awk 'NR == 2 { print $4 }')
[ "$free" -ge "$need" ] || { echo "bench/nbd.sh: $work has $((free >> 20)) GiB free, needs $((need >> 20))" >&2; exit 1; }

src=$work/source.raw
head -c "${size_mib}M" /dev/urandom >"$src"
bytes=$((size_mib << 20))

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep "$settle"; }
now() { date +%s.%N; }
cpu() { awk '{ print ($14 + $15) / 100 }' "/proc/$pid/stat"; } # utime + stime, in s
calc() { awk "BEGIN { printf \"%.${2:-0}f\", $1 }"; }

# start SERVER: a fresh target, the server on $sock; sets pid and uri.
start() {
  local sock=$work/$1.sock log=$work/$1.log
  uri="nbd+unix:///bench?socket=$sock"
  case $1 in
  nbdvault)
    "$bin" serve --data "$work/nbdvault" --listen "unix:$sock" --admin 127.0.0.1:0 >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do grep -q 'msg=serving' "$log" && break; sleep 0.1; done
    export NBDVAULT_DATA=$work/nbdvault
    NBDVAULT_SERVER=http://$(grep -o 'admin=[0-9.:]*' "$log" | cut -d= -f2) || { cat "$log" >&2; exit 1; }
    export NBDVAULT_SERVER
    "$bin" volume create bench --size "${size_mib}M" >/dev/null ;;
  qemu-nbd)
    truncate -s "${size_mib}M" "$work/target.raw"
    qemu-nbd --socket="$sock" --format=raw --export-name=bench --shared=0 --persistent "$work/target.raw" >"$log" 2>&1 &
    pid=$! ;;
  nbdkit) # serves its file under any export name
    truncate -s "${size_mib}M" "$work/target.raw"
    nbdkit --foreground --unix "$sock" file "$work/target.raw" >"$log" 2>&1 &
    pid=$! ;;
  esac
  for _ in $(seq 100); do [ -S "$sock" ] && return; sleep 0.1; done
  echo "bench/nbd.sh: $1 did not start: $(cat "$log")" >&2; exit 1
}

stop() { kill "$pid"; wait "$pid" || true; pid=; rm -rf "$work/target.raw" "$work/nbdvault"; }

# phase SERVER NAME: rest, drop, run the phase; sets result[SERVER.NAME]
# (MB/s or IOPS) and cpu_per[SERVER.NAME] (server CPU, s per GiB or µs per I/O).
declare -A result cpu_per
phase() {
  [ "$1" != nbdvault ] || "$bin" snapshot create bench --wait >/dev/null
  drop
  local c0 t0 c1 t1 out
  c0=$(cpu) t0=$(now)
  case $2 in
  seqwrite) nbdcopy "$src" "$uri" ;;
  seqread) nbdcopy "$uri" null: ;;
  *) out=$(URI=$uri RUNTIME=$runtime fio --section="${2#fio}" --output-format=terse "$here/nbd.fio" | grep '^3;') ;;
  esac
  t1=$(now) c1=$(cpu)
  case $2 in
  seq*)
    nbdcopy "$uri" - | cmp - "$src" # untimed: reads back equal to the source
    result[$1.$2]=$(calc "$bytes / 1e6 / ($t1 - $t0)")
    cpu_per[$1.$2]=$(calc "($c1 - $c0) / ($bytes / 2^30)" 2) ;;
  fioseqwrite) # terse v3: write KiB, KiB/s at fields 47, 48
    result[$1.$2]=$(echo "$out" | awk -F';' '{ printf "%.0f", $48 * 1024 / 1e6 }')
    cpu_per[$1.$2]=$(calc "($c1 - $c0) / ($(echo "$out" | cut -d';' -f47) / 2^20)" 2) ;;
  randwrite | randread) # IOPS at field 49 (write) or 8 (read)
    local f=49; [ "$2" = randwrite ] || f=8
    result[$1.$2]=$(echo "$out" | awk -F';' -v f=$f '{ printf "%.0f", $f }')
    cpu_per[$1.$2]=$(calc "($c1 - $c0) * 1e6 / (${result[$1.$2]} * $runtime)" 1) ;;
  esac
  echo "bench/nbd.sh: $1 $2: ${result[$1.$2]} (server CPU ${cpu_per[$1.$2]})" >&2
}

start_time=$(date -u +%FT%TZ) load0=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $servers; do
  start "$s"
  for p in $phases; do phase "$s" "$p"; done
  stop
done

declare -A title=(
  [seqwrite]="sequential write, nbdcopy file → NBD (MB/s)" [seqread]="sequential read, nbdcopy NBD → null: (MB/s)"
  [fioseqwrite]="1 MiB sequential write, fio QD32, ${runtime} s (MB/s)"
  [randwrite]="4 KiB random write, fio QD32 (IOPS)" [randread]="4 KiB random read, fio QD32 (IOPS)")
declare -A unit=([seqwrite]="s/GiB" [seqread]="s/GiB" [fioseqwrite]="s/GiB" [randwrite]="µs/I/O" [randread]="µs/I/O")
others=${servers/nbdvault/}
echo "Run of $start_time, ${size_mib} MiB exports, $(nproc) CPUs, load average $load0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo "nbdcopy $(nbdcopy --version | head -1 | cut -d' ' -f2), $(fio --version), $(qemu-nbd --version | head -1), $(nbdkit --version)."
echo
echo "| workload |$(printf ' %s |' $servers)$(for o in $others; do printf ' nbdvault / %s |' "$o"; done)"
echo "|---|$(for _ in $servers $others; do printf -- '---:|'; done)"
for p in $phases; do
  row="| ${title[$p]} |"
  for s in $servers; do row+=" ${result[$s.$p]} |"; done
  for o in $others; do row+=" $(calc "${result[nbdvault.$p]:-0} / ${result[$o.$p]}" 2) |"; done
  echo "$row"
done
echo
echo "Server CPU per unit of work:"
echo
echo "| workload | unit |$(printf ' %s |' $servers)"
echo "|---|---|$(for _ in $servers; do printf -- '---:|'; done)"
for p in $phases; do
  row="| $p | ${unit[$p]} |"
  for s in $servers; do row+=" ${cpu_per[$s.$p]} |"; done
  echo "$row"
done
