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
# shellcheck source=bench/lib.sh
source bench/lib.sh
need nginx nginx
cargo build --release -q -p portcullis -p portcullis-bench
B=target/release/portcullis-enroll-bench
start_portcullis

# nginx with the same kind of certificate (P-256, issued by the Portcullis CA).
mkdir -p "$work/nginx"
cp "$work/data/tls/server.crt" "$work/nginx/server.crt"
cp "$work/data/tls/server.key" "$work/nginx/server.key"
port=$(free_port)
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
