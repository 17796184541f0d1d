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
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Python puts this script's directory first on sys.path, so the sibling modules import directly.
from common import (
    ALL_PEERS,
    BENCH,
    GEN_CPU,
    PEER_IPS,
    PROCS,
    REPO,
    SVC,
    WL,
    WRK_LUA,
    Workload,
    log,
    on_signal,
    raise_nofile,
    run_cmd,
)
from configs import nft_add, nft_delete, nft_ruleset
from peers import Lab, Peer, build, install, kernel_counters, machine_busy
from report import aggregate, brief, collect_meta, evaluate_targets, fmt_num, fmt_ratio, plot, write_report

# ---------------------------------------------------------------------------------------------
# One measured run
# ---------------------------------------------------------------------------------------------


def wrk_seconds(x: float) -> int:
    """wrk takes whole seconds only (`-d2.5s` makes it exit 1 without a word)."""
    return max(1, round(x))


def gen_cmd(lab: Lab, w: Workload, peer: str, warmup: float, duration: float) -> list[str]:
    svc = SVC[w.svc]
    target = lab.ports.target(svc, peer)
    if w.kind == "http":
        cmd = [
            "taskset",
            "-c",
            GEN_CPU,
            "wrk",
            "-t1",
            f"-c{lab.args.wrk_connections}",
            f"-d{wrk_seconds(duration)}s",
            "--timeout",
            "2s",
            "-s",
            str(lab.tmp / "json.lua"),
        ]
        if w.args[0] == "close":
            cmd += ["-H", "Connection: close"]
        return cmd + [f"http://{target}/small.html"]
    return [
        "taskset",
        "-c",
        GEN_CPU,
        str(BENCH),
        *w.args,
        "--target",
        target,
        "--duration",
        f"{duration:g}s",
        "--warmup",
        f"{warmup:g}s",
        "--threads",
        "1",
        "--json",
        "--quiet",
    ]


