"""Shared definitions of the comparison runner: addresses, services, workloads, child processes.

Purpose: the fixed lab layout (which loopback address each peer listens on, which backend serves
which service) and the tracker of every process the runner starts.
Never: signal a process the runner did not spawn (each child leads its own process group and only
those groups are signalled).
Invariants: every address here is in 127.0.0.0/8.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "target/release/ringlb-bench"
RINGLB = REPO / "target/release/ringlb"

BACKEND_IP = "127.0.0.2"
PEER_IPS = {
    "direct": BACKEND_IP,
    "ringlb": "127.0.0.10",
    "haproxy": "127.0.0.11",
    "nginx": "127.0.0.12",
    "envoy": "127.0.0.13",
    "nftnat": "127.0.0.14",
}
ALL_PEERS = list(PEER_IPS)
NFT_TABLE = "ringlb_compare"
GEN_CPU = "0"
BACKEND_CPU = "1"
WORKERS = 2


@dataclass(frozen=True)
class Svc:
    """One service every peer fronts: frontend port offset, protocol and backend kind."""

    name: str
    proto: str  # tcp | udp
    offset: int
    backend: str  # ringlb-bench serve KIND, or "nginx-http"


SERVICES = [
    Svc("echo", "tcp", 0, "tcp-echo"),
    Svc("sink", "tcp", 1, "tcp-sink"),
    Svc("uecho", "udp", 3, "udp-echo"),
    Svc("usink", "udp", 4, "udp-sink"),
    Svc("http", "tcp", 80, "nginx-http"),
]
SVC = {s.name: s for s in SERVICES}


@dataclass(frozen=True)
class Workload:
    name: str
    svc: str
    kind: str  # bulk | rr | crr | idle | dgram | http
    args: tuple[str, ...] = ()
    desc: str = ""


WORKLOADS = [
    Workload(
        "tcp-stream-1",
        "sink",
        "bulk",
        ("tcp-stream", "--streams", "1", "--size", "131072"),
        "bulk TCP upload, 1 stream, 128 KiB writes, into `serve tcp-sink`",
    ),
    Workload(
        "tcp-stream-8",
        "sink",
        "bulk",
        ("tcp-stream", "--streams", "8", "--size", "131072"),
        "bulk TCP upload, 8 streams, 128 KiB writes",
    ),
    Workload(
        "tcp-rr-1",
        "echo",
        "rr",
        ("tcp-rr", "--connections", "1", "--message-size", "64"),
        "64 B ping-pong, 1 persistent connection (pure latency)",
    ),
    Workload(
        "tcp-rr-32",
        "echo",
        "rr",
        ("tcp-rr", "--connections", "32", "--message-size", "64"),
        "64 B ping-pong, 32 persistent connections (latency under load)",
    ),
    Workload(
        "tcp-crr",
        "echo",
        "crr",
        ("tcp-crr", "--connections", "32", "--message-size", "64", "--source-ips", "64"),
        # --source-ips: otherwise the generator's connect() spends a third of its CPU walking ports
        # held by TIME_WAIT (bench/README.md), which would cap every peer at the generator's limit.
        "connect, 64 B request/response, close (FIN); 32 in flight; client sources 127.0.0.1-64",
    ),
    Workload(
        "tcp-idle",
        "echo",
        "idle",
        ("tcp-idle", "--connections", "8000", "--source-ips", "64", "--ping-every", "2s", "--ping-bytes", "16"),
        # 8000: the proxy holds two descriptors per connection under the machine's 20,000 limit.
        "8000 connections held, 16 B echoed on each every 2 s; the proxy's RSS per connection",
    ),
    Workload(
        "udp-rr-1",
        "uecho",
        "rr",
        ("udp-rr", "--flows", "1", "--message-size", "64"),
        "64 B datagram ping-pong, 1 flow",
    ),
    Workload(
        "udp-stream",
        "usink",
        "dgram",
        ("udp-stream", "--flows", "8", "--message-size", "64"),
        "64 B datagram blast, 8 flows, unpaced; received rate counted by the sink",
    ),
    Workload(
        "udp-stream-500k",
        "usink",
        "dgram",
        ("udp-stream", "--flows", "8", "--message-size", "64", "--gso", "16", "--rate", "500000"),
        "64 B datagrams offered at 500k/s over 8 flows; the generator sends them 16 per UDP GSO send "
        "(the unpaced one-thread generator tops out near direct's rate, below 2.5x NGINX's)",
    ),
    Workload(
        "http-keepalive",
        "http",
        "http",
        ("keepalive",),
        "wrk -t1 -c32 keep-alive GETs of a 1 KiB file from an NGINX backend",
    ),
    Workload(
        "http-close",
        "http",
        "http",
        ("close",),
        "wrk -t1 -c32 -H 'Connection: close': one TCP connection per request",
    ),
]
WL = {w.name: w for w in WORKLOADS}

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"max":%.1f,"mean":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Process tracking: only what we spawned, by process group, always under a deadline.
# ---------------------------------------------------------------------------------------------


class Procs:
    """Children started by this runner; each leads its own process group so its own children
    (NGINX workers, the envoy wrapper's binary) go with it and nothing else does."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.cleanup_hooks: list = []  # e.g. deleting the nftables table; run once at cleanup

    def spawn(self, cmd: list[str], log_path: Path, **kw) -> subprocess.Popen:
        logf = open(log_path, "ab")
        p = subprocess.Popen(
            cmd,
            stdout=kw.pop("stdout", logf),
            stderr=logf,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=raise_nofile,
            **kw,
        )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 3.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        else:
            # The leader is gone; its group (e.g. nginx workers) may not be.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p in self.procs:
            self.procs.remove(p)

    def cleanup(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p, grace=2.0)
        hooks, self.cleanup_hooks = self.cleanup_hooks, []
        for hook in hooks:
            hook()


def raise_nofile() -> None:
    # Root may raise the hard limit (not in every container: then soft = hard). The proxies' connection
    # limits are derived from the result (HAProxy refuses to start without 2 x maxconn descriptors).
    for want in (1048576, 262144):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            continue
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def nofile() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1048576 if soft == resource.RLIM_INFINITY else soft


PROCS = Procs()


def on_signal(signum, _frame) -> None:
    log(f"signal {signum}: cleaning up")
    PROCS.cleanup()
    sys.exit(128 + signum)


def run_cmd(cmd: list[str], timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, timeout=timeout, check=check, text=True, capture_output=True, **kw)
