#!/usr/bin/env bash
# Side-by-side speed of our engine and QEMU on identical fresh images, in one run.
#
#   scripts/bench-compare.sh [--quick] [--rounds N] [--cache none|writeback|both] [WORKLOAD...]
#
# Workloads (default: all): a b c d e f g h i, as in issue 10:
#   a  4 KiB allocating writes, one per new cluster (-S 64k), fresh image, depth 1 and 32
#   b  4 KiB overwrites of allocated clusters, sequential and scattered (large prime step)
#   c  4 KiB reads of allocated clusters, sequential and scattered
#   d  1 MiB sequential writes to a fresh image (depth 8), 1 MiB reads
#   e  4 KiB writes into a fresh overlay over a full backing file (COW of each cluster)
#   f  64 KiB reads of a zstd- and a zlib-compressed image
#   g  4 KiB scattered reads with an L2 cache a quarter of the image's L2 tables
#   i  convert of a mixed raw file (random, text, repeated, zero blocks): raw->qcow2,
#      qcow2->qcow2, -c zlib and -c zstd (qemu-img with -m 8, and -m 8 -W)
#   h  the NBD server: `qcow2 serve` against `qemu-nbd` (and qemu-nbd on a raw file) on the
#      full image, fio's nbd engine, 4 KiB randread/randwrite, QD 32, 1 and 4 connections;
#      wall = fio's run, CPU and RSS = the server's (skipped when fio is missing)
# Each round runs ours, QEMU and the raw-file baseline (`qemu-img bench -f raw`) in turn,
# rotating who goes first, every run a whole process under /usr/bin/time (wall, user+sys CPU,
# peak RSS). Printed: medians over the rounds and the ratios ours/QEMU and ours/raw (below 1 =
# we are faster). --quick: tiny images and counts, one round (a smoke test: numbers mean
# nothing). Environment: QCOW2_BIN (default: build target/release/qcow2), BENCH_DIR (scratch
# directory, default /var/tmp), BENCH_SIZE (image size, default 1G), CONVERT_SIZE (default 1G).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 rounds=5 caches=none
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1; rounds=1; shift ;;
    --rounds) rounds=$2; shift 2 ;;
    --cache) caches=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ "$caches" = both ] && caches="none writeback"
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(a b c d e f g h i)

if [ -z "${QCOW2_BIN:-}" ]; then
  cargo build --release --quiet
  QCOW2_BIN="$PWD/target/release/qcow2"
fi
Q=$QCOW2_BIN
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "needs GNU time at /usr/bin/time" >&2; exit 2; }

if [ $quick = 1 ]; then
  size=${BENCH_SIZE:-64M} csize=${CONVERT_SIZE:-8M} scale=100
else
  size=${BENCH_SIZE:-1G} csize=${CONVERT_SIZE:-1G} scale=1
fi
d=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}" bench-compare.XXXXXX)
trap 'rm -rf "$d"' EXIT
res=$d/results; mkdir -p "$res"
bytes() { numfmt --from=iec "${1%[bB]}"; }
n() { echo $(( $1 / scale > 1 ? $1 / scale : 1 )); }   # a count, scaled down by --quick
clusters=$(( $(bytes "$size") / 65536 ))

# measure KEY CMD...: run CMD once, append "wall cpu rss_kib" to $res/KEY.
measure() {
  local key=$1; shift
  if ! "$TIME" -f '%e %U %S %M' -o "$d/t" "$@" >"$d/out" 2>&1; then
    echo "FAILED: $*" >&2; cat "$d/out" >&2; exit 1
  fi
  awk '{printf "%s %.3f %s\n", $1, $2 + $3, $4}' "$d/t" >>"$res/$key"
}

# The shared prefilled images, made once: a full qcow2 image and a full raw file
# (pattern 0xa5), and compressed copies.
full() {
  [ -e "$d/full.qcow2" ] && return
  qemu-img create -q -f qcow2 "$d/full.qcow2" "$size"
  qemu-img create -q -f raw "$d/full.raw" "$size"
  local c; c=$(( $(bytes "$size") >> 20 ))
  for f in qcow2 raw; do
    qemu-img bench -q -w -f $f -t none -c "$c" -d 8 -s 1M --pattern=0xa5 "$d/full.$f" >/dev/null
  done
}
compressed() {
  full
  [ -e "$d/zlib.qcow2" ] && return
  qemu-img convert -c -O qcow2 -o compression_type=zlib "$d/full.qcow2" "$d/zlib.qcow2"
  qemu-img convert -c -O qcow2 -o compression_type=zstd "$d/full.qcow2" "$d/zstd.qcow2"
}

