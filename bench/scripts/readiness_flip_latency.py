#!/usr/bin/env python3
"""How long a manifest edit that flips readiness takes to reach new connections.

Starts four loopback backends (127.0.0.51..54:19500) that answer their name, runs
`ringlb run --manifests` on a Service with VIP 127.0.0.50:9500, then 10 times saves (rename over) a
manifest that swaps which endpoint is not ready, and measures until six new connections in a row no
longer reach the endpoint that turned not ready. Usage (from a temp dir; it writes m.yaml there):

    cd "$(mktemp -d)" && python3 /path/to/bench/scripts/readiness_flip_latency.py /path/to/target/release/ringlb
"""
import socket, threading, time, subprocess, os, sys
# Backends: 127.0.0.51..54:19500 answering their name.
def backend(ip, name):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, 19500)); s.listen(128)
    while True:
        c, _ = s.accept(); c.sendall(name.encode() + b"\n"); c.close()
for i in range(4):
    threading.Thread(target=backend, args=(f"127.0.0.{51+i}", f"b{i+1}"), daemon=True).start()
def manifest(ready):
    eps = "".join(f'- addresses: ["127.0.0.{51+i}"]\n  conditions: {{ready: {str(r).lower()}}}\n' for i, r in enumerate(ready))
    return f"""apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  externalIPs: ["127.0.0.50"]
  ports: [{{name: http, port: 9500, targetPort: 19500}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 19500, protocol: TCP}}]
endpoints:
{eps}"""
def save(text):
    open("m.yaml.tmp", "w").write(text); os.rename("m.yaml.tmp", "m.yaml")
save(manifest([True, True, True, False]))
p = subprocess.Popen([sys.argv[1], "run", "--manifests", "m.yaml", "--admin", "off"], stderr=subprocess.DEVNULL)
def get():
    c = socket.create_connection(("127.0.0.50", 9500), timeout=2); d = c.recv(16).decode().strip(); c.close(); return d
for _ in range(200):
    try: get(); break
    except OSError: time.sleep(0.02)
lat = []
for trial in range(10):
    flip = trial % 2 == 0
    ready = [not flip, True, True, flip]
    t0 = time.monotonic(); save(manifest(ready))
    want_absent = "b1" if flip else "b4"
    while True:
        names = {get() for _ in range(6)}
        if want_absent not in names: break
    lat.append((time.monotonic() - t0) * 1000)
p.terminate(); p.wait()
print("flip latency ms:", " ".join(f"{x:.0f}" for x in lat), "max", f"{max(lat):.0f}")
