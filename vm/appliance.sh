#!/usr/bin/env bash
# The appliance package's unit started by real systemd: Debian 12's systemd 252 runs as PID 1 (of a
# PID namespace) inside the micro-VM, starts the packaged ringlb.service, and a request to its VIP
# on port 80 must reach a backend. Exits 0 only if every check in the guest passed.
#
#   vm/appliance.sh [--binary PATH] [run.sh options]     # PATH default: target/debug/ringlb
#
# What systemd applies here and no other test can: the whole unit as written, its sandbox
# (ProtectSystem=, PrivateTmp=, namespaces, RestrictAddressFamilies=...) and its seccomp filter as
# systemd compiles it, LimitNOFILE=1048576 (the guest is root with every capability), the user from
# User=. The guest has no dpkg, adduser or perl: the package is unpacked with dpkg-deb and the user
# added as the postinst would; `dpkg -i` and the postinst itself are tested by
# ringlb/tests/appliance.rs. systemd's own units that need programs the guest lacks fail noisily
# in its log, which is shown only when a check fails.
set -euo pipefail
# shellcheck source=vm/lib.sh
source "$(dirname "$0")/lib.sh"

binary=${CARGO_TARGET_DIR:-$VM_REPO_DIR/target}/debug/ringlb
if [[ ${1:-} == --binary ]]; then
  binary=$2
  shift 2
fi
vm_need systemd-analyze systemd   # the host's systemd is what the guest runs
vm_need dpkg-deb dpkg

work=$(mktemp -d /tmp/ringlb-appliance.XXXXXX)
trap 'rm -rf "$work"' EXIT
deb=$("$VM_REPO_DIR/deploy/debian/build-deb.sh" --binary "$binary" --out "$work")
dpkg-deb -x "$deb" "$work/tree"

cat >"$work/guest.sh" <<'GUEST'
set -u
work=$(dirname "$0")
fail() {
  echo "appliance: FAIL: $*"
  echo "--- systemd's log (ringlb lines)"; grep -i ringlb "$work/systemd.log" | tail -30
  exit 1
}
in_systemd() { nsenter -t "$systemd" -m -p -- "$@"; }
# Install as dpkg would have: the files, then the postinst's user.
cp -a "$work/tree/." /
echo 'ringlb:x:999:999:ringlb load balancer:/nonexistent:/bin/false' >>/etc/passwd
echo 'ringlb:x:999:' >>/etc/group
# A backend, and a manifest whose VIP is on port 80 (CAP_NET_BIND_SERVICE, granted by the unit).
mkdir -p /www && echo backend-one >/www/index.html
httpd -p 127.0.0.21:8081 -h /www || fail "backend httpd"
cat >/etc/ringlb/manifests/web.yaml <<'YAML'
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  externalIPs: ["127.0.0.10"]
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc12, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8081, protocol: TCP}]
endpoints: [{addresses: ["127.0.0.21"], conditions: {ready: true}}]
YAML
# systemd in a container-like PID namespace of its own, starting just the unit (and its defaults).
export container=ringlb-vm
unshare --pid --fork --mount --mount-proc /usr/lib/systemd/systemd --system --unit=ringlb.service \
  --log-target=console --show-status=no >"$work/systemd.log" 2>&1 &
unshare_pid=$!
# Polls the admin endpoint (a real condition), bounded: emulated systemd takes seconds to start.
tries=0
until wget -qO- http://127.0.0.1:9901/readyz >/dev/null 2>&1; do
  kill -0 "$unshare_pid" 2>/dev/null || fail "systemd ended"
  tries=$((tries + 1))
  [ "$tries" -lt 600 ] || fail "ringlb.service never answered /readyz"
  sleep 0.1
done
# systemd is unshare's child (busybox has no pgrep).
systemd=
for file in /proc/[0-9]*/status; do
  grep -q "^PPid:[[:space:]]*$unshare_pid\$" "$file" && systemd=${file#/proc/} && systemd=${systemd%/status}
done
[ -n "$systemd" ] || fail "no systemd process"
body=$(wget -qO- http://127.0.0.10:80/) || fail "GET through the VIP"
[ "$body" = backend-one ] || fail "the VIP answered $body"
echo "appliance: the VIP 127.0.0.10:80 reached the backend"

active=$(in_systemd /usr/bin/systemctl show ringlb.service -p ActiveState --value)
user=$(in_systemd /usr/bin/systemctl show ringlb.service -p User --value)
[ "$active $user" = "active ringlb" ] || fail "systemctl show ringlb: ActiveState, User = $active $user"
pid=$(pidof ringlb) || fail "no ringlb process"
status=/proc/$pid/status
expect() { grep -q "^$1:[[:space:]]*$2\$" "$status" || fail "$1 is $(grep "^$1:" "$status")"; }
expect Uid "999[[:space:]]*999[[:space:]]*999[[:space:]]*999"
expect CapEff 0000000000000400
expect CapAmb 0000000000000400
expect CapBnd 0000000000000400
expect NoNewPrivs 1
expect Seccomp 2
grep -q '^Max open files *1048576 *1048576' "/proc/$pid/limits" || fail "LimitNOFILE: $(grep 'open files' "/proc/$pid/limits")"
echo "appliance: systemd runs ringlb.service (active) as ringlb with CAP_NET_BIND_SERVICE only, seccomp and 1048576 descriptors"

in_systemd /usr/bin/systemctl stop ringlb.service || fail "systemctl stop"
result=$(in_systemd /usr/bin/systemctl show ringlb.service -p Result --value)
exit_status=$(in_systemd /usr/bin/systemctl show ringlb.service -p ExecMainStatus --value)
[ "$result $exit_status" = "success 0" ] || fail "after stop: Result, ExecMainStatus = $result $exit_status"
echo "appliance: systemctl stop: ringlb exited 0"
echo "appliance: PASS"
GUEST

"$VM_SCRIPTS_DIR/run.sh" --timeout 240 "$@" --add "$work" --add /usr/lib/systemd/systemd \
  --add /usr/lib/systemd/system --add /usr/bin/systemctl --add /usr/bin/unshare --add /usr/bin/nsenter \
  --add "$(ldconfig -p | sed -n 's/.*libgcc_s.so.1 (libc6,x86-64) => //p' | head -n 1)" \
  -- /bin/sh "$work/guest.sh"
