#!/usr/bin/env bash
# The gateway against the peer a user would otherwise pick, side by side in one run:
#   (a) the upstream directly (nginx `return 200` on plain HTTP): the ceiling;
#   (b) nginx with `ssl_verify_client on` proxying to it (validates nothing);
#   (c) the Portcullis gateway: live device check per request, identity binding, and the
#       ~200-byte JSON body validated against examples/telemetry.openapi.yaml.
# Every request is a POST of the same valid reading. Load: ApacheBench (Debian
# apache2-utils) with a device certificate (-E): keep-alive (-k) for requests/s and
# latency, then one new mTLS connection per request for handshakes/s.
#   [WORKERS=n] [NGINX_WORKERS=n] [NGINX_REUSEPORT=1] [ROUNDS=n] bench/gateway.sh [REQUESTS] [CONCURRENCY] [HANDSHAKES]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50000}
C=${2:-32}
H=${3:-5000}
# shellcheck source=bench/lib.sh
source bench/lib.sh
# PIN=1: the server under test (portcullis or the nginx proxy) on CPU 0, the load
# generator and the upstream on CPU 1, so a shared machine's scheduling noise does not
# decide the ratio; use with WORKERS=1 NGINX_WORKERS=1.
if [ "${PIN:-0}" = 1 ]; then
  SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"
  PORTCULLIS_ENV="${PORTCULLIS_ENV:-} taskset -c 0"
else
  SERVER_CPU=""; CLIENT_CPU=""
fi
need nginx nginx
need ab apache2-utils
cargo build --release -q -p portcullis -p portcullis-agent
up_port=$(free_port); ng_port=$(free_port)

cat >"$work/portcullis.toml" <<CONF
[device]
workers = ${WORKERS:-0}
CONF
gateway_route_conf "$up_port" >>"$work/portcullis.toml"
start_portcullis "$work/portcullis.toml"
enroll_bench_cam

# Two nginx instances, so each one's CPU can be measured: the upstream (1 worker) and
# the mTLS proxy (NGINX_WORKERS, default 2: one per core).
nginx_upstream_conf "$up_port"
nginx_proxy_conf "$ng_port" "$up_port" ${NGINX_WORKERS:-2}
$CLIENT_CPU nginx -c "$work/up/nginx.conf" -g 'daemon off;' &
pids+=("$!")
$SERVER_CPU nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' &
ng_master=$!
pids+=("$ng_master")
sleep 0.5

printf '%s' '{"temperature": 21.5, "humidity": 40.25, "taken_at": "2026-11-25T10:00:00Z", "sequence": 184467, "battery": 87, "tags": ["lobby", "north", "floor-2", "door-east", "ceiling"], "source": "10.20.30.40"}' >"$work/reading.json"
echo "body: $(wc -c <"$work/reading.json") bytes of JSON"
path=/api/devices/bench-cam/telemetry
# Validation is on: an invalid reading is refused (and nginx forwards it).
bad=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/root.pem" --cert "$work/agent/chain.pem" \
  --key "$work/agent/key.pem" -H 'Content-Type: application/json' -d '{"temperature": 1000}' "https://$dev$path")
echo "portcullis answers an invalid reading with $bad"
[ "$bad" = 400 ] || { echo "validation is not on" >&2; exit 1; }

