#!/usr/bin/env python3
"""Many VIPs: how long ringlb takes from start to serving N Services with one VIP:port each.

Writes a manifest of N Services (external IPs 127.4.x.y, all on one port) with one EndpointSlice
each whose endpoint is a `ringlb-bench serve tcp-echo` (or `udp-echo`) backend, starts `ringlb
run --manifests` on it, and reports the seconds to `/readyz` 200 and until the first and the last
VIP echo a byte, with the listening sockets and descriptors `/status` shows. Every step is bounded
by --timeout.

    bench/many-vips.py --services 10000 [--protocol udp] [--ringlb target/release/ringlb] [--rounds 3] [-- ARGS]

ARGS go to `ringlb run` (e.g. `--listeners exact`, `--workers 1`).
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKEND = ("127.0.0.1", 19000)
ADMIN = "127.0.0.1:19998"


def vip(i: int) -> str:
    return f"127.4.{i // 250}.{i % 250 + 1}"


def manifest(services: int, port: int, protocol: str) -> str:
    docs = []
    for i in range(services):
        docs.append(
            f"""apiVersion: v1
kind: Service
metadata: {{name: s{i}, namespace: default}}
spec:
  clusterIP: 10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}
  externalIPs: ["{vip(i)}"]
  ports:
  - {{name: http, port: {port}, protocol: {protocol}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: s{i}-1
  namespace: default
  labels: {{kubernetes.io/service-name: s{i}}}
addressType: IPv4
ports:
- {{name: http, port: {BACKEND[1]}, protocol: {protocol}}}
endpoints:
- addresses: ["{BACKEND[0]}"]
  conditions: {{ready: true}}
"""
        )
    return "---\n".join(docs)


def echoes(address: str, port: int, protocol: str) -> bool:
    if protocol == "UDP":
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                # Connected: a reply from any other source than the VIP is not received.
                s.connect((address, port))
                s.settimeout(0.2)
                s.send(b"x")
                return s.recv(16) == b"x"
        except OSError:
            return False
    try:
        with socket.create_connection((address, port), timeout=1) as s:
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


def one_round(
    ringlb: str, path: Path, services: int, port: int, protocol: str, extra: list[str], timeout: float
) -> dict:
    t0 = time.monotonic()
    log = open(path.parent / "ringlb.log", "w")
    cmd = [ringlb, "run", "--manifests", str(path), "--admin", ADMIN, "--log-level", "warn", *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    result = {"ready_s": None, "first_served_s": None, "last_served_s": None}
    try:
        while time.monotonic() - t0 < timeout and result["ready_s"] is None:
            try:
                if urllib.request.urlopen(f"http://{ADMIN}/readyz", timeout=1).status == 200:
                    result["ready_s"] = time.monotonic() - t0
            except OSError:
                time.sleep(0.01)
        for name, address in (("first_served_s", vip(0)), ("last_served_s", vip(services - 1))):
            while time.monotonic() - t0 < timeout:
                if echoes(address, port, protocol):
                    result[name] = time.monotonic() - t0
                    break
                time.sleep(0.01)
        status = json.load(urllib.request.urlopen(f"http://{ADMIN}/status", timeout=5))
        result["entries"] = status["snapshot"]["entries"]
        result["listeners"] = sum(w["listeners"] for w in status["workers"])
        result["descriptors"] = sum(w["descriptors"] for w in status["workers"])
        result["workers"] = len(status["workers"])
    finally:
        p.terminate()
        p.wait(40)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--protocol", choices=["tcp", "udp"], default="tcp")
    ap.add_argument("--ringlb", default=str(REPO / "target/release/ringlb"))
    ap.add_argument("--bench", default=str(REPO / "target/release/ringlb-bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds each round may take at most")
    ap.add_argument("args", nargs="*", help="extra arguments of `ringlb run` (after --)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "services.yaml"
        protocol = a.protocol.upper()
        path.write_text(manifest(a.services, a.port, protocol))
        backend = subprocess.Popen(
            [a.bench, "serve", f"{a.protocol}-echo", "--listen", f"{BACKEND[0]}:{BACKEND[1]}", "--threads", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            rounds = [
                one_round(a.ringlb, path, a.services, a.port, protocol, a.args, a.timeout) for _ in range(a.rounds)
            ]
        finally:
            backend.terminate()
            backend.wait(10)
    print(json.dumps({"services": a.services, "protocol": protocol, "ringlb_args": a.args, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