# prep KIND WHO: print the image WHO (ours|qemu|raw) runs on, made fresh where KIND says.
prep() {
  local kind=$1 who=$2
  case $kind/$who in
    fresh/raw) rm -f "$d/r.raw"; qemu-img create -q -f raw "$d/r.raw" "$size"; echo "$d/r.raw" ;;
    fresh/*) rm -f "$d/$who.qcow2"; qemu-img create -q -f qcow2 "$d/$who.qcow2" "$size"
      echo "$d/$who.qcow2" ;;
    overlay/raw) echo "$d/full.raw" ;;
    overlay/*) rm -f "$d/$who.qcow2"
      qemu-img create -q -f qcow2 -b "$d/full.qcow2" -F qcow2 "$d/$who.qcow2"; echo "$d/$who.qcow2" ;;
    zstd/raw|zlib/raw|full/raw) echo "$d/full.raw" ;;
    zstd/*|zlib/*) echo "$d/$kind.qcow2" ;;
    full/*) echo "$d/full.qcow2" ;;
  esac
}

# bench_row NAME KIND CACHE [l2=BYTES] BENCH-ARGS...: ours vs qemu-img bench vs raw.
bench_row() {
  local name=$1 kind=$2 cache=$3; shift 3
  local l2=""
  case ${1:-} in l2=*) l2=${1#l2=}; shift ;; esac
  case $kind in fresh) ;; overlay|full) full ;; *) compressed ;; esac
  local key="$name|$cache" r who img
  rows+=("$key")
  for r in $(seq "$rounds"); do
    local order=(ours qemu raw)
    order=("${order[@]:$((r % 3))}" "${order[@]:0:$((r % 3))}")
    for who in "${order[@]}"; do
      img=$(prep "$kind" "$who")
      case $who in
        ours) measure "$key|ours" "$Q" bench -q -t "$cache" -f qcow2 ${l2:+--l2-cache-size "$l2"} "$@" "$img" ;;
        qemu) if [ -n "$l2" ]; then
                measure "$key|qemu" qemu-img bench -q -t "$cache" -i io_uring "$@" --image-opts \
                  "driver=qcow2,file.filename=$img,l2-cache-size=$l2"
              else
                measure "$key|qemu" qemu-img bench -q -t "$cache" -i io_uring -f qcow2 "$@" "$img"
              fi ;;
        raw) measure "$key|raw" qemu-img bench -q -t "$cache" -i io_uring -f raw "$@" "$img" ;;
      esac
    done
  done
}

# The mixed convert source: per MiB, by index mod 8: random (0,3,6), text (1,5: base64 of
# random, compresses ~4:3), written zeros (2), a repeated 4 KiB block (4), a hole (7). Fixed
# key, so every run converts the same bytes.
mixed() {
  [ -e "$d/mixed.raw" ] && return
  local mib; mib=$(( $(bytes "$csize") >> 20 ))
  head -c $(( mib << 20 )) /dev/zero |
    openssl enc -aes-128-ctr -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 -nosalt >"$d/mixed.raw"
  # 770000 bytes make just under 1 MiB of base64 text.
  head -c 770000 "$d/mixed.raw" | base64 -w 76 >"$d/text.blk"
  for _ in $(seq 256); do head -c 4096 "$d/mixed.raw"; done >"$d/rep.blk"
  local i
  for i in $(seq 0 $(( mib - 1 ))); do
    case $(( i % 8 )) in
      1|5) dd if="$d/text.blk" of="$d/mixed.raw" bs=1M seek="$i" conv=notrunc status=none ;;
      2) dd if=/dev/zero of="$d/mixed.raw" bs=1M count=1 seek="$i" conv=notrunc status=none ;;
      4) dd if="$d/rep.blk" of="$d/mixed.raw" bs=1M seek="$i" conv=notrunc status=none ;;
      7) fallocate -p -o $(( i << 20 )) -l 1048576 "$d/mixed.raw" ;;
    esac
  done
  qemu-img convert -f raw -O qcow2 "$d/mixed.raw" "$d/mixed.qcow2"
}

# convert_row NAME SRC-FORMAT "OURS-FLAGS" "QEMU-FLAGS": ours vs qemu-img convert.
convert_row() {
  local name=$1 fmt=$2 ours=$3 qemu=$4
  mixed
  local key="$name|-" r who
  rows+=("$key")
  for r in $(seq "$rounds"); do
    local order=(ours qemu)
    [ $(( r % 2 )) = 0 ] && order=(qemu ours)
    for who in "${order[@]}"; do
      rm -f "$d/out.qcow2"
      # shellcheck disable=SC2086 # the flags are word lists
      case $who in
        ours) measure "$key|ours" "$Q" convert -f "$fmt" $ours -O qcow2 "$d/mixed.$fmt" "$d/out.qcow2" ;;
        qemu) measure "$key|qemu" qemu-img convert -f "$fmt" $qemu -O qcow2 "$d/mixed.$fmt" "$d/out.qcow2" ;;
      esac
    done
  done
  # Both outputs must hold the source's bytes.
  qemu-img compare -q -f "$fmt" -F qcow2 "$d/mixed.$fmt" "$d/out.qcow2"
}

# serve_measure KEY WHO CACHE FIO-ARGS...: start WHO's NBD server (ours: qcow2 serve, qemu:
# qemu-nbd, raw: qemu-nbd on the raw file) on the full image, run fio against it, stop it.
# Appends "fio-wall server-cpu server-rss_kib" to $res/KEY.
serve_measure() {
  local key=$1 who=$2 cache=$3; shift 3
  local sock=$d/nbd.sock server
  rm -f "$sock"
  case $who in
    ours) server=("$Q" serve -t -e 4 --cache="$cache" -k "$sock" -f qcow2 "$d/full.qcow2") ;;
    qemu) server=(qemu-nbd -t -e 4 --cache="$cache" -k "$sock" -f qcow2 "$d/full.qcow2") ;;
    raw) server=(qemu-nbd -t -e 4 --cache="$cache" -k "$sock" -f raw "$d/full.raw") ;;
  esac
  "$TIME" -f '%U %S %M' -o "$d/st" "${server[@]}" >"$d/sout" 2>&1 &
  local tpid=$! i
  for i in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { echo "FAILED: ${server[*]} did not listen" >&2; cat "$d/sout" >&2; exit 1; }
  if ! "$TIME" -f '%e' -o "$d/ft" fio --name=h --ioengine=nbd --uri="nbd+unix:///?socket=$sock" \
      --bs=4k --iodepth=32 --size="$size" --randrepeat=1 --group_reporting "$@" >"$d/out" 2>&1; then
    echo "FAILED: fio $*" >&2; cat "$d/out" >&2; exit 1
  fi
  pkill -TERM -P "$tpid" || true
  wait "$tpid" || true
  echo "$(cat "$d/ft") $(awk '{printf "%.3f %s", $1 + $2, $3}' "$d/st")" >>"$res/$key"
}

# nbd_row NAME CACHE FIO-ARGS...: ours vs qemu-nbd vs qemu-nbd on raw, alternating.
nbd_row() {
  local name=$1 cache=$2; shift 2
  full
  local key="$name|$cache" r who
  rows+=("$key")
  for r in $(seq "$rounds"); do
    local order=(ours qemu raw)
    order=("${order[@]:$((r % 3))}" "${order[@]:0:$((r % 3))}")
    for who in "${order[@]}"; do serve_measure "$key|$who" "$who" "$cache" "$@"; done
  done
}

run_workload() {
  local w=$1 cache
  if [ "$w" = i ]; then
    convert_row "i raw->qcow2" raw "" ""
    # qemu-img convert's default cache mode is "unsafe" (no fsync at the end); ours always
    # flushes on close: this row gives qemu-img the same durability.
    convert_row "i raw->qcow2 (qemu -t writeback)" raw "" "-t writeback"
    convert_row "i qcow2->qcow2" qcow2 "" ""
    for c in zlib zstd; do
      convert_row "i -c $c (qemu -m 8)" raw "-c -o compression_type=$c" "-c -m 8 -o compression_type=$c"
      convert_row "i -c $c (qemu -m 8 -W)" raw "-c -o compression_type=$c" "-c -m 8 -W -o compression_type=$c"
    done
    return
  fi
  local scatter=$(( 7919 * 4096 ))
  for cache in $caches; do
    case $w in
      a) bench_row "a alloc 4k d1" fresh "$cache" -w --pattern=0xa5 -c "$(n $(( clusters / 2 )))" -d 1 -s 4k -S 64k
         bench_row "a alloc 4k d32" fresh "$cache" -w --pattern=0xa5 -c "$(n "$clusters")" -d 32 -s 4k -S 64k ;;
      b) bench_row "b overwrite 4k seq d32" full "$cache" -w --pattern=0xa5 -c "$(n 100000)" -d 32 -s 4k
         bench_row "b overwrite 4k scattered d32" full "$cache" -w --pattern=0xa5 -c "$(n 100000)" -d 32 -s 4k -S $scatter ;;
      c) bench_row "c read 4k seq d32" full "$cache" -c "$(n 100000)" -d 32 -s 4k
         bench_row "c read 4k scattered d32" full "$cache" -c "$(n 100000)" -d 32 -s 4k -S $scatter ;;
      d) bench_row "d write 1M seq d8" fresh "$cache" -w --pattern=0xa5 -c "$(n $(( clusters / 16 )))" -d 8 -s 1M
         bench_row "d read 1M seq d8" full "$cache" -c "$(n $(( clusters / 16 )))" -d 8 -s 1M ;;
      e) bench_row "e COW 4k into overlay d32" overlay "$cache" -w --pattern=0xa5 -c "$(n "$clusters")" -d 32 -s 4k -S 64k ;;
      f) bench_row "f read 64k zstd d16" zstd "$cache" -c "$(n "$clusters")" -d 16 -s 64k
         bench_row "f read 64k zlib d16" zlib "$cache" -c "$(n "$clusters")" -d 16 -s 64k ;;
      g) bench_row "g read 4k small L2 cache d32" full "$cache" l2=$(( clusters * 8 / 4 )) -c "$(n 100000)" -d 32 -s 4k -S $scatter ;;
      h) if ! command -v fio >/dev/null || ! fio --enghelp 2>/dev/null | grep -qw nbd; then
           echo "workload h skipped: needs fio with its nbd engine" >&2; continue
         fi
         local ios; ios=$(n 200000)
         for rw in randread randwrite; do
           nbd_row "h nbd 4k $rw QD32 1 conn" "$cache" --rw=$rw --number_ios="$ios"
           nbd_row "h nbd 4k $rw QD32 4 conns" "$cache" --rw=$rw --numjobs=4 --number_ios=$(( ios / 4 > 1 ? ios / 4 : 1 ))
         done ;;
      *) echo "unknown workload '$w'" >&2; exit 2 ;;
    esac
  done
}

rows=()
for w in "${workloads[@]}"; do run_workload "$w"; done

# col KEY FIELD: the median of column FIELD (1 wall, 2 cpu, 3 rss) of KEY's runs, or "-".
col() {
  [ -s "$res/$1" ] || { echo -; return; }
  awk -v f="$2" '{print $f}' "$res/$1" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
kib() { [ "$1" = - ] && echo - || echo $(( $1 / 1024 )); }
ratio() { [ "$1" = - ] || [ "$2" = - ] && { echo -; return; }; awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else printf "-"}'; }

echo "size=$size convert=$csize rounds=$rounds ours=$Q ($(qemu-img --version | head -1))"
printf '%-40s %-9s %8s %8s %8s %6s %6s %8s %8s %6s %7s %7s\n' workload cache \
  ours_s qemu_s raw_s o/q o/raw ours_cpu qemu_cpu o/q_cpu ours_MiB qemu_MiB
for key in "${rows[@]}"; do
  ow=$(col "$key|ours" 1) qw=$(col "$key|qemu" 1) rw=$(col "$key|raw" 1)
  oc=$(col "$key|ours" 2) qc=$(col "$key|qemu" 2)
  om=$(col "$key|ours" 3) qm=$(col "$key|qemu" 3)
  printf '%-40s %-9s %8s %8s %8s %6s %6s %8s %8s %6s %7s %7s\n' "${key%|*}" "${key#*|}" \
    "$ow" "$qw" "$rw" "$(ratio "$ow" "$qw")" "$(ratio "$ow" "$rw")" "$oc" "$qc" "$(ratio "$oc" "$qc")" \
    "$(kib "$om")" "$(kib "$qm")"
done
