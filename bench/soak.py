#!/usr/bin/env python3
"""Soak run: mixed legitimate load and injected faults against one release Portcullis,
loopback only, bounded in time. Driven by bench/soak.sh; see there for what it needs.

Legitimate load (each a thread, loops until the end):
  enrollments (a new device every ENROLL_EVERY s, portcullis-agent) and renewals
  (portcullis-agent renew --force), gateway requests checked against an OpenAPI document
  (valid bodies -> 200, a share of invalid ones -> 400), DNS over UDP, TCP, DoT and DoH
  with device certificates, firmware check-ins (TUF timestamp over mTLS).
Faults:
  the upstream HTTP backend killed and restarted; the DNS upstream stalling every name;
  kill -9 of Portcullis mid-run and a restart on the same data dir and ports; floods of
  idle TLS connections; slowloris on the device port and on DNS over TCP; garbage bytes
  on every listener.
Reports: outcomes by kind, errors that reached legitimate devices (outside the windows
where a fault makes them expected, and inside them), RSS and open descriptors over time
(CSV and a PNG plot), and after the restart: every certificate a client received is in
the registry with its event (0 lost).
"""

import argparse
import base64
import collections
import http.client
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import dns.message
import dns.query
import dns.rcode

ap = argparse.ArgumentParser()
ap.add_argument("--bin", required=True)
ap.add_argument("--agent", required=True)
ap.add_argument("--work", required=True)
ap.add_argument("--seconds", type=int, default=600)
ap.add_argument("--devices", type=int, default=16)
ap.add_argument("--out", required=True)
args = ap.parse_args()

W = args.work
DURATION = args.seconds
ENROLL_EVERY = 2.0
T0 = time.monotonic()
stop = threading.Event()
lock = threading.Lock()
outcomes = collections.Counter()  # (kind, outcome) -> n
legit_errors = collections.Counter()  # (kind, window, error) -> n
windows = []  # (name, start, end) in seconds since T0; end None while open
received_serials = []  # (device, serial, how)


def now():
    return time.monotonic() - T0


def open_window(name):
    with lock:
        windows.append([name, now(), None])
        return len(windows) - 1


def close_window(i, grace=2.0):
    with lock:
        windows[i][2] = now() + grace


def window_at(t, kinds):
    with lock:
        for name, a, b in windows:
            if name in kinds and a <= t and (b is None or t <= b):
                return name
    return None


# Which faults make which legitimate errors expected.
EXPECTED = {
    "gateway": {"restart", "backend_down"},
    "enroll": {"restart"},
    "renew": {"restart"},
    "firmware": {"restart"},
    "dns_udp": {"restart", "dns_stall"},
    "dns_tcp": {"restart", "dns_stall"},
    "dns_dot": {"restart", "dns_stall"},
    "dns_doh": {"restart", "dns_stall"},
}


def record(kind, ok, err=None, expected_status=False):
    t = now()
    with lock:
        if ok:
            outcomes[(kind, "ok" if not expected_status else "rejected as expected")] += 1
            return
    w = window_at(t, EXPECTED.get(kind, set()))
    with lock:
        outcomes[(kind, f"error during {w}" if w else "error")] += 1
        legit_errors[(kind, w or "-", str(err)[:80])] += 1


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


PORTS = {k: free_port() for k in ("dev", "adm", "dns", "dot", "backend", "upstream")}
DATA = os.path.join(W, "data")

# ---------------------------------------------------------------- the backend and DNS upstream
BACKEND = r'''
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _ok(self):
        n = int(self.headers.get("content-length") or 0)
        if n: self.rfile.read(n)
        body = b'{"ok":true}'
        self.send_response(200); self.send_header("content-type","application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = _ok
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''
UPSTREAM = r'''
import socket, sys, threading, time, os
import dns.message, dns.rrset, dns.rcode
port, stall_flag = int(sys.argv[1]), sys.argv[2]
def answer(wire):
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    name = q.question[0].name.to_text()
    if os.path.exists(stall_flag):
        time.sleep(5)
    if name.endswith("soak.test."):
        r.answer.append(dns.rrset.from_text(name, 1, "IN", "A", "192.0.2.7"))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", port))
def serve_udp():
    while True:
        data, src = u.recvfrom(4096)
        threading.Thread(target=lambda d=data, s=src: u.sendto(answer(d), s), daemon=True).start()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("127.0.0.1", port)); t.listen(128)
def serve_tcp(c):
    try:
        while True:
            n = c.recv(2)
            if len(n) < 2: return
            m = b""
            while len(m) < int.from_bytes(n, "big"): m += c.recv(int.from_bytes(n, "big") - len(m))
            out = answer(m); c.sendall(len(out).to_bytes(2, "big") + out)
    except OSError: pass
