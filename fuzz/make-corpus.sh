#!/usr/bin/env bash
# Seed corpora for the fuzz targets, made by qemu-img/qemu-io (nothing binary is committed).
# Usage: fuzz/make-corpus.sh [OUTDIR]   (default: fuzz/corpus; existing files are kept)
# Every image variant QEMU writes, kept small (512 B - 64 KiB clusters, a few clusters of
# data each), so that libFuzzer's mutations land in metadata rather than in megabytes of data.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/corpus}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"/{image_bytes,image_rw,check_repair,nbd_server,parsers}

# make NAME CLUSTER "CREATE-OPTIONS" [qemu-io commands...]
make() {
  local name=$1 cluster=$2 opts=$3
  shift 3
  local img="$work/$name.qcow2"
  qemu-img create -q -f qcow2 -o "cluster_size=$cluster${opts:+,$opts}" "$img" 1M
  local args=(-c "write -P 0x11 0 $((cluster * 3 / 2))" -c "write -z $((cluster * 4)) $cluster"
    -c "write -P 0x22 $((cluster * 6 + 512)) 1024" -c "discard $((cluster * 6)) $cluster")
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}

# compressed NAME CLUSTER "CREATE-OPTIONS": compressed clusters via convert -c
compressed() {
  local name=$1 cluster=$2 opts=$3
  local raw="$work/$name.raw"
  qemu-img create -q -f raw "$raw" 256k
  qemu-io -f raw -c "write -P 0x33 0 24k" -c "write -P 0x44 64k 4k" "$raw" >/dev/null
  qemu-img convert -c -O qcow2 -o "cluster_size=$cluster${opts:+,$opts}" "$raw" "$work/$name.qcow2"
  rm "$raw"
}

make c512 512 ""
make c4k 4096 ""
make c64k 65536 ""
make v2 4096 "compat=0.10"
make v2-c1k 1024 "compat=0.10"
for bits in 1 2 4 8 32 64; do make "rc$bits" 4096 "refcount_bits=$bits"; done
make ext-l2 16384 "extended_l2=on" "write -P 0x55 $((16384 * 8 + 1024)) 512"
make ext-l2-64k 65536 "extended_l2=on"
make zstd 4096 "compression_type=zstd" "write -c -P 0x66 $((4096 * 10)) 4096"
make zlib-c 4096 "" "write -c -P 0x66 $((4096 * 10)) 4096"
make lazy 4096 "lazy_refcounts=on"
make prealloc 4096 "preallocation=metadata"
qemu-img create -q -f qcow2 -o cluster_size=4096 "$work/base.qcow2" 1M
make backing 4096 "backing_file=base.qcow2,backing_fmt=qcow2"
make data-file 4096 "data_file=$work/data.raw"
make data-file-raw 4096 "data_file=$work/data2.raw,data_file_raw=on"
compressed comp-zlib 4096 ""
compressed comp-zstd 2048 "compression_type=zstd"
compressed comp-512 512 "refcount_bits=1"
make snap 4096 ""
qemu-img snapshot -c first "$work/snap.qcow2"
qemu-io -f qcow2 -c "write -P 0x77 0 8k" "$work/snap.qcow2" >/dev/null
qemu-img snapshot -c second "$work/snap.qcow2"
qemu-img create -q -f qcow2 --object secret,id=s0,data=fuzz \
  -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=4096 \
  "$work/luks.qcow2" 1M
qemu-img create -q -f qcow2 -o cluster_size=4096 "$work/empty.qcow2" 64M
# A grown refcount table: many clusters at 512 bytes with 64-bit refcounts.
make grown 512 "refcount_bits=64" "write -P 0x88 128k 256k"

n=0
for img in "$work"/*.qcow2; do
  name=$(basename "$img" .qcow2)
  cp "$img" "$out/image_bytes/$name"
  cp "$img" "$out/check_repair/$name"
  # image_rw: a 16-byte script (seed + operation codes) in front of the image.
  for s in 0 1 2; do
    { head -c 8 /dev/urandom; printf '\x00\x01\x02\x03\x04\x05\x06'; printf "\\x0$s"; cat "$img"; } \
      >"$out/image_rw/$name-$s"
  done
  # parsers: selector byte + the header cluster (0: header, 1: image header) or the
  # whole file (7: tables).
  { printf '\x00'; head -c 4096 "$img"; } >"$out/parsers/header-$name"
  { printf '\x01'; head -c 65536 "$img"; } >"$out/parsers/image-header-$name"
  { printf '\x07'; head -c 65536 "$img" | tail -c +513; } >"$out/parsers/tables-$name"
  n=$((n + 1))
done

# nbd_server: config byte + framed request records (bit 2), with and without the canned
# handshake (bit 0) and structured replies (bit 5); and raw streams.
rec() { # KIND FLAGS OFFSET LEN -> one 10-byte record
  printf "\\x$(printf %02x "$1")\\x$(printf %02x "$2")"
  printf '%08x%08x' "$3" "$4" | xxd -r -p
}
records() {
  rec 1 0 0 65536; rec 1 1 4096 512; rec 0 0 0 8192; rec 4 0 0 4096; rec 3 0 0 0
  rec 4 0 65536 131072; rec 5 0 70000 10000; rec 0 4 0 65536; rec 2 0 1044480 4096
  rec 1 0 1048576 512; rec 5 8 0 1048576
}
for cfg in 05 07 25 2d 35 3d; do
  { printf "\\x$cfg"; records; } >"$out/nbd_server/framed-$cfg"
done
# Raw: handshake by hand (cfg 0), then a write and a read request.
{
  printf '\x00\x00\x00\x00\x03'
  printf 'IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00'
  printf '\x25\x60\x95\x13\x00\x00\x00\x01cookie01\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x08'
  printf 'abcdefgh'
  printf '\x25\x60\x95\x13\x00\x00\x00\x00cookie02\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x08'
} >"$out/nbd_server/raw-go"
{ printf '\x01'; printf '\x25\x60\x95\x13\x00\x00\x00\x03flush001'; head -c 12 /dev/zero; } \
  >"$out/nbd_server/raw-flush"
echo "seeded $n images into $out"
