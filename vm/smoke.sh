#!/usr/bin/env bash
# Smoke test of the test VM: compiles vm/smoke/sctp_smoke.rs with plain rustc, shows that it cannot pass
# on a host without SCTP, then runs it inside the VM, where it must pass. Exits 0 only if the VM run
# passed; the host run is informational (a developer's host may well have SCTP).
#
#   vm/smoke.sh [run.sh options, e.g. --timeout 60 --cpus 1]
set -euo pipefail
# shellcheck source=vm/lib.sh
source "$(dirname "$0")/lib.sh"

vm_need rustc "rustup (https toolchain) or rustc"
build_dir=$VM_DEFAULT_DIR/smoke
mkdir -p "$build_dir"
binary=$build_dir/sctp_smoke
if [[ ! -x $binary || $VM_SCRIPTS_DIR/smoke/sctp_smoke.rs -nt $binary ]]; then
  rustc --edition 2021 -O -o "$binary.tmp" "$VM_SCRIPTS_DIR/smoke/sctp_smoke.rs"
  mv "$binary.tmp" "$binary"
fi

set +e
host_output=$(timeout 30 "$binary" 2>&1)
host_status=$?
set -e
case $host_status in
2) vm_log "host check: as expected the host kernel has no SCTP ($host_output)" ;;
0) vm_log "host check: note: this host has SCTP, so the smoke test passes here too" ;;
*) vm_log "host check: sctp_smoke exited $host_status on the host: $host_output" ;;
esac

"$VM_SCRIPTS_DIR/run.sh" --timeout 120 "$@" -- "$binary"