def run_one(lab: Lab, w: Workload, peer: Peer, warmup: float, duration: float) -> dict:
    cmd = gen_cmd(lab, w, peer.name, warmup, duration)
    if w.kind == "idle":
        for pid in peer.pids():
            cmd += ["--watch-pid", str(pid)]
    res: dict = {"workload": w.name, "peer": peer.name, "cmd": shlex.join(cmd)}
    if w.kind == "http" and warmup > 0:
        wcmd = [c if not c.startswith("-d") else f"-d{wrk_seconds(warmup)}s" for c in cmd]
        subprocess.run(wcmd, capture_output=True, timeout=warmup + 20)
        gen_warm = 0.0
    else:
        gen_warm = warmup if w.kind != "http" else 0.0
    # CPU is sampled inside the measured window (shrunk by a margin at both ends for start-up
    # jitter) and turned into a rate, so warm-up and connection set-up cost are left out.
    margin = min(0.25, duration / 10)
    k0 = kernel_counters()
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    PROCS.procs.append(p)
    deadline = t0 + warmup + duration + 20
    samples = []
    for at in (gen_warm + margin, gen_warm + duration - margin):
        while time.monotonic() < t0 + at and p.poll() is None:
            time.sleep(min(0.02, max(0.0, t0 + at - time.monotonic())))
        samples.append((time.monotonic(), peer.cpu_split(), machine_busy()))
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
            res["proxy_cores"] = (sum(c_b) - sum(c_a)) / span
            res["proxy_user_cores"] = (c_b[0] - c_a[0]) / span
        res["machine_cores"] = (m_b[0] - m_a[0]) / span
        res["machine_kernel_cores"] = ((m_b[0] - m_b[2]) - (m_a[0] - m_a[2])) / span
    if p.returncode != 0:
        res["error"] = f"exit {p.returncode}: {(err.strip() or out.strip())[-300:]}"
        return res
    try:
        if w.kind == "http":
            m = re.search(r"WRKJSON (\{.*\})", out)
            if not m:
                raise ValueError("no WRKJSON line")
            j = json.loads(m.group(1))
            secs = j["duration_us"] / 1e6
            errs = j["connect"] + j["read"] + j["write"] + j["status"] + j["timeout"]
            res.update(
                rate=j["requests"] / secs,
                unit="req/s",
                errors=errs,
                p50=j["p50"],
                p90=j["p90"],
                p99=j["p99"],
                p999=j["p999"],
                max=j["max"],
                gbytes_s=j["bytes"] / secs / 1e9,
                conns_s=(j["requests"] / secs) if w.args[0] == "close" else None,
                raw=j,
            )
        else:
            j = json.loads(out)
            lat = j.get("latency_us") or {}
            res.update(
                errors=j["errors_total"],
                p50=lat.get("p50"),
                p90=lat.get("p90"),
                p99=lat.get("p99"),
                p999=lat.get("p999"),
                max=lat.get("max"),
                gbytes_s=(j["bytes_sent"] + j["bytes_received"]) / j["duration_s"] / 1e9,
                client_cores=(j.get("client_cpu") or {}).get("cores_busy"),
                raw=j,
            )
            if w.kind == "bulk":
                res.update(rate=j["gbit_per_sec"], unit="Gbit/s")
            elif w.kind == "dgram":
                d = j["datagrams"]
                res.update(
                    rate=d["received_per_sec"],
                    unit="dgram/s recv",
                    loss=d["loss_percent"],
                    sent_s=d["sent_per_sec"],
                )
            elif w.kind == "idle":
                idle = j["idle"]
                proxy = idle.get("proxy") or {}
                # The generator samples the proxy over the hold itself (opening comes first and
                # takes a while, so the window sampled above would include it).
                res.update(
                    rate=proxy.get("kib_per_connection"),
                    unit="KiB/conn",
                    kib_per_conn=proxy.get("kib_per_connection"),
                    proxy_cores=proxy.get("cores_busy_hold"),
                    established=idle["established"],
                    alive_at_end=idle["alive_at_end"],
                )
                if idle["established"] < idle["requested"] or idle["alive_at_end"] < idle["established"]:
                    res["error"] = (
                        f"{idle['established']} of {idle['requested']} established, "
                        f"{idle['alive_at_end']} alive at the end"
                    )
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
        if res.get("proxy_user_cores") is not None and pc > 0:
            res["proxy_user_pct"] = 100.0 * res["proxy_user_cores"] / pc
    for cores, per_gb, per_10k in (
        ("machine_cores", "machine_cpu_per_gb", "machine_cpu_per_10k_conn"),
        ("machine_kernel_cores", "machine_kernel_cpu_per_gb", "machine_kernel_cpu_per_10k_conn"),
    ):
        mc = res.get(cores)
        if mc is None:
            continue
        if res.get("gbytes_s"):
            res[per_gb] = mc / res["gbytes_s"]
        if res.get("conns_s"):
            res[per_10k] = mc / res["conns_s"] * 1e4
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
                    results.append(
                        {"workload": wname, "peer": pname, "round": r, "error": "peer process died"}
                    )
                    continue
                if w.kind == "idle":
                    # Memory a process keeps from earlier connections would be reused and hide what
                    # holding them costs: each idle run measures a fresh process.
                    lab.restart_peer(pname)
                    peer = lab.peers[pname]
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
                    f"{fmt_num(res.get('rate'))} {res.get('unit', '')} p99={res.get('p99')} "
                    f"err={res.get('errors')} proxy_cores={fmt_num(res.get('proxy_cores'))}"
                )
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
                r = run_cmd(
                    [
                        "perf",
                        "report",
                        "-i",
                        str(data),
                        "--stdio",
                        "--no-children",
                        "-g",
                        "none",
                        "--percent-limit",
                        "0.7",
                        *extra,
                    ],
                    300,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return ["(perf report timed out)"]
            return [ln.rstrip() for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")][:25]

        by_comm = report("--sort", "comm")
        by_sym = report("--sort", "dso,sym", "--pid", str(peer.proc.pid), "--percentage", "relative")
        text = (
            f"# {wname} through ringlb under perf record -a -g -F 499\n# run: {json.dumps(brief(res))}\n\n"
            "## CPU by command (whole machine)\n"
            + "\n".join(by_comm)
            + "\n\n## ringlb process, by symbol\n"
            + "\n".join(by_sym)
            + "\n"
        )
        (lab.args.out / f"profile-ringlb-{wname}.txt").write_text(text)
        out.append({"workload": wname, "res": res, "by_comm": by_comm, "by_sym": by_sym})
        log(f"profiled ringlb on {wname}: {lab.args.out}/profile-ringlb-{wname}.txt")
        data.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds; each runs every workload through every peer"
    )
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (not measured)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 round, 2 s runs, 0.5 s warm-up; the report is labelled noisy",
    )
    ap.add_argument(
        "--peers", default=",".join(ALL_PEERS), help="comma-separated subset of " + ",".join(ALL_PEERS)
    )
    ap.add_argument("--workloads", default=",".join(WL), help="comma-separated subset of " + ",".join(WL))
    ap.add_argument("--wrk-connections", type=int, default=32)
    ap.add_argument(
        "--base-port",
        type=int,
        default=7000,
        help="frontend ports base+{0,1,3,4,80}; backends on base+10000+...",
    )
    ap.add_argument(
        "--pause", type=float, default=0.3, help="seconds between runs (lets TIME_WAIT/queues settle)"
    )
    ap.add_argument(
        "--ringlb-pin",
        action="store_true",
        help="let ringlb pin its workers (default: --no-pin, " "like every other peer)",
    )
    ap.add_argument(
        "--ringlb-arg", action="append", default=[], help="extra argument for `ringlb run` (repeat)"
    )
    ap.add_argument("--md", type=Path, default=REPO / "bench/RESULTS.md", help="markdown report path")
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench/results", help="directory for plots, raw JSON, configs"
    )
    ap.add_argument("--label", default="", help="a note printed at the top of the report")
    ap.add_argument("--no-install", action="store_true", help="do not apt/pip install missing peers")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument(
        "--profile",
        default="",
        help="comma-separated workloads to run once more through ringlb "
        "under `perf record -a -g` after the rounds (e.g. tcp-stream-1,tcp-crr)",
    )
    ap.add_argument("--notes", default="", help="markdown file included as the report's Analysis section")
    ap.add_argument(
        "--rerender", default="", help="only render the report again from this raw.json (no install, no runs)"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="an extra ringlb peer `ringlb-NAME` (own VIP, interleaved right after ringlb) run with extra "
        "ARGS, e.g. copy='--relay copy'; ARGS starting with @PATH use another ringlb binary (A/B two builds)",
    )
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with configs and logs")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.duration, a.warmup = 1, 2.0, 0.5
        if a.pause == 0.3:
            a.pause = 0.2
    a.peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    a.variants = {}
    for i, v in enumerate(a.variant):
        name, _, rest = v.partition("=")
        if not re.fullmatch(r"[a-z0-9_]+", name) or i >= 20:
            ap.error(f"--variant {v!r}: NAME must be [a-z0-9_]+ (at most 20 variants)")
        peer = f"ringlb-{name}"
        PEER_IPS[peer] = f"127.0.0.{20 + i}"
        a.variants[peer] = shlex.split(rest)
        pos = a.peers.index("ringlb") + 1 + i if "ringlb" in a.peers else len(a.peers)
        a.peers.insert(pos, peer)
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


