#!/usr/bin/env bash
# Gateway proxy overhead, side by side in one run (issue 3, preliminary: no OpenAPI
# validation exists yet, so this measures authentication + routing + proxying only):
#   (a) the upstream directly (nginx `return 200` on plain HTTP): the ceiling;
#   (b) nginx with `ssl_verify_client on` proxying to it (the peer a user would pick);
#   (c) the Portcullis gateway (live device check per request) proxying to it.
# Load: ApacheBench (Debian apache2-utils), keep-alive, a device certificate (-E).
#   bench/gateway.sh [REQUESTS] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
C=${2:-32}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need nginx nginx
need ab apache2-utils
cargo build --release -q -p portcullis -p portcullis-agent
up_port=$(free_port); ng_port=$(free_port)

cat >"$work/portcullis.toml" <<CONF
[gateway]
unauthenticated_per_ip = { per_second = 1000000, burst = 1000000 }
[[gateway.routes]]
prefix = "/api/"
upstream = "http://127.0.0.1:$up_port"
CONF
start_portcullis "$work/portcullis.toml"
token=$($P device add bench-cam 2>/dev/null)
target/release/portcullis-agent enroll --server "https://$dev" --ca "$work/root.pem" --id bench-cam \
  --token "$token" --dir "$work/agent" >/dev/null
cat "$work/agent/chain.pem" "$work/agent/key.pem" >"$work/client.pem"

mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$up_port; keepalive 64; }
  server { listen 127.0.0.1:$up_port; keepalive_requests 1000000; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:$ng_port ssl;
    ssl_certificate $work/data/tls/server.crt;
    ssl_certificate_key $work/data/tls/server.key;
    ssl_client_certificate $work/chain.pem;
    ssl_verify_client on;
    ssl_verify_depth 2;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Device \$ssl_client_s_dn;
    }
  }
}
CONF
nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' &
pids+=("$!")
sleep 0.5

run() {
  local name=$1 url=$2; shift 2
  ab -q -k -n "$N" -c "$C" "$@" "$url" 2>&1 | awk -v name="$name" '
    /Requests per second/ {rps=$4}
    /Failed requests/ {failed=$3}
    /Non-2xx responses/ {non2xx=$3}
    /^  50%/ {p50=$2} /^  99%/ {p99=$2}
    END {printf "%-34s %10s req/s  p50 %4s ms  p99 %4s ms  failed %s  non-2xx %s\n", name, rps, p50, p99, failed+0, non2xx+0}'
}
echo "== keep-alive, $N requests, concurrency $C (ab -k)"
run "upstream direct (ceiling)" "http://127.0.0.1:$up_port/api/x"
run "nginx mTLS proxy" "https://127.0.0.1:$ng_port/api/x" -E "$work/client.pem"
run "portcullis gateway (mTLS, live auth)" "https://$dev/api/x" -E "$work/client.pem"
