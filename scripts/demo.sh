#!/usr/bin/env bash
# The main job end to end: build the `qcow2` tool, create an image, write and read it back
# with verification, inspect it, check it with our checker and QEMU's, convert it to raw and
# compare. Runs in a temporary directory; prints each step.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
Q="$PWD/target/release/qcow2"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
step() { printf '\n== %s\n' "$*"; }

step "create a 1 GiB image (64 KiB clusters, zstd)"
"$Q" create -f qcow2 -o cluster_size=64k,compression_type=zstd disk.qcow2 1G

step "write patterns (some concurrent), zeroes and a discard, then read them back verified"
"$Q" io -c 'write -P 0xab 0 1M' -c 'aio_write -P 0xcd 4M 256k' -c 'aio_write -P 0xef 8M 64k' \
  -c 'aio_flush' -c 'write -z 512k 128k' -c 'discard 8M 64k' \
  -c 'read -P 0xab 0 512k' -c 'read -P 0 512k 128k' -c 'read -P 0xcd 4M 256k' \
  -c 'read -P 0 8M 64k' disk.qcow2

step "info and map"
"$Q" info disk.qcow2
"$Q" map disk.qcow2

step "check (ours, then QEMU's)"
"$Q" check disk.qcow2
if command -v qemu-img >/dev/null; then qemu-img check disk.qcow2; fi

step "convert to raw, and to a compressed copy; compare (ours, then QEMU's)"
"$Q" convert -O raw disk.qcow2 disk.raw
"$Q" convert -c -O qcow2 disk.qcow2 small.qcow2
"$Q" compare disk.raw small.qcow2
if command -v qemu-img >/dev/null; then qemu-img compare -f raw -F qcow2 disk.raw disk.qcow2; fi

step "serve it over NBD for a moment and read through the server"
"$Q" serve --persistent --read-only --socket "$dir/nbd.sock" disk.qcow2 &
server=$!
for _ in $(seq 50); do [ -S "$dir/nbd.sock" ] && break; sleep 0.1; done
if command -v qemu-io >/dev/null; then
  qemu-io -f raw -r -c 'read -P 0xcd 4M 256k' "nbd+unix:///?socket=$dir/nbd.sock"
fi
kill -TERM "$server"; wait "$server"
echo "demo finished: all steps succeeded"
