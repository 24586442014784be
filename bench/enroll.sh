#!/usr/bin/env bash
# EST enrollment benchmark, side by side on this machine in one run:
#   1. nginx (Debian package) answering a fixed 200 over TLS 1.3 with an ECDSA P-256
#      certificate from a Portcullis CA: the cost of a bare fresh-connection handshake;
#   2. Portcullis `GET /.well-known/est/cacerts` on fresh connections: the same for our
#      TLS stack;
#   3. Portcullis end-to-end enrollments (fresh connection + simpleenroll + durable
#      commit), with the in-process ceiling (CSR verify + sign, all cores, no I/O).
# Same client (portcullis-enroll-bench), same concurrency, loopback only.
#   bench/enroll.sh [N] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
C=${2:-64}
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
cargo build --release -q -p portcullis -p portcullis-bench
B=target/release/portcullis-enroll-bench
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
PORTCULLIS_LOG=warn target/release/portcullis --data-dir "$work/data" up \
  --device-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 >"$work/up.out" 2>"$work/up.err" &
pid=$!
pids+=("$pid")
for _ in $(seq 100); do grep -q "admin API" "$work/up.out" 2>/dev/null && break; sleep 0.1; done
dev=$(awk '/device port/ {print $NF}' "$work/up.out")
adm=$(awk '/admin API/ {print $NF}' "$work/up.out")
target/release/portcullis --data-dir "$work/data" ca cert >"$work/root.pem"

# nginx with the same kind of certificate (P-256, issued by the Portcullis CA).
mkdir -p "$work/nginx"
cp "$work/data/tls/server.crt" "$work/nginx/server.crt"
cp "$work/data/tls/server.key" "$work/nginx/server.key"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$port ssl;
    ssl_certificate $work/nginx/server.crt;
    ssl_certificate_key $work/nginx/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    keepalive_timeout 10;
    location / { return 200 "ok\n"; }
  }
}
CONF
nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' &
pids+=("$!")
sleep 0.5

echo "== nginx $(nginx -v 2>&1 | sed 's/.*\///'): fresh TLS connection + GET, c=$C"
$B handshake --server "https://127.0.0.1:$port" --ca "$work/root.pem" --path / -n "$N" -c "$C"
echo "== portcullis: fresh TLS connection + GET cacerts, c=$C"
$B handshake --server "https://$dev" --ca "$work/root.pem" --path /.well-known/est/cacerts -n "$N" -c "$C"
echo "== portcullis: fresh TLS connection + EST simpleenroll + durable commit, c=$C"
$B enroll --server "https://$dev" --ca "$work/root.pem" --admin "$adm" \
  --admin-token "$work/data/admin.token" -n "$N" -c "$C" --server-pid "$pid"