def save_configs(lab: Lab) -> None:
    tmp = lab.tmp
    cfgdir = lab.args.out / "configs"
    cfgdir.mkdir(parents=True, exist_ok=True)
    for f in (
        list(tmp.glob("*.yaml"))
        + list(tmp.glob("*.cfg"))
        + list(tmp.glob("*.json"))
        + list(tmp.glob("nginx-*/nginx.conf"))
    ):
        text = f.read_text().replace(str(tmp), "$TMP")
        name = f.name if f.parent == tmp else f"{f.parent.name}.conf"
        (cfgdir / name).write_text(text)
    (cfgdir / "nftables.nft").write_text(nft_ruleset(lab.ports))
    (cfgdir / "wrk-json.lua").write_text(WRK_LUA)


def render(args, meta: dict, results: list[dict], profiles: list[dict]) -> None:
    agg = aggregate(results)
    peers = [p for p in args.peers if p in meta["peers"]]
    targets = evaluate_targets(agg, peers)
    files = plot(args, agg, peers)
    args.md.write_text(write_report(args, meta, results, agg, targets, files, profiles))
    log(f"wrote {args.md} and {args.out}/ (run took {meta['elapsed'] / 60:.1f} min)")
    for t in targets:
        log(f"target {t['status']:6s} {fmt_ratio(t.get('ratio')):>7s}  {t['label']}  ({t['detail']})")


def rerender(args) -> int:
    """Render the report and plots again from a saved raw.json (e.g. after writing --notes)."""
    raw = json.loads(Path(args.rerender).read_text())
    saved = argparse.Namespace(**raw["args"])
    for k in ("md", "out", "notes"):
        setattr(saved, k, getattr(args, k))
    saved.md, saved.out = Path(saved.md), Path(saved.out)
    saved.out.mkdir(parents=True, exist_ok=True)
    render(saved, raw["meta"], raw["results"], raw.get("profiles") or [])
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.rerender:
        return rerender(args)
    args.command_line = "bench/compare/run.sh " + shlex.join(argv) if argv else "bench/compare/run.sh"
    if os.geteuid() != 0:
        print("run as root (apt installs, nftables, raising file limits)", file=sys.stderr)
        return 2
    raise_nofile()  # inherited by every child: generator, backends, proxies
    atexit.register(PROCS.cleanup)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
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
    save_configs(lab)
    meta = collect_meta(lab, started, elapsed, results)
    raw = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "meta": meta,
        "results": results,
        "profiles": profiles,
    }
    (args.out / "raw.json").write_text(json.dumps(raw, indent=1, default=str).replace(str(tmp), "$TMP"))
    render(args, meta, results, profiles)
    if args.keep_tmp:
        log(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
