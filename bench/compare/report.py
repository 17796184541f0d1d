"""Aggregation and reporting of the comparison: medians, ratios, issue-3 targets, markdown, plots.

Purpose: turn per-run results into the RESULTS.md tables and the PNG plots.
Never: invent a figure: a peer/workload not measured shows why (not applicable, failed) instead.
Invariants: every figure is a median over the rounds that succeeded; ratios use medians.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from common import BACKEND_CPU, BACKEND_IP, GEN_CPU, NFT_TABLE, PEER_IPS, REPO, SVC, WL, WORKERS
from peers import Lab, ensure_matplotlib


def brief(res: dict) -> dict:
    return {
        k: res.get(k)
        for k in ("rate", "unit", "p99", "errors", "proxy_cores", "machine_cores", "error")
        if res.get(k) is not None
    }


def fmt_num(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


# ---------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------

METRICS = [
    "rate",
    "p50",
    "p90",
    "p99",
    "p999",
    "max",
    "errors",
    "loss",
    "proxy_cores",
    "cpu_per_gb",
    "cpu_per_10k_conn",
    "machine_cores",
    "machine_cpu_per_gb",
    "machine_cpu_per_10k_conn",
    "machine_kernel_cores",
    "machine_kernel_cpu_per_gb",
    "machine_kernel_cpu_per_10k_conn",
    "proxy_user_cores",
    "proxy_user_pct",
    "client_cores",
    "listen_drops",
    "udp_rcvbuf_drops",
    "kib_per_conn",
    "alive_at_end",
]


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
    if unit in ("Gbit/s", "KiB/conn"):
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
        "cc": sh("sysctl -n net.ipv4.tcp_congestion_control"),
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
        "ringlb": sh(f"cd {REPO} && git rev-parse --short HEAD")
        + " ("
        + sh(f"cd {REPO} && git log -1 --format=%s")
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
    ("Idle TCP connection memory (tcp-idle): below every proxy's", "tcp-idle", "kib_per_conn", 1.0, "best-proc"),
    ("UDP 64 B datagrams received: ≥ 2.5x NGINX, loss < 5 %", "udp-stream", "rate", 2.5, "nginx"),
    (
        "UDP 64 B datagrams offered at 500k/s: ≥ 2.5x NGINX, loss < 5 %",
        "udp-stream-500k",
        "rate",
        2.5,
        "nginx",
    ),
    ("UDP ping-pong: added p99 ≤ 0.6x best peer's", "udp-rr-1", "added_p99", 0.6, "best"),
    (
        "Proxy CPU-s per GB (tcp-stream-8): ≤ 0.6x best proxy's",
        "tcp-stream-8",
        "cpu_per_gb",
        0.6,
        "best-proc",
    ),
    (
        "Proxy CPU-s per GB (tcp-stream-1): ≤ 0.6x best proxy's",
        "tcp-stream-1",
        "cpu_per_gb",
        0.6,
        "best-proc",
    ),
    (
        "Proxy CPU-s per 10k connections (tcp-crr): ≤ 0.6x best proxy's",
        "tcp-crr",
        "cpu_per_10k_conn",
        0.6,
        "best-proc",
    ),
    (
        "Proxy CPU-s per 10k connections (http-close): ≤ 0.6x best proxy's",
        "http-close",
        "cpu_per_10k_conn",
        0.6,
        "best-proc",
    ),
]


def evaluate_targets(agg: dict, peers: list[str]) -> list[dict]:
    out = []
    others = [p for p in peers if p != "direct" and not p.startswith("ringlb")]
    for label, wl, kind, thr, ref in TARGETS:
        row = {"label": label, "workload": wl, "status": "n/a", "detail": ""}
        rl = agg.get((wl, "ringlb"), {}).get("med", {})
        d = agg.get((wl, "direct"), {}).get("med", {})
        if kind == "rate":
            row["vs_direct"] = fmt_ratio(ratio(rl.get("rate"), d.get("rate")))
        elif kind == "added_p99" and rl.get("p99") is not None and d.get("p99") is not None:
            row["vs_direct"] = f"p99 {rl['p99']:.0f} vs {d['p99']:.0f} us"
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
            if wl.startswith("udp-stream"):
                loss = rl.get("loss")
                ok = ok and loss is not None and loss < 5.0
                row["detail"] = f"ringlb {mine:,.0f} vs {best} {bv:,.0f}; ringlb loss {fmt_num(loss, 1)} %"
            else:
                row["detail"] = (
                    f"ringlb {fmt_rate(mine, agg[(wl, 'ringlb')]['unit'])} vs {best} "
                    f"{fmt_rate(bv, agg[(wl, best)]['unit'])}"
                )
        else:
            # lower is better: the ratio is ringlb's over the best peer's (target: at most thr)
            unit = " us" if kind == "added_p99" else ""
            row["detail"] = f"ringlb {mine:.3g}{unit} vs {best} {bv:.3g}{unit}"
            if bv <= 0:
                # A proxy cannot really be faster than direct: a non-positive added p99 is noise in
                # direct's own p99, and no ratio can be judged from it.
                r, ok = None, None
                row["detail"] += " (the best peer's added p99 is within direct's noise: not judged)"
            else:
                r = mine / bv
                ok = r <= thr
        row.update(status="met" if ok else ("noise" if ok is None else "missed"), ratio=r, best=best)
        user = {p: v for p, v in cands.items() if p != "nftnat"}
        if user and best == "nftnat":
            ub = max(user, key=user.get) if higher_better else min(user, key=user.get)
            uv = user[ub]
            row["user"] = (ratio(mine, uv) if higher_better else (mine / uv if uv > 0 else None), ub)
        out.append(row)
    return out


def proxy_budget(agg: dict, targets: list[dict], cores: int) -> list[dict]:
    """For rate targets on CPU-bound workloads: how much CPU per operation the target leaves a proxy.

    With every core busy, a rate R allows the whole path `cores / R` of machine CPU per operation.
    The generator and the backend do the same work through a proxy as without one, so what `direct`
    costs per operation is already spent; the rest is the proxy's budget. A budget at or below zero
    asks a proxied operation to be cheaper than an unproxied one. Otherwise it is set against the
    cheapest proxy CPU per operation any measured proxy achieved, and against ringlb's kernel part
    alone (what is left if ringlb's own code cost nothing). Per-operation costs shift with load
    (more batching when saturated), so this is an estimate from medians of the same run, not a proof.
    Not applied to bulk (one stream is bound by its three-stage pipeline, not by CPU)."""
    rows = []
    for t in targets:
        wl = t["workload"]
        kind = WL[wl].kind if wl in WL else ""
        spec = next((x for x in TARGETS if x[0] == t["label"]), None)
        if spec is None or spec[2] != "rate" or kind == "bulk" or t.get("best") is None:
            continue
        d = agg.get((wl, "direct"), {}).get("med", {})
        best = agg.get((wl, t["best"]), {}).get("med", {})
        rl = agg.get((wl, "ringlb"), {}).get("med", {})
        if not d.get("rate") or not d.get("machine_cores") or not best.get("rate"):
            continue
        need = spec[3] * best["rate"]
        allowed = cores / need
        direct = d["machine_cores"] / d["rate"]
        proxies = {}
        for (w2, peer), a in agg.items():
            m = a.get("med", {})
            if w2 == wl and peer not in ("direct", "nftnat") and m.get("proxy_cores") and m.get("rate"):
                proxies[peer] = m["proxy_cores"] / m["rate"]
        cheapest = min(proxies, key=proxies.get) if proxies else None
        mine = proxies.get("ringlb")
        user = rl.get("proxy_user_pct")
        kernel_only = None if mine is None or user is None else mine * (1 - user / 100)
        budget = allowed - direct
        reach = budget > 0 and (cheapest is not None and proxies[cheapest] <= budget)
        rows.append(
            {
                "workload": wl,
                "unit": agg[(wl, "direct")]["unit"],
                "need": need,
                "best": t["best"],
                "allowed_us": allowed * 1e6,
                "direct_us": direct * 1e6,
                "budget_us": budget * 1e6,
                "cheapest": cheapest,
                "cheapest_us": proxies[cheapest] * 1e6 if cheapest else None,
                "ringlb_us": None if mine is None else mine * 1e6,
                "ringlb_kernel_us": None if kernel_only is None else kernel_only * 1e6,
                "reach": reach,
            }
        )
    return rows


def proxy_cpu_kernel_part(agg: dict, targets: list[dict]) -> list[dict]:
    """For the per-connection CPU targets: ringlb's kernel part alone against the target, i.e.
    whether any saving in ringlb's own code could meet it."""
    rows = []
    for t in targets:
        wl = t["workload"]
        spec = next((x for x in TARGETS if x[0] == t["label"]), None)
        if spec is None or spec[2] != "cpu_per_10k_conn" or t.get("best") is None:
            continue
        best = agg.get((wl, t["best"]), {}).get("med", {})
        rl = agg.get((wl, "ringlb"), {}).get("med", {})
        if best.get("cpu_per_10k_conn") is None or rl.get("cpu_per_10k_conn") is None:
            continue
        user = rl.get("proxy_user_pct") or 0.0
        rows.append(
            {
                "workload": wl,
                "need": spec[3] * best["cpu_per_10k_conn"],
                "best": t["best"],
                "ringlb": rl["cpu_per_10k_conn"],
                "user_pct": user,
                "kernel": rl["cpu_per_10k_conn"] * (1 - user / 100),
            }
        )
    return rows


def collect_meta(lab: Lab, started: str, elapsed: float, results: list[dict]) -> dict:
    """Everything the report needs besides the results, as plain data (saved in raw.json so the
    report can be rendered again later with `--rerender`)."""
    return {
        "started": started,
        "elapsed": elapsed,
        "machine": machine_info(),
        "tools": tool_versions(lab.envoy_bin),
        "peers": {
            name: {"cmd": lab.show(p.cmd), "note": p.note, "udp_bad": p.udp_bad, "ip": PEER_IPS[name]}
            for name, p in lab.peers.items()
        },
        "commands": {k: lab.show(v) for k, v in lab.commands.items()},
        "load_cmds": {
            r["workload"] + "|" + r["peer"]: lab.show(shlex.split(r["cmd"])) for r in results if "cmd" in r
        },
    }


def write_report(args, meta: dict, results, agg, targets, plot_files, profiles: list[dict]) -> str:
    mi, tv = meta["machine"], meta["tools"]
    started, elapsed = meta["started"], meta["elapsed"]
    mpeers = meta["peers"]
    peers = [p for p in args.peers if p in mpeers]
    L = []
    title = "Comparison results" + (" (QUICK / NOISY smoke run)" if args.quick else "")
    L.append(f"# {title}\n")
    L.append(
        f"Generated by `bench/compare/run.sh` on {started} UTC in {elapsed / 60:.1f} min. "
        f"{args.rounds} round(s) per peer and workload, peers interleaved, medians reported; "
        f"each run: {args.warmup:g} s warm-up + {args.duration:g} s measured.\n"
    )
    if args.label:
        L.append(f"> {args.label}\n")
    L.append("Command:\n")
    L.append("```sh\n" + args.command_line + "\n```\n")
    L.append("## Machine and tools\n")
    L.append(
        f"- machine: {mi['nproc']} CPUs, {mi['cpu']}, {mi['mem']} RAM; {mi['os']}; kernel {mi['kernel']}; "
        f"net.ipv4.tcp_tw_reuse={mi['tcp_tw_reuse']}, net.core.rmem_max={mi['rmem_max']}, "
        f"tcp_congestion_control={mi['cc']}"
    )
    L.append(f"- load before the run (uptime): {args.load_before}")
    for k, v in tv.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append("## Set-up\n")
    L.append(
        f"- Everything on loopback. Backends on {BACKEND_IP} pinned with `taskset -c {BACKEND_CPU}` "
        f"(`ringlb-bench serve ... --threads 1`; the HTTP backend is NGINX, `worker_processes 1`, a 1 KiB "
        f"file). The load generator (`ringlb-bench ... --threads 1`, or `wrk -t1`) is pinned with "
        f"`taskset -c {GEN_CPU}`. Proxies are not pinned and run {WORKERS} workers/threads each "
        f"(ringlb `--workers {WORKERS}`{'' if args.ringlb_pin else ' --no-pin'}, HAProxy `nbthread {WORKERS}`, "
        f"NGINX `worker_processes {WORKERS}` with `reuseport`, Envoy `--concurrency {WORKERS}`), so "
        "they share both cores with the generator and the backend."
    )
    L.append(
        "- Peers: "
        + ", ".join(f"`{p}` on {mpeers[p].get('ip', PEER_IPS.get(p))}" for p in peers)
        + ". All peers run for the whole session (an idle proxy costs nothing measurable), except that "
        "each `tcp-idle` run gets a freshly started peer, so it measures what holding the connections "
        "adds to a process that never held any (memory a process keeps after earlier connections "
        "would hide it); the nftables "
        f"table `{NFT_TABLE}` exists only during the `nftnat` runs, so conntrack does not tax the others."
    )
    L.append(
        "- Kernel NAT on loopback: packets a local process sends to a local address never pass "
        "`prerouting`, so the DNAT rule sits in a `nat` chain on the **output** hook; TCP and UDP both "
        "work (replies are un-NATed by conntrack, no SNAT needed)."
    )
    L.append(
        "- Proxy CPU: utime+stime from `/proc/PID/stat` of the proxy process and all its descendants "
        "(threads are included in a process's counters), sampled inside the measured window (minus a "
        "short margin at both ends) and divided by its length: `proxy cores` = cores busy in the proxy. "
        "CPU-s per GB = proxy cores / GB/s of payload moved (sent + received by the client); per 10k "
        "connections = proxy cores / connections/s × 10⁴. ringlb's figure includes any io_uring worker threads (`iou-wrk-*`) it has, since they are threads of its process. `machine cores` is all CPUs' busy time from "
        "`/proc/stat` over the same window (includes generator, backend and kernel NAT softirq work)."
    )
    L.append(
        "- Latency: tcp-rr/tcp-crr/udp-rr from `ringlb-bench` (hdrhistogram, closed loop), HTTP from wrk "
        "(closed loop). Added latency = peer p99 − direct p99 (medians)."
    )
    for p in peers:
        if mpeers[p]["note"]:
            L.append(f"- `{p}`: {mpeers[p]['note']}")
    L.append("")
    if args.notes:
        L.append("## Analysis\n")
        L.append(Path(args.notes).read_text().strip() + "\n")

    if any(t["status"] != "n/a" for t in targets):
        L.append("## Targets of issue 3\n")
        L.append(
            '"best peer" = the best of HAProxy, NGINX, Envoy and nftables DNAT that was measured '
            "(for CPU: the best proxy process).\n"
        )
        L.append(
            "| target | ratio to best peer | status | detail | ratio to best userspace proxy (when the best is "
            "nftnat) | ringlb vs direct |"
        )
        L.append("|---|---|---|---|---|---|")
        for t in targets:
            u = t.get("user")
            ucell = f"{fmt_ratio(u[0])} ({u[1]})" if u else ""
            L.append(
                f"| {t['label']} | {fmt_ratio(t.get('ratio'))} | **{t['status']}** | {t['detail']} | {ucell} | "
                f"{t.get('vs_direct', '')} |"
            )
        L.append("")

    budget = proxy_budget(agg, targets, int(mi.get("nproc") or 2))
    if budget:
        L.append("## What the rate targets leave a proxy\n")
        L.append(
            "With every core busy, a target rate R allows the whole path `cores / R` of machine CPU per "
            "operation. The generator and the backend do the same work with or without a proxy, so "
            "what `direct` costs per operation is spent already; the rest is the proxy's budget. Set "
            "against it: the cheapest proxy CPU per operation any measured proxy reached, and "
            "ringlb's kernel part alone (its cost if its own code were free: user-space CPU from "
            "`/proc/PID/stat`). Per-operation costs shift with load, so these are estimates from the "
            "medians of this run. Bulk is left out: one stream is bound by its three-stage pipeline "
            "(generator, proxy, sink), not by CPU.\n"
        )
        L.append(
            "| workload | target needs | machine CPU per op at all cores busy | direct's (no proxy) | "
            "left for the proxy | cheapest proxy measured | ringlb (kernel part alone) | within reach? |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for f in budget:
            cheapest = "–" if f["cheapest"] is None else f"{f['cheapest_us']:.1f} us ({f['cheapest']})"
            mine = "–" if f["ringlb_us"] is None else f"{f['ringlb_us']:.1f} us"
            if f["ringlb_kernel_us"] is not None:
                mine += f" ({f['ringlb_kernel_us']:.1f} us)"
            verdict = (
                "yes"
                if f["reach"]
                else ("**no**: cheaper than no proxy at all" if f["budget_us"] <= 0 else "**no**")
            )
            L.append(
                f"| {f['workload']} | {fmt_rate(f['need'], f['unit'])} ({f['best']} × target) | "
                f"{f['allowed_us']:.1f} us | {f['direct_us']:.1f} us | {f['budget_us']:.1f} us | {cheapest} | "
                f"{mine} | {verdict} |"
            )
        L.append("")
    kernel_part = proxy_cpu_kernel_part(agg, targets)
    if kernel_part:
        L.append(
            "The per-connection CPU targets, against ringlb's kernel part alone (what its connections "
            "cost the kernel: accept, connect, two TCP handshakes and teardowns, and on loopback the "
            "receiving side of every packet it sends):\n"
        )
        L.append("| workload | target: proxy CPU-s per 10k conn | ringlb | its user-space share | ringlb's kernel part alone | within reach by ringlb's code? |")
        L.append("|---|---|---|---|---|---|")
        for f in kernel_part:
            L.append(
                f"| {f['workload']} | ≤ {f['need']:.3f} (0.6 × {f['best']}) | {f['ringlb']:.3f} | "
                f"{f['user_pct']:.0f} % | {f['kernel']:.3f} | {'yes' if f['kernel'] <= f['need'] else '**no**'} |"
            )
        L.append("")

    L.append("## Results (medians)\n")
    for wname in args.workloads:
        w = WL[wname]
        d = agg.get((wname, "direct"), {}).get("med", {})
        r = agg.get((wname, "ringlb"), {}).get("med", {})
        unit = next(
            (agg[(wname, p)]["unit"] for p in peers if (wname, p) in agg and agg[(wname, p)]["unit"]), ""
        )
        L.append(f"### {wname}: {w.desc}\n")
        has_lat = w.kind not in ("bulk", "dgram")
        hdr = f"| peer | {unit} | vs direct | vs ringlb |" + (
            " p50 us | p99 us | p99.9 us | added p99 us |" if has_lat else ""
        )
        sep = "|---|---|---|---|" + ("---|---|---|---|" if has_lat else "")
        ncols = (8 if has_lat else 4) - 1
        extra = []
        if w.kind in ("dgram",) or w.svc == "uecho":
            extra.append(("loss %", "loss", 2))
        extra += [("errors", "errors", 0)]
        extra.append(
            ("UDP rcvbuf drops", "udp_rcvbuf_drops", 0)
            if SVC[w.svc].proto == "udp"
            else ("listen drops", "listen_drops", 0)
        )
        extra.append(("proxy cores", "proxy_cores", 2))
        extra.append(("proxy user %", "proxy_user_pct", 0))
        if w.kind == "bulk":
            extra += [("proxy CPU-s/GB", "cpu_per_gb", 3), ("machine CPU-s/GB", "machine_cpu_per_gb", 3)]
        if w.kind == "crr" or (w.kind == "http" and w.args[0] == "close"):
            extra += [
                ("proxy CPU-s/10k conn", "cpu_per_10k_conn", 3),
                ("machine CPU-s/10k conn", "machine_cpu_per_10k_conn", 3),
            ]
        hdr += "".join(f" {e[0]} |" for e in extra) + " runs |"
        sep += "---|" * (len(extra) + 1)
        L.append(hdr)
        L.append(sep)
        for p in peers:
            a = agg.get((wname, p))
            if a is None:
                why = mpeers[p]["udp_bad"].get(w.svc) or (
                    "did not start" if mpeers[p]["note"].startswith("did not") else "not run"
                )
                L.append(f"| {p} | {why} |" + " |" * (ncols + len(extra)))
                continue
            m = a["med"]
            if not a["runs"]:
                L.append(f"| {p} | failed: {a['failed'][0][:80]} |" + " |" * (ncols + len(extra)))
                continue
            added = (
                None if m.get("p99") is None or d.get("p99") is None or p == "direct" else m["p99"] - d["p99"]
            )
            cells = [
                p,
                fmt_rate(m.get("rate"), a["unit"]),
                fmt_ratio(ratio(m.get("rate"), d.get("rate"))),
                fmt_ratio(ratio(m.get("rate"), r.get("rate"))),
            ]
            if has_lat:
                cells += [
                    fmt_num(m.get("p50"), 1),
                    fmt_num(m.get("p99"), 1),
                    fmt_num(m.get("p999"), 1),
                    fmt_num(added, 1),
                ]
            cells += [fmt_num(m.get(e[1]), e[2]) for e in extra]
            cells.append(str(a["runs"]) + (f" ({len(a['failed'])} failed)" if a["failed"] else ""))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    if profiles:
        L.append("## Where the time goes (ringlb under `perf record -a -g`)\n")
        L.append(
            "One extra run per workload, not part of the medians (perf costs CPU). Full reports: "
            "`bench/results/profile-ringlb-*.txt`.\n"
        )
        for pr in profiles:
            L.append(f"### {pr['workload']}: {json.dumps(brief(pr['res']))}\n")
            L.append("CPU by command (whole machine):\n\n```\n" + "\n".join(pr["by_comm"][:10]) + "\n```\n")
            L.append("ringlb, hottest symbols:\n\n```\n" + "\n".join(pr["by_sym"][:15]) + "\n```\n")
    if plot_files:
        L.append("## Plots\n")
        for f in plot_files:
            L.append(f"![{f.stem}]({os.path.relpath(f, args.md.parent)})\n")
    L.append("## Exact command lines\n")
    L.append(
        "Peers and backends (configs generated by the runner; copies in "
        f"`{os.path.relpath(args.out / 'configs', REPO)}/`):\n"
    )
    L.append("```sh")
    for k, v in meta["commands"].items():
        L.append(f"# {k}\n{v}")
    for p in peers:
        L.append(f"# peer {p}\n{mpeers[p]['cmd']}")
    L.append("```\n")
    shown = "ringlb" if "ringlb" in peers else (peers[0] if peers else "")
    L.append(
        f"Load (one line per workload, shown against `{shown}`; other peers differ only in the target):\n"
    )
    L.append("```sh")
    for wname in args.workloads:
        if f"{wname}|{shown}" in meta["load_cmds"]:
            L.append(meta["load_cmds"][f"{wname}|{shown}"])
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
    colors = {
        "direct": "#555555",
        "ringlb": "#d62728",
        "haproxy": "#1f77b4",
        "nginx": "#2ca02c",
        "envoy": "#9467bd",
        "nftnat": "#ff7f0e",
    }
    # throughput bars, as a ratio to direct
    wls = [w for w in args.workloads]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    width = 0.8 / max(1, len(peers))
    for i, p in enumerate(peers):
        xs, ys, lo, hi = [], [], [], []
        for j, w in enumerate(wls):
            d = agg.get((w, "direct"), {}).get("med", {}).get("rate")
            v = agg.get((w, p), {}).get("med", {}).get("rate")
            if d and v is not None:
                runs = agg[(w, p)]["vals"]["rate"]
                xs.append(j + (i - (len(peers) - 1) / 2) * width)
                ys.append(v / d)
                lo.append((v - min(runs)) / d)
                hi.append((max(runs) - v) / d)
        # the whiskers span the rounds' min..max: the spread says how far to trust the median
        ax.bar(
            xs,
            ys,
            width,
            label=p,
            color=colors.get(p),
            yerr=[lo, hi],
            capsize=1.5,
            error_kw={"elinewidth": 0.6, "ecolor": "#333333"},
        )
    ax.set_xticks(range(len(wls)))
    ax.set_xticklabels(wls, rotation=20, ha="right")
    ax.axhline(1.0, color="black", lw=0.6, ls="--")
    ax.set_ylabel("throughput / direct (median; whiskers: min..max of rounds)")
    ax.set_title(
        "Throughput relative to direct (udp-stream: datagrams received)"
        + (" — QUICK/NOISY" if args.quick else "")
    )
    ax.legend(ncol=len(peers), fontsize=8, loc="upper right")
    fig.tight_layout()
    f = args.out / "throughput.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(f)

    # CPU cost per unit of work (proxy cores / rate), relative to ringlb's: lower is cheaper
    procs = [p for p in peers if p not in ("direct", "nftnat")]
    if "ringlb" in procs:
        fig, ax = plt.subplots(figsize=(12, 4.2))
        width = 0.8 / max(1, len(procs))
        for i, p in enumerate(procs):
            xs, ys = [], []
            for j, w in enumerate(wls):
                base = agg.get((w, "ringlb"), {}).get("med", {})
                m = agg.get((w, p), {}).get("med", {})
                if base.get("proxy_cores") and base.get("rate") and m.get("proxy_cores") and m.get("rate"):
                    xs.append(j + (i - (len(procs) - 1) / 2) * width)
                    ys.append((m["proxy_cores"] / m["rate"]) / (base["proxy_cores"] / base["rate"]))
            ax.bar(xs, ys, width, label=p, color=colors.get(p))
        ax.set_xticks(range(len(wls)))
        ax.set_xticklabels(wls, rotation=20, ha="right")
        ax.axhline(1.0, color="black", lw=0.6, ls="--")
        ax.set_ylabel("proxy CPU per unit of work / ringlb's")
        ax.set_title(
            "Proxy CPU cost per byte, request or connection, relative to ringlb (lower is cheaper)"
            + (" — QUICK/NOISY" if args.quick else "")
        )
        ax.legend(ncol=len(procs), fontsize=8, loc="upper right")
        fig.tight_layout()
        f = args.out / "cpu.png"
        fig.savefig(f, dpi=110)
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
                    ax.plot(
                        [i for i, _ in enumerate(pts)],
                        [v for _, v in pts],
                        marker="o",
                        label=p,
                        color=colors.get(p),
                    )
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
        plt.close(fig)
        files.append(f)
    return files
