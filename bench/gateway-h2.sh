#!/usr/bin/env bash
# HTTP/2 on the device port against nginx 1.22 with `http2` and `ssl_verify_client on`,
# side by side in one run. Both terminate mTLS (the same device certificate), take the
# same 207-byte POST and forward it over HTTP/1.1 keep-alive to the same upstream (nginx
# `return 200`). nginx validates nothing; Portcullis checks the device against the live
# registry, binds the path to its identity and validates the body against
# examples/telemetry.openapi.yaml, with its default logging (access log at info).
# Load: h2load (Debian nghttp2-client), CONNS connections with STREAMS concurrent streams
# each. h2load has no client-certificate option: bench/h2load-clientcert.c, preloaded,
# gives its TLS context the device's chain and key.
#   [PIN=1] [WORKERS=n] [NGINX_WORKERS=n] [ROUNDS=n] [BENCH_LOG=level] bench/gateway-h2.sh [REQUESTS] [CONNS] [STREAMS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
C=${2:-32}
M=${3:-4}
BENCH_LOG=${BENCH_LOG:-info}
given_bin=${PORTCULLIS_BIN:-}
# shellcheck source=bench/lib.sh
source bench/lib.sh
# PIN=1: the server under test on CPU 0, h2load and the upstream on CPU 1 (use with
# WORKERS=1 NGINX_WORKERS=1).
if [ "${PIN:-0}" = 1 ]; then
  SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"
  PORTCULLIS_ENV="${PORTCULLIS_ENV:-} taskset -c 0"
else
  SERVER_CPU=""; CLIENT_CPU=""
fi
need nginx nginx
need h2load nghttp2-client
need gcc gcc
[ -n "$given_bin" ] || cargo build --release -q -p portcullis -p portcullis-agent
gcc -shared -fPIC -O2 -o "$work/clientcert.so" bench/h2load-clientcert.c -ldl
up_port=$(free_port); ng_port=$(free_port)

cat >"$work/portcullis.toml" <<CONF
[device]
workers = ${WORKERS:-0}
CONF
gateway_route_conf "$up_port" >>"$work/portcullis.toml"
start_portcullis "$work/portcullis.toml"
enroll_bench_cam

nginx_upstream_conf "$up_port"
NGINX_HTTP2=1 nginx_proxy_conf "$ng_port" "$up_port" ${NGINX_WORKERS:-2}
$CLIENT_CPU nginx -c "$work/up/nginx.conf" -g 'daemon off;' &
pids+=("$!")
$SERVER_CPU nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' &
ng_master=$!
pids+=("$ng_master")
sleep 0.5

printf '%s' '{"temperature": 21.5, "humidity": 40.25, "taken_at": "2026-11-25T10:00:00Z", "sequence": 184467, "battery": 87, "tags": ["lobby", "north", "floor-2", "door-east", "ceiling"], "source": "10.20.30.40"}' >"$work/reading.json"
echo "body: $(wc -c <"$work/reading.json") bytes of JSON"
path=/api/devices/bench-cam/telemetry

load() { # load URL [h2load args...]: h2load with the device certificate
  local url=$1; shift
  H2LOAD_CERT="$work/agent/chain.pem" H2LOAD_KEY="$work/agent/key.pem" LD_PRELOAD="$work/clientcert.so" \
    $CLIENT_CPU h2load -d "$work/reading.json" -H 'content-type: application/json' "$@" "$url"
}
# Both must answer 200 over HTTP/2 with the certificate, and Portcullis must refuse an
# invalid reading: otherwise the numbers below would measure an error path.
for url in "https://127.0.0.1:$ng_port$path" "https://$dev$path"; do
  out=$(load "$url" -n 10 -c 1 2>&1)
  grep -q "Application protocol: h2" <<<"$out" || { echo "no h2 with $url:" >&2; echo "$out" >&2; exit 1; }
  grep -q "status codes: 10 2xx" <<<"$out" || { echo "not 200 from $url:" >&2; echo "$out" >&2; exit 1; }
done
printf '%s' '{"temperature": 1000}' >"$work/bad.json"
bad=$(H2LOAD_CERT="$work/agent/chain.pem" H2LOAD_KEY="$work/agent/key.pem" LD_PRELOAD="$work/clientcert.so" \
  h2load -d "$work/bad.json" -H 'content-type: application/json' -n 1 -c 1 "https://$dev$path" | awk '/status codes/ {print $7}')
[ "${bad:-0}" = 1 ] || { echo "validation is not on (an invalid reading was not 4xx)" >&2; exit 1; }

cpu() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
ng_pids() { pgrep -P "$ng_master" | tr '\n' ' '; }
ticks=$(getconf CLK_TCK)
run() { # run NAME URL SERVER-PIDS
  local name=$1 url=$2 procs=$3 before
  before=$(cpu $procs)
  load "$url" -n "$N" -c "$C" -m "$M" 2>&1 | awk -v name="$name" '
    /^finished in/ {rps=$4}
    /^requests:/ {failed=$10; errored=$12}
    /^status codes:/ {ok=$3}
    /^time for request:/ {mean=$6; sd=$7}
    END {printf "%-44s %10s req/s  mean %8s  sd %8s  2xx %s  failed %s  errored %s", name, rps, mean, sd, ok, failed, errored}'
  awk -v t="$(( $(cpu $procs) - before ))" -v hz="$ticks" -v n="$N" \
    'BEGIN {printf "  server CPU %.1f us/request\n", t / hz * 1e6 / n}'
}
load "https://127.0.0.1:$ng_port$path" -n 5000 -c "$C" -m "$M" >/dev/null 2>&1
load "https://$dev$path" -n 5000 -c "$C" -m "$M" >/dev/null 2>&1
echo "== HTTP/2 keep-alive, $N POSTs, $C connections x $M streams (h2load), ${ROUNDS:-3} rounds; pinned: ${PIN:-0}; portcullis workers: ${WORKERS:-0}, log: $BENCH_LOG; nginx worker_processes: ${NGINX_WORKERS:-2}"
for r in $(seq "${ROUNDS:-3}"); do
  if [ $((r % 2)) = 1 ]; then
    run "[$r] nginx http2 mTLS proxy (no validation)" "https://127.0.0.1:$ng_port$path" "$(ng_pids)"
    run "[$r] portcullis h2 gateway (mTLS, auth, OpenAPI)" "https://$dev$path" "$pid"
  else
    run "[$r] portcullis h2 gateway (mTLS, auth, OpenAPI)" "https://$dev$path" "$pid"
    run "[$r] nginx http2 mTLS proxy (no validation)" "https://127.0.0.1:$ng_port$path" "$(ng_pids)"
  fi
done
