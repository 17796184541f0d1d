#!/usr/bin/env bash
# Builds cargo test binaries on the host and runs each inside the test VM (one boot per binary).
#
#   vm/cargo-test.sh [--timeout SECS] [--cpus N] [--mem MB] [--env NAME=VALUE]... [--add PATH]... [--cwd DIR] \
#                    CARGO_TEST_ARGS... [-- TEST_BINARY_ARGS...]
#   e.g. vm/cargo-test.sh --timeout 300 -p lb-datapath --test sctp -- --test-threads 2
#
# The binaries come from `cargo test --no-run --message-format=json CARGO_TEST_ARGS`. Every other
# executable that build reports (the package's [[bin]]s, which integration tests reach through
# CARGO_BIN_EXE_<name> at their absolute host paths) is copied into the guest too, and so is the test's
# package directory, which becomes the working directory as under `cargo test`. Exits non-zero if
# the build or any binary fails; --timeout applies to each binary's VM separately.
set -euo pipefail
# shellcheck source=vm/lib.sh
source "$(dirname "$0")/lib.sh"

run_args=()
while (($#)); do
  case $1 in
  --timeout | --cpus | --mem | --env | --add | --cwd) run_args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
  *) break ;;
  esac
done
cargo_args=()
while (($#)) && [[ $1 != -- ]]; do
  cargo_args+=("$1")
  shift
done
[[ ${1:-} == -- ]] && shift
((${#cargo_args[@]})) || vm_die "name what to build, e.g. vm/cargo-test.sh -p lb-datapath --test sctp"

vm_need cargo "rustup"
messages=$(cd "$VM_REPO_DIR" && cargo test --no-run --message-format=json "${cargo_args[@]}")
tests=()
test_packages=()
extras=()
while IFS= read -r line; do
  executable=$(sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' <<<"$line")
  [[ -n $executable ]] || continue
  # Only the profile object says whether this is a test harness ("test":true appears in targets too).
  if grep -o '"profile":{[^}]*}' <<<"$line" | grep -q '"test":true'; then
    tests+=("$executable")
    test_packages+=("$(dirname "$(sed -n 's/.*"manifest_path":"\([^"]*\)".*/\1/p' <<<"$line")")")
  else
    extras+=("$executable")
  fi
done < <(grep '"reason":"compiler-artifact"' <<<"$messages")
((${#tests[@]})) || vm_die "cargo test ${cargo_args[*]} built no test binary"

add_args=()
for extra in "${extras[@]}"; do
  add_args+=(--add "$extra")
done
failed=()
for index in "${!tests[@]}"; do
  test=${tests[index]}
  package_dir=${test_packages[index]}
  vm_log "running $(basename "$test") in the VM"
  # Like `cargo test`: the package directory (fixtures) is there and current, CARGO_MANIFEST_DIR set.
  "$VM_SCRIPTS_DIR/run.sh" "${run_args[@]}" "${add_args[@]}" --add "$package_dir" --cwd "$package_dir" \
    --env "CARGO_MANIFEST_DIR=$package_dir" -- "$test" "$@" || failed+=("$(basename "$test")")
done
if ((${#failed[@]})); then
  vm_die "failed inside the VM: ${failed[*]}"
fi
vm_log "all ${#tests[@]} test binaries passed inside the VM"
