#!/usr/bin/env bash
# A short libFuzzer run of every fuzz target from the qemu-img seed corpus: what CI runs
# (README.md, "Fuzzing"). Usage: fuzz/smoke.sh [SECONDS-PER-TARGET]   (default 20)
# Every target runs; a crash in any fails the script, and libFuzzer leaves the input in
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo-fuzz passes nightly-only flags to rustc; the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
./make-corpus.sh "$corpus"
cargo fuzz build -s none -O
failed=()
for target in $(cargo fuzz list); do
  echo "== fuzzing $target for ${secs}s"
  cargo fuzz run -s none -O "$target" "$corpus/$target" -- \
    -max_len=262144 -rss_limit_mb=2048 -timeout=10 -max_total_time="$secs" -print_final_stats=1 ||
    failed+=("$target")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
