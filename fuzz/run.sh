#!/usr/bin/env bash
# Runs one fuzz target under AFL++ for a bounded time, resuming an earlier run in the same output
# folder. See the README's "Fuzzing" section for installing cargo-afl and building the targets.
# Usage: fuzz/run.sh TARGET SECONDS [OUT_DIR]   (TARGET: a folder of fuzz/corpus/)
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET SECONDS [OUT_DIR]}
seconds=${2:?usage: fuzz/run.sh TARGET SECONDS [OUT_DIR]}
out=${3:-${FUZZ_OUT:-/tmp/ringlb-fuzz}}
target_dir=${CARGO_TARGET_DIR:-../target}
binary=$target_dir/debug/fuzz-$target
[[ -d corpus/$target ]] || { echo "no corpus/$target" >&2; exit 2; }
[[ -x $binary ]] || { echo "$binary missing: cargo afl build -p ringlb-fuzz --features afl --bins" >&2; exit 2; }
dictionary=()
case $target in
  manifest | objects) dictionary=(-x dict/kubernetes.dict) ;;
  annotations | text) dictionary=(-x dict/annotations.dict) ;;
esac
mkdir -p "$out"
# No CPU pinning (cores are shared), no curses UI (runs in the background), resume a previous
# run's queue; a core_pattern that pipes to a crash handler only delays crash reports.
export AFL_NO_AFFINITY=1 AFL_NO_UI=1 AFL_AUTORESUME=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
exec cargo afl fuzz -V "$seconds" -i "corpus/$target" -o "$out/$target" "${dictionary[@]}" -- "$binary"