# CPU seconds (user+system) used so far by a process and its children's threads.
cpu() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
sys() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $15}' "/proc/$p/stat"))); done; echo "$t"; }
ng_pids() { pgrep -P "$ng_master" | tr '\n' ' '; }
# The /proc stat file of each worker: nginx's worker processes, Portcullis's device-port
# threads. How evenly their CPU time splits shows how evenly connections were spread.
ng_workers() { local p; for p in $(ng_pids); do echo "/proc/$p/stat"; done; }
pc_workers() { grep -l '^device-port' /proc/"$pid"/task/*/comm | sed 's/comm$/stat/'; }
ticks_of() { local f; for f in "$@"; do awk '{printf "%d ", $14+$15}' "$f"; done; }
ticks=$(getconf CLK_TCK)

run() {
  local name=$1 url=$2; shift 2
  local procs=${SERVER_PIDS:-}
  local before=0 sys_before=0 workers=() split_before=""
  [ -n "$procs" ] && before=$(cpu $procs) && sys_before=$(sys $procs)
  [ -n "${WORKER_STATS:-}" ] && workers=($WORKER_STATS) && split_before=$(ticks_of "${workers[@]}")
  $CLIENT_CPU ab -q -n "$N" -c "$C" -p "$work/reading.json" -T application/json "$@" "$url" 2>&1 | awk -v name="$name" '
    /Requests per second/ {rps=$4}
    /Failed requests/ {failed=$3}
    /Non-2xx responses/ {non2xx=$3}
    /^  50%/ {p50=$2} /^  99%/ {p99=$2}
    END {printf "%-44s %10s req/s  p50 %4s ms  p99 %4s ms  failed %s  non-2xx %s", name, rps, p50, p99, failed+0, non2xx+0}'
  if [ -n "$procs" ]; then
    local used=$(( $(cpu $procs) - before )) sys_used=$(( $(sys $procs) - sys_before ))
    awk -v t="$used" -v k="$sys_used" -v hz="$ticks" -v n="$N" \
      'BEGIN {printf "  server CPU %.1f us/request (%.0f%% kernel)", t / hz * 1e6 / n, t ? 100 * k / t : 0}'
  fi
  if [ ${#workers[@]} -gt 1 ]; then
    awk -v a="$split_before" -v b="$(ticks_of "${workers[@]}")" 'BEGIN {
      n = split(a, x, " "); split(b, y, " "); for (i = 1; i <= n; i++) { d[i] = y[i] - x[i]; t += d[i] }
      printf "  workers"; for (i = 1; i <= n; i++) printf "%s%d%%", (i > 1 ? "/" : " "), t ? 100 * d[i] / t : 0 }'
  fi
  echo
}
# Warm both up (connections, pools, caches), then alternate: this machine is shared, so
# rounds side by side say more than one long run each.
ab -q -k -n 2000 -c "$C" -p "$work/reading.json" -T application/json -E "$work/client.pem" "https://127.0.0.1:$ng_port$path" >/dev/null 2>&1
ab -q -k -n 2000 -c "$C" -p "$work/reading.json" -T application/json -E "$work/client.pem" "https://$dev$path" >/dev/null 2>&1
echo "== keep-alive, $N POSTs, concurrency $C (ab -k), ${ROUNDS:-3} rounds; portcullis workers: ${WORKERS:-0} (0 = one per CPU), nginx worker_processes: ${NGINX_WORKERS:-2}"
run "upstream direct (ceiling)" "http://127.0.0.1:$up_port$path" -k
# Odd rounds run nginx first, even rounds Portcullis first, so neither always inherits
# the other's leftovers (sockets in TIME_WAIT, a warm or cold CPU).
nginx_round() {
  WORKER_STATS="$(ng_workers)" SERVER_PIDS="$(ng_pids)" run "[$1] nginx mTLS proxy (no validation)" "https://127.0.0.1:$ng_port$path" -k -E "$work/client.pem"
}
portcullis_round() {
  WORKER_STATS="$(pc_workers)" SERVER_PIDS="$pid" run "[$1] portcullis gateway (mTLS, auth, OpenAPI)" "https://$dev$path" -k -E "$work/client.pem"
}
for r in $(seq "${ROUNDS:-3}"); do
  if [ $((r % 2)) = 1 ]; then nginx_round "$r"; portcullis_round "$r"; else portcullis_round "$r"; nginx_round "$r"; fi
done
echo "== new mTLS connection per request, $H POSTs, concurrency $C"
N=$H
SERVER_PIDS="$(ng_pids)" run "nginx mTLS proxy: handshakes" "https://127.0.0.1:$ng_port$path" -E "$work/client.pem"
SERVER_PIDS="$pid" run "portcullis gateway: handshakes" "https://$dev$path" -E "$work/client.pem"
