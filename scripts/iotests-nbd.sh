#!/usr/bin/env bash
# Run QEMU's own iotests in NBD mode (`./check -qcow2 -nbd`) against qemu-nbd or against
# `qcow2 serve` (through a two-line wrapper set as QEMU_NBD_PROG), and print the summary.
# Long (tens of minutes): not part of CI.
#
#   scripts/iotests-nbd.sh ours|qemu [TEST...]       (no TEST: every test the check picks)
#
# IOTESTS_FMT=raw runs `-raw -nbd` instead: in QEMU 10.0.2, `-qcow2 -nbd` has qemu-io open the
# export as qcow2 again (a qcow2 inside the NBD export), so nearly every test fails with
# qemu-nbd too; `-raw -nbd` is the mode where the NBD tests pass with qemu-nbd.
#
# Needs QEMU 10.0.2's tests/qemu-iotests: set QEMU_SRC to an unpacked QEMU source tree, or
# let the script download Debian's `qemu` source tarball (`apt-get source`, a deb-src line
# for bookworm-backports kept in a private apt directory) into $WORK. qemu-img, qemu-io and
# qemu-nbd must be installed; qemu-system and qemu-storage-daemon may be missing: stand-ins
# that fail take their place, so the tests that need a VM fail with both servers alike.
set -euo pipefail

who=${1:?usage: $0 ours|qemu [TEST...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/qcow2-iotests}
QEMU_VERSION=${QEMU_VERSION:-10.0.2}
mkdir -p "$WORK"

fetch_source() {
    local apt="$WORK/apt"
    mkdir -p "$apt/lists/partial"
    echo "deb-src http://deb.debian.org/debian bookworm-backports main" >"$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists")
    apt-get "${opts[@]}" update >/dev/null
    (cd "$WORK" && apt-get "${opts[@]}" source --download-only "qemu" >/dev/null 2>&1 || true)
    local tarball
    tarball=$(ls "$WORK"/qemu_"$QEMU_VERSION"*.orig.tar.xz | head -1)
    tar -C "$WORK" -xJf "$tarball" "qemu-$QEMU_VERSION/tests/qemu-iotests" "qemu-$QEMU_VERSION/python"
}

if [ -z "${QEMU_SRC:-}" ]; then
    QEMU_SRC="$WORK/qemu-$QEMU_VERSION"
    [ -d "$QEMU_SRC/tests/qemu-iotests" ] || fetch_source
fi

# A build tree the way `check` expects one: build/tests/qemu-iotests, binaries in build/.
fmt=${IOTESTS_FMT:-qcow2}
build="$WORK/build-$who-$fmt"
iot="$build/tests/qemu-iotests"
mkdir -p "$iot" "$build/storage-daemon"
cat >"$build/qemu-system-x86_64" <<'STUB'
#!/bin/sh
# Stand-in: no VM here. `-machine help` (asked once by check) lists no machine.
[ "$1 $2" = "-machine help" ] && exit 0
echo "qemu-system is not installed" >&2
exit 1
STUB
cp "$build/qemu-system-x86_64" "$build/storage-daemon/qemu-storage-daemon"
chmod +x "$build/qemu-system-x86_64" "$build/storage-daemon/qemu-storage-daemon"

if [ "$who" = ours ]; then
    # QCOW2_BIN: a qcow2 binary already built (say target/debug/qcow2); else a release build.
    if [ -z "${QCOW2_BIN:-}" ]; then
        cargo build --release --manifest-path "$root/Cargo.toml" --bin qcow2 >&2
        QCOW2_BIN="$root/target/release/qcow2"
    fi
    nbd="$build/qemu-nbd"
    printf '#!/bin/sh\nexec %s serve "$@"\n' "$QCOW2_BIN" >"$nbd"
    chmod +x "$nbd"
else
    nbd=$(command -v qemu-nbd)
fi

export QEMU_IMG_PROG=$(command -v qemu-img) QEMU_IO_PROG=$(command -v qemu-io)
export QEMU_NBD_PROG=$nbd QEMU_PROG="$build/qemu-system-x86_64"
export QSD_PROG="$build/storage-daemon/qemu-storage-daemon"
export PYTHONPATH="$QEMU_SRC/python${PYTHONPATH:+:$PYTHONPATH}"
cd "$iot"
"$QEMU_SRC/tests/qemu-iotests/check" --source-dir "$QEMU_SRC/tests/qemu-iotests" \
    --build-dir "$iot" "-$fmt" -nbd "$@" 2>&1 | tee "$WORK/check-$who-$fmt.log"
