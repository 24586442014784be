#!/usr/bin/env bash
# Firmware updates against the peer a user would otherwise pick, side by side in one run:
#   (1) N simulated agents (default 1,000) check for an update at the same moment, each
#       on its own new mTLS connection: TUF metadata refresh (rust-tuf client workflow)
#       plus the directive — against Portcullis, then against nginx (Debian) serving the
#       same repository files with `ssl_verify_client on` and a fixed "nothing to do"
#       directive. Same agents, same client code.
#   (2) Download of a 64 MiB image over mTLS with curl (client certificate, HTTP/1.1 as
#       the agent speaks it), from
#       Portcullis's device port and from the same nginx; MB/s, median of ROUNDS.
#   (3) Verification: the agent's SHA-256 (ring) against `sha256sum` on the same file.
#   [ROUNDS=n] bench/firmware.sh [AGENTS] [IMAGE-MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${1:-1000}
MIB=${2:-64}
ROUNDS=${ROUNDS:-5}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need nginx nginx
need curl curl
cargo build --release -q -p portcullis -p portcullis-agent -p portcullis-bench
B=target/release/portcullis-enroll-bench
start_portcullis
token_file="$work/data/admin.token"
head -c $((MIB * 1024 * 1024)) /dev/urandom >"$work/fw.bin"
$P firmware publish "$work/fw.bin" --hardware bench-hw --version 1.1.0 >/dev/null
$P firmware root >"$work/root.json"
target=$($P firmware list --json | python3 -c 'import json,sys; t=json.load(sys.stdin)["targets"][0]; print("%s/%s.%s" % (t["path"].rsplit("/",1)[0], t["sha256"], t["path"].rsplit("/",1)[1]))')

echo "== enrolling $AGENTS agents"
$B firmware-fleet --server "https://$dev" --ca "$work/root.pem" --admin "$adm" --admin-token "$token_file" \
  --root "$work/root.json" --dir "$work/agents" -n "$AGENTS"
cat "$work/agents/agent-0000/chain.pem" >"$work/client.crt"
cp "$work/agents/agent-0000/key.pem" "$work/client.key"

ng_port=$(free_port)
mkdir -p "$work/nginx"
# user root: the work dir is the benchmark's own (0700); nginx's default user cannot read it.
cat >"$work/nginx/nginx.conf" <<CONF
user root;
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  server {
    listen 127.0.0.1:$ng_port ssl;
    ssl_certificate $work/data/tls/server.crt;
    ssl_certificate_key $work/data/tls/server.key;
    ssl_client_certificate $work/chain.pem;
    ssl_verify_client on;
    ssl_verify_depth 2;
    location /firmware/metadata/ { alias $work/data/firmware/repo/metadata/; add_header Cache-Control no-store; }
    location /firmware/targets/ { alias $work/data/firmware/repo/targets/; }
    location = /firmware/assignment { default_type application/json; return 200 '{"target":null,"version":null}'; }
    location = /firmware/report { return 204; }
  }
}
CONF
nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' &
pids+=("$!")
sleep 0.5

echo "== (1) $AGENTS agents check at once, $ROUNDS rounds each, alternating"
for r in $(seq "$ROUNDS"); do
  echo "-- portcullis"; $B firmware-check --server "https://$dev" --ca "$work/root.pem" --dir "$work/agents" --rounds 1
  echo "-- nginx";      $B firmware-check --server "https://127.0.0.1:$ng_port" --ca "$work/root.pem" --dir "$work/agents" --rounds 1
done

echo "== (2) $MIB MiB download over mTLS (curl), $ROUNDS rounds, alternating"
dl() { curl -sS --http1.1 -o /dev/null --cacert "$work/root.pem" --cert "$work/client.crt" --key "$work/client.key" \
  -w '%{speed_download} %{size_download} %{http_code}\n' "$1"; }
for r in $(seq "$ROUNDS"); do
  p=$(dl "https://$dev/firmware/targets/$target"); n=$(dl "https://127.0.0.1:$ng_port/firmware/targets/$target")
  echo "portcullis $p | nginx $n"
done | tee "$work/dl.txt"
python3 - "$work/dl.txt" <<'PY'
import statistics, sys
p, n = [], []
for line in open(sys.argv[1]):
    a, b = line.split("|")
    pa, na = a.split(), b.split()
    assert pa[3] == "200" and na[3] == "200", line
    p.append(float(pa[1])); n.append(float(na[1]))
mp, mn = statistics.median(p), statistics.median(n)
print(f"median MB/s: portcullis {mp/1e6:.0f}, nginx {mn/1e6:.0f}, ratio {mp/mn:.2f}")
PY

echo "== (3) verification of the $MIB MiB image, $ROUNDS rounds"
for r in $(seq "$ROUNDS"); do
  $B sha256 "$work/fw.bin" | awk '{print "agent (ring):", $(NF-3), $(NF-2), $(NF-1), $NF}'
  python3 - "$work/fw.bin" <<'PY'
import os, subprocess, sys, time
t = time.perf_counter()
subprocess.run(["sha256sum", sys.argv[1]], stdout=subprocess.DEVNULL, check=True)
s = time.perf_counter() - t
print(f"sha256sum: {s:.3f} s {os.path.getsize(sys.argv[1]) / s / 1e6:.0f} MB/s")
PY
done