def accept():
    while True:
        c, _ = t.accept(); threading.Thread(target=serve_tcp, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
serve_udp()
'''
procs = {}


def start_backend():
    procs["backend"] = subprocess.Popen([sys.executable, "-c", BACKEND, str(PORTS["backend"])])


STALL_FLAG = os.path.join(W, "stall")


def start_upstream():
    procs["upstream"] = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(PORTS["upstream"]), STALL_FLAG])


OPENAPI = {
    "openapi": "3.0.3",
    "info": {"title": "soak", "version": "1"},
    "paths": {
        "/api/devices/{device}/telemetry": {
            "post": {
                "parameters": [{"name": "device", "in": "path", "required": True, "schema": {"type": "string"}}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["temp"],
                                "properties": {"temp": {"type": "number", "minimum": -50, "maximum": 100}},
                            }
                        }
                    },
                },
                "responses": {"200": {"description": "ok"}},
            }
        }
    },
}

CONFIG = f"""
[device]
max_connections = 4000

[pki]
# Each device renews every 30 s here (20 times in the run), far beyond a real fleet's
# once per lifetime and the default limit of 10 per hour.
reenroll_limit = {{ count = 1000, per = "1h" }}

[[gateway.routes]]
prefix = "/api/"
upstream = "http://127.0.0.1:{PORTS['backend']}"
openapi = "{W}/api.json"
bind_device = ["/api/devices/{{device}}"]

[dns]
upstreams = ["127.0.0.1:{PORTS['upstream']}"]
upstream_timeout = "1s"
default_policy = "fleet"
per_client = {{ per_second = 5000, burst = 5000 }}
unknown_clients = "fleet"

[[dns.policies]]
name = "fleet"
mode = "blocklist"
deny = ["blocked.soak.test"]
"""

server = {"proc": None}


def start_portcullis():
    err = open(os.path.join(W, "portcullis.err"), "a")
    p = subprocess.Popen(
        [args.bin, "--config", os.path.join(W, "portcullis.toml"), "--data-dir", DATA, "up",
         "--device-addr", f"127.0.0.1:{PORTS['dev']}", "--admin-addr", f"127.0.0.1:{PORTS['adm']}",
         "--dns-addr", f"127.0.0.1:{PORTS['dns']}", "--dot-addr", f"127.0.0.1:{PORTS['dot']}"],
        stdout=subprocess.PIPE, stderr=err, env={**os.environ, "PORTCULLIS_LOG": "warn"}, text=True)
    for line in p.stdout:
        if "admin API" in line:
            break
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    server["proc"] = p


def cli(*a):
    return subprocess.run([args.bin, "--data-dir", DATA, *a], capture_output=True, text=True, check=True).stdout


def admin_get(path):
    token = open(os.path.join(DATA, "admin.token")).read().strip()
    c = http.client.HTTPConnection("127.0.0.1", PORTS["adm"], timeout=30)
    c.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    r = c.getresponse()
    body = r.read()
    c.close()
    return json.loads(body)


# ---------------------------------------------------------------- legitimate devices
ROOT = os.path.join(W, "root.pem")


def enroll(device):
    token = cli("device", "add", device, "--group", "fleet").strip()
    d = os.path.join(W, "devices", device)
    out = subprocess.run([args.agent, "enroll", "--server", f"https://127.0.0.1:{PORTS['dev']}", "--ca", ROOT,
                          "--id", device, "--token", token, "--dir", d], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-80:])
    serial = out.stdout.split("serial ")[1].split(")")[0]
    with lock:
        received_serials.append((device, serial, "enroll"))
    return d


def renew(device, d):
    out = subprocess.run([args.agent, "renew", "--force", "--dir", d], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip()[-80:])
    serial = out.stdout.split("serial ")[1].split(",")[0]
    with lock:
        received_serials.append((device, serial, "renew"))


def tls_ctx(d):
    ctx = ssl.create_default_context(cafile=ROOT)
    ctx.load_cert_chain(os.path.join(d, "chain.pem"), os.path.join(d, "key.pem"))
    return ctx


def device_loop(device, d):
    """One device: gateway calls, DNS over every transport, firmware check-ins, renewals."""
    ctx = None
    conn = None
    last_renew = now()
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if ctx is None:
                ctx = tls_ctx(d)
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", PORTS["dev"], context=ctx, timeout=5)
            bad = i % 10 == 0
            body = json.dumps({"temp": 999 if bad else 21.5})
            conn.request("POST", f"/api/devices/{device}/telemetry", body=body,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            want = 400 if bad else 200
            record("gateway", r.status == want, f"HTTP {r.status}", expected_status=bad)
            if r.status != want:
                conn.close()
                conn = None
        except Exception as e:  # noqa: BLE001 - every failure is counted
            record("gateway", False, type(e).__name__)
            conn = None
        # DNS, one transport per turn.
        name = f"d{i % 50}.{device}.soak.test"
        q = dns.message.make_query(name, "A")
        how = ("dns_udp", "dns_tcp", "dns_dot", "dns_doh")[i % 4]
        try:
            if how == "dns_udp":
                r = dns.query.udp(q, "127.0.0.1", port=PORTS["dns"], timeout=3)
            elif how == "dns_tcp":
                r = dns.query.tcp(q, "127.0.0.1", port=PORTS["dns"], timeout=3)
            elif how == "dns_dot":
                r = dns.query.tls(q, "127.0.0.1", port=PORTS["dot"], timeout=3, ssl_context=ctx,
                                  server_hostname="localhost")
            else:
                c = http.client.HTTPSConnection("127.0.0.1", PORTS["dev"], context=ctx, timeout=3)
                c.request("POST", "/dns-query", body=q.to_wire(),
                          headers={"Content-Type": "application/dns-message", "Accept": "application/dns-message"})
                resp = c.getresponse()
                r = dns.message.from_wire(resp.read())
                c.close()
            record(how, r.rcode() == dns.rcode.NOERROR and len(r.answer) > 0, dns.rcode.to_text(r.rcode()))
        except Exception as e:  # noqa: BLE001
            record(how, False, type(e).__name__)
        if i % 5 == 0:
            try:
                c = http.client.HTTPSConnection("127.0.0.1", PORTS["dev"], context=ctx, timeout=5)
                c.request("GET", "/firmware/metadata/timestamp.json")
                resp = c.getresponse()
                resp.read()
                c.close()
                record("firmware", resp.status == 200, f"HTTP {resp.status}")
            except Exception as e:  # noqa: BLE001
                record("firmware", False, type(e).__name__)
        if now() - last_renew > 30:
            last_renew = now()
            try:
                renew(device, d)
                ctx = None
                conn = None
                record("renew", True)
            except Exception as e:  # noqa: BLE001
                record("renew", False, str(e))
        time.sleep(0.05)


def enroller():
    n = 0
    while not stop.is_set():
        n += 1
        try:
            enroll(f"new-{n:04d}")
            record("enroll", True)
        except Exception as e:  # noqa: BLE001
            record("enroll", False, str(e))
        stop.wait(ENROLL_EVERY)


# ---------------------------------------------------------------- attackers
def idle_flood():
    """Every 90 s: 3,000 idle TLS connections (no client certificate) from 127.9.x.y, held 30 s."""
    ctx = ssl.create_default_context(cafile=ROOT)
    ctx.check_hostname = False
    while not stop.wait(20):
        held = []
        for i in range(3000):
            if stop.is_set():
                break
            try:
                s = socket.socket()
                s.bind((f"127.9.{i // 200}.{i % 200 + 1}", 0))
                s.settimeout(5)
                s.connect(("127.0.0.1", PORTS["dev"]))
                held.append(ctx.wrap_socket(s, server_hostname="localhost"))
            except Exception:  # noqa: BLE001
                pass
        with lock:
            outcomes[("attack", "idle TLS connections opened")] += len(held)
        stop.wait(30)
        for s in held:
            s.close()
        stop.wait(40)


def slowloris(port, chunk):
    """500 connections trickling a request one byte per second."""
    while not stop.is_set():
        socks = []
        for i in range(500):
            try:
                s = socket.socket()
                s.bind((f"127.10.{port % 250}.{i % 250 + 1}", 0))
                s.settimeout(2)
                s.connect(("127.0.0.1", port))
                socks.append(s)
            except Exception:  # noqa: BLE001
                pass
        for b in chunk:
            if stop.is_set():
                break
            for s in list(socks):
                try:
                    s.send(bytes([b]))
                except Exception:  # noqa: BLE001
                    socks.remove(s)
            time.sleep(1)
        with lock:
            outcomes[("attack", f"slowloris connections on {port}")] += 500
        for s in socks:
            s.close()


def garbage():
    """Random bytes on every listener, every half second."""
    while not stop.wait(0.5):
        junk = os.urandom(random.randint(1, 2048))
        for port in (PORTS["dev"], PORTS["dns"], PORTS["dot"], PORTS["adm"]):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
                s.sendall(junk)
                s.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(junk[:512], ("127.0.0.1", PORTS["dns"]))
            u.close()
        except Exception:  # noqa: BLE001
            pass
        with lock:
            outcomes[("attack", "garbage payloads")] += 5


def faults():
    """The schedule of faults, in fractions of the run."""
    plan = [
        (0.15, "backend_down"), (0.30, "dns_stall"), (0.50, "restart"),
        (0.65, "backend_down"), (0.80, "dns_stall"),
    ]
    for frac, what in plan:
        if stop.wait(max(0, frac * DURATION - now())):
            return
        w = open_window(what)
        if what == "backend_down":
            procs["backend"].kill()
            procs["backend"].wait()
            stop.wait(15)
            start_backend()
            close_window(w)
        elif what == "dns_stall":
            open(STALL_FLAG, "w").close()
            stop.wait(20)
            os.unlink(STALL_FLAG)
            close_window(w, grace=6)
        elif what == "restart":
            server["proc"].send_signal(signal.SIGKILL)
            server["proc"].wait()
            time.sleep(2)
            start_portcullis()
            close_window(w, grace=3)


samples = []


def sampler():
    while not stop.wait(1):
        p = server["proc"]
        try:
            st = open(f"/proc/{p.pid}/status").read()
            rss = int([l for l in st.splitlines() if l.startswith("VmRSS:")][0].split()[1])
            fds = len(os.listdir(f"/proc/{p.pid}/fd"))
            samples.append((now(), rss, fds))
        except Exception:  # noqa: BLE001
            pass


def main():
    os.makedirs(os.path.join(W, "devices"), exist_ok=True)
    json.dump(OPENAPI, open(os.path.join(W, "api.json"), "w"))
    open(os.path.join(W, "portcullis.toml"), "w").write(CONFIG)
    start_backend()
    start_upstream()
    start_portcullis()
    open(ROOT, "w").write(cli("ca", "cert"))
    devices = [(f"dev-{i:03d}", enroll(f"dev-{i:03d}")) for i in range(args.devices)]
    threads = [threading.Thread(target=device_loop, args=dv, daemon=True) for dv in devices]
    threads += [threading.Thread(target=f, daemon=True) for f in (enroller, idle_flood, garbage, faults, sampler)]
    threads.append(threading.Thread(target=slowloris, args=(PORTS["dev"], b"GET / HTTP/1.1\r\nHost: x\r\n" * 4), daemon=True))
    threads.append(threading.Thread(target=slowloris, args=(PORTS["dns"], b"\x00\x1d" + b"\x07" * 40), daemon=True))
    for t in threads:
        t.start()
    while now() < DURATION:
        time.sleep(1)
    stop.set()
    time.sleep(6)

    # After the run (and the restart): every certificate a client received is registered
    # and has its event.
    certs = {c["serial"].lower() for c in admin_get("/v1/certificates")["certificates"]}
    events, after = [], 0
    while True:
        page = admin_get(f"/v1/events?after={after}&limit=1000")
        page = page.get("events", page) if isinstance(page, dict) else page
        if not page:
            break
        events += page
        after = page[-1]["id"]
    event_serials = {(e.get("serial") or "").lower() for e in events}
    missing_certs = [s for s in received_serials if s[1].lower() not in certs]
    missing_events = [s for s in received_serials if s[1].lower() not in event_serials]

    for p in procs.values():
        p.kill()
    server["proc"].kill()

    csv = os.path.join(args.out, "soak.csv")
    with open(csv, "w") as f:
        f.write("seconds,rss_kib,fds\n")
        for t, r, n in samples:
            f.write(f"{t:.1f},{r},{n}\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
        ts = [s[0] for s in samples]
        ax.plot(ts, [s[1] / 1024 for s in samples], label="RSS (MiB)", color="tab:blue")
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS MiB")
        ax2 = ax.twinx()
        ax2.plot(ts, [s[2] for s in samples], label="open fds", color="tab:orange")
        ax2.set_ylabel("open descriptors")
        for name, a, b in windows:
            ax.axvspan(a, b if b else a + 1, alpha=0.15, color={"restart": "red", "backend_down": "grey", "dns_stall": "green"}[name])
        ax.set_title("Portcullis soak: RSS and descriptors (red: kill -9 + restart, grey: backend down, green: DNS stall)", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "soak.png"))
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)

    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    report = {
        "seconds": DURATION,
        "outcomes": {f"{k[0]}: {k[1]}": v for k, v in sorted(outcomes.items())},
        "legit_errors_outside_fault_windows": {f"{k[0]}: {k[2]}": v for k, v in sorted(legit_errors.items()) if k[1] == "-"},
        "legit_errors_inside_fault_windows": {f"{k[0]} ({k[1]}): {k[2]}": v for k, v in sorted(legit_errors.items()) if k[1] != "-"},
        "fault_windows": [[n, round(a, 1), round(b, 1) if b else None] for n, a, b in windows],
        "certificates_received": len(received_serials),
        "certificates_missing_from_registry": missing_certs,
        "certificates_without_event": missing_events,
        "rss_kib": {"min": min(rss, default=0), "max": max(rss, default=0), "last": rss[-1] if rss else 0},
        "fds": {"min": min(fds, default=0), "max": max(fds, default=0), "last": fds[-1] if fds else 0},
    }
    json.dump(report, open(os.path.join(args.out, "soak.json"), "w"), indent=1)
    print(json.dumps(report, indent=1))


main()
