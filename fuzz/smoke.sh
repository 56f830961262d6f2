#!/usr/bin/env bash
# A short libFuzzer run of every fuzz target from the qemu-img seed corpus: what CI runs
# (README.md, "Fuzzing"). Usage: fuzz/smoke.sh [SECONDS-PER-TARGET]   (default 20)
# Every target runs; a crash in any fails the script, and libFuzzer leaves the input in
# fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
# A fixed seed and run count make the CI run repeatable: the same inputs every time (unless
# the time cap cuts it short on a slow machine). Long exploratory runs: see README "Fuzzing".
seed="${FUZZ_SEED:-1}"
runs="${FUZZ_RUNS:-20000}"
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo-fuzz passes nightly-only flags to rustc; the stable toolchain accepts them this way.
export RUSTC_BOOTSTRAP=1
corpus="$(mktemp -d)"
trap 'rm -rf "$corpus"' EXIT
./make-corpus.sh "$corpus"
cargo fuzz build -s none -O
failed=()
for target in $(cargo fuzz list); do
  echo "== fuzzing $target: seed $seed, at most $runs runs or ${secs}s"
  cargo fuzz run -s none -O "$target" "$corpus/$target" -- \
    -seed="$seed" -runs="$runs" -max_len=262144 -rss_limit_mb=2048 -timeout=10 \
    -max_total_time="$secs" -print_final_stats=1 ||
    failed+=("$target")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that crashed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
