#!/usr/bin/env bash
# L2 failover and handover times of ringlb, from the multi-node lab test (ringlb/tests/l2.rs):
# three ringlb nodes in network namespaces on one bridge, a client and a backend host.
#   failover: SIGKILL of the shared VIP's owner (and its link down) until the client's neighbour
#             entry holds a survivor's MAC (heartbeat timeout + address add + gratuitous ARP);
#   handover: SIGTERM of a node until the other holds all its VIPs.
# Usage: bench/l2-failover.sh [RUNS] [INTERVAL TIMEOUT]...   (default: 10 runs of 100ms/400ms and 50ms/200ms)
# Needs root (network namespaces). Every run is bounded: the test's own deadlines stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
shift || true
configs=("$@")
((${#configs[@]})) || configs=(100ms 400ms 50ms 200ms)
cargo test -q -p ringlb --test l2 --no-run 2>/dev/null
summary() { sort -n | awk '{a[NR]=$1} END {printf "min %d, median %d, max %d ms over %d runs", a[1], a[int((NR+1)/2)], a[NR], NR}'; }
for ((i = 0; i < ${#configs[@]}; i += 2)); do
  interval=${configs[i]} timeout=${configs[i + 1]}
  out=$(mktemp)
  failed=0
  for ((r = 0; r < runs; r++)); do
    log=$(RINGLB_L2_INTERVAL=$interval RINGLB_L2_TIMEOUT=$timeout \
      cargo test -q -p ringlb --test l2 -- --nocapture --test-threads 1 2>&1) || failed=$((failed + 1))
    grep -oE '(failover|handover): [0-9]+' <<<"$log" >>"$out" || true
  done
  echo "--l2-interval $interval --l2-timeout $timeout"
  echo "  failover (SIGKILL + link down -> client follows): $(grep '^failover' "$out" | awk '{print $2}' | summary)"
  echo "  handover (SIGTERM -> peer holds the VIPs):         $(grep '^handover' "$out" | awk '{print $2}' | summary)"
  echo "  failed runs: $failed of $runs"
  rm -f "$out"
done
