#!/usr/bin/env bash
# A long exploratory libFuzzer run of every fuzz target, one after another, from the qemu-img
# seed corpus (README.md, "Fuzzing"). Usage: fuzz/long.sh [SECONDS-PER-TARGET] [OUTDIR]
# (defaults: 1800 s, fuzz/long-run). The corpus grows in OUTDIR/corpus/<target>; each target's
# libFuzzer log is OUTDIR/<target>.log; crashes land in fuzz/artifacts/<target>/. The last
# lines of each log (the "stat::" lines) give the run count and the coverage reached.
# FUZZ_TIMEOUT (default 60 s) is the time one input may take before libFuzzer reports it as
# a hang: generous, because a long run usually shares the machine (slow units are still
# written to fuzz/artifacts/<target>/slow-unit-*). FUZZ_TARGETS picks targets.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-1800}"
out="$(realpath -m "${2:-long-run}")"
export RUSTC_BOOTSTRAP=1
mkdir -p "$out"
./make-corpus.sh "$out/corpus"
cargo fuzz build -s none -O
status=0
for target in ${FUZZ_TARGETS:-$(cargo fuzz list)}; do
  echo "== $target: ${secs}s, log $out/$target.log"
  # libFuzzer stops at the first crash and leaves its input in fuzz/artifacts/<target>/
  if ! cargo fuzz run -s none -O "$target" "$out/corpus/$target" -- \
    -max_len=262144 -rss_limit_mb=2048 -timeout="${FUZZ_TIMEOUT:-60}" -max_total_time="$secs" \
    -print_final_stats=1 >"$out/$target.log" 2>&1; then
    echo "   $target: FOUND A CRASH (see the log and fuzz/artifacts/$target/)"
    status=1
  fi
  grep -E '^(stat::|Done|#[0-9]+ +DONE)' "$out/$target.log" | tail -8 || true
done
exit $status
