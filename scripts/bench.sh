#!/usr/bin/env bash
# Compare our engine with QEMU on the same workloads, in one run: `qcow2 bench` vs
# `qemu-img bench` (same knobs, same image kind), plus a raw-file baseline through
# qemu-img bench. Prints the median of N runs per workload and the ratio ours/QEMU
# (below 1.00 = we are faster). Usage: scripts/bench.sh [RUNS] [CACHE: writeback|none]
# QCOW2_AIO=threads|io_uring picks our IO backend (default: io_uring where available);
# qemu-img bench keeps its default (threads).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cache=${2:-writeback}
cargo build --release --quiet
Q="$PWD/target/release/qcow2"
dir=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
trap 'rm -rf "$dir"' EXIT

secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# run_case NAME PREPARE(qcow2 file) ARGS...: prints medians for ours, qemu and raw.
run_case() {
  local name=$1 prep=$2; shift 2
  local ours=() qemu=() raw=()
  for _ in $(seq "$runs"); do
    qemu-img create -q -f qcow2 "$dir/a.qcow2" 4G; qemu-img create -q -f qcow2 "$dir/b.qcow2" 4G
    qemu-img create -q -f raw "$dir/c.raw" 4G
    if [ "$prep" = prefill ]; then
      for f in a b; do
        qemu-img bench -w -c 16384 -d 16 -s 64k --pattern=0xa5 -f qcow2 "$dir/$f.qcow2" >/dev/null
      done
      qemu-img bench -w -c 16384 -d 16 -s 64k -f raw "$dir/c.raw" >/dev/null
    fi
    ours+=("$("$Q" bench -t "$cache" ${QCOW2_AIO:+-i "$QCOW2_AIO"} "$@" "$dir/a.qcow2" | secs)")
    qemu+=("$(qemu-img bench -t "$cache" -f qcow2 --pattern=0xa5 "$@" "$dir/b.qcow2" | secs)")
    raw+=("$(qemu-img bench -t "$cache" -f raw --pattern=0xa5 "$@" "$dir/c.raw" | secs)")
  done
  local o q r
  o=$(printf '%s\n' "${ours[@]}" | median); q=$(printf '%s\n' "${qemu[@]}" | median)
  r=$(printf '%s\n' "${raw[@]}" | median)
  printf '%-34s ours %7.3fs  qemu %7.3fs  raw %7.3fs  ours/qemu %5.2f\n' "$name" "$o" "$q" "$r" \
    "$(echo "$o / $q" | bc -l)"
}

echo "cache=$cache, ours -i ${QCOW2_AIO:-default}, median of $runs runs, 4 GiB images, 64 KiB clusters"
run_case "alloc write 4k seq d64"   fresh   -w -c 100000 -d 64 -s 4k
run_case "alloc write 64k seq d16"  fresh   -w -c 16384 -d 16 -s 64k
run_case "rewrite 4k stride 1M d32" prefill -w -c 50000 -d 32 -s 4k -S 1M
run_case "read 4k seq d64"          prefill -c 100000 -d 64 -s 4k
run_case "read 64k seq d16"         prefill -c 16384 -d 16 -s 64k
