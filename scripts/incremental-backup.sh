#!/usr/bin/env bash
# Incremental backup with a persistent dirty bitmap, worked end to end:
#   1. create an image with data, and a bitmap that records every write from now on;
#   2. full backup: copy the whole disk through `qcow2 serve` with nbdcopy (raw file);
#   3. the guest writes more (`qcow2 io`): the bitmap marks what changed;
#   4. incremental backup: `qcow2 serve -r -B NAME` exports the bitmap as the NBD context
#      qemu:dirty-bitmap:NAME; `nbdinfo --map=... --json` lists the dirty ranges, and only
#      those are copied (qemu-img convert of each range) over a copy of the full backup;
#   5. `qemu-img compare` of full+incremental with the image: identical;
#   6. clear the bitmap: the next incremental backup starts from here.
# Needs qemu-img, nbdinfo and nbdcopy (libnbd-bin). Uses $QCOW2 as the tool when set (the
# tests do), else builds it. Runs in a temporary directory; prints each step.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${QCOW2:-}" ]; then
  cargo build --release --quiet
  QCOW2="$PWD/target/release/qcow2"
fi
Q="$QCOW2"
for tool in qemu-img nbdinfo nbdcopy; do
  command -v "$tool" >/dev/null || { echo "needs $tool (qemu-utils, libnbd-bin)" >&2; exit 2; }
done
dir=$(mktemp -d)
server=""
cleanup() {
  if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
cd "$dir"
sock="$dir/nbd.sock"
uri="nbd+unix:///?socket=$sock"
step() { printf '\n== %s\n' "$*"; }

# serve ARGS...: start `qcow2 serve` on $sock in the background and wait until it accepts.
serve() {
  rm -f "$sock"
  "$Q" serve -t -k "$sock" "$@" &
  server=$!
  for _ in $(seq 100); do
    nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the server did not start" >&2
  exit 1
}
stop() {
  kill -TERM "$server"
  wait "$server"
  server=""
}

step "create a 64 MiB image with data, and bitmap 'backup' that tracks writes from now on"
"$Q" create -f qcow2 disk.qcow2 64M
"$Q" io -c 'write -P 0x11 0 8M' -c 'write -P 0x22 32M 4M' disk.qcow2
"$Q" bitmap --add disk.qcow2 backup
"$Q" info disk.qcow2 | sed -n '/bitmaps/,/granularity/p'

step "full backup: nbdcopy of the whole export to full.raw"
serve -r disk.qcow2
nbdcopy "$uri" full.raw
stop
ls -l full.raw

step "the guest writes: the bitmap records what changed"
"$Q" io -c 'write -P 0x33 1M 64k' -c 'write -P 0x44 20M 1M' -c 'write -z 33M 128k' \
  -c 'write -P 0x55 63M 4k' disk.qcow2

step "incremental backup: only the dirty ranges of 'backup', read through qcow2 serve -B"
serve -r -B backup disk.qcow2
nbdinfo --map=qemu:dirty-bitmap:backup --json "$uri" >dirty.json
cp full.raw restored.raw
copied=0
# nbdinfo --json prints one extent per line: { "offset": N, "length": N, "type": T, ... }
while read -r off len type; do
  [ "$type" = 1 ] || continue
  echo "copy dirty range: offset $off, length $len"
  qemu-img convert -n \
    --image-opts "driver=raw,offset=$off,size=$len,file.driver=nbd,file.server.type=unix,file.server.path=$sock" \
    --target-image-opts "driver=raw,offset=$off,size=$len,file.driver=file,file.filename=restored.raw"
  copied=$((copied + len))
done < <(sed -n 's/.*"offset": *\([0-9]*\), *"length": *\([0-9]*\), *"type": *\([0-9]*\).*/\1 \2 \3/p' dirty.json)
stop
echo "copied $copied of $(stat -c %s full.raw) bytes"

step "full + incremental against the image (qemu-img compare)"
qemu-img compare -f raw -F qcow2 restored.raw disk.qcow2

step "clear the bitmap: the next incremental backup copies only what changes from now on"
"$Q" bitmap --clear disk.qcow2 backup
echo "incremental backup finished: restored image identical"
