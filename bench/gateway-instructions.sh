#!/usr/bin/env bash
# User-space instructions per keep-alive request, Portcullis gateway (validating the
# ~200-byte JSON reading) against the nginx mTLS proxy, both under valgrind's callgrind
# (Debian `valgrind`). Unlike requests/s on a shared machine, an instruction count barely
# moves between runs, so it is the number to watch while optimising the hot path; kernel
# time (the other ~45% of server CPU, about equal for both) is not in it.
#   [KEEP=DIR] [PORTCULLIS_BIN=… AGENT_BIN=…] bench/gateway-instructions.sh [REQUESTS]
# (the binaries default to this tree's release build, built first).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4000}
given_bin=${PORTCULLIS_BIN:-}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need nginx nginx
need ab apache2-utils
need valgrind valgrind
[ -n "$given_bin" ] || cargo build --release -q -p portcullis -p portcullis-agent
up_port=$(free_port); ng_port=$(free_port)
cat >"$work/portcullis.toml" <<CONF
[device]
workers = 1
CONF
gateway_route_conf "$up_port" >>"$work/portcullis.toml"
PORTCULLIS_ENV="valgrind --tool=callgrind --callgrind-out-file=$work/pc.out" start_portcullis "$work/portcullis.toml"
enroll_bench_cam
nginx_upstream_conf "$up_port"
nginx_proxy_conf "$ng_port" "$up_port" 1 "master_process off;"
nginx -c "$work/up/nginx.conf" -g 'daemon off;' &
pids+=("$!")
valgrind --tool=callgrind --callgrind-out-file="$work/ng.out" nginx -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>/dev/null &
ng=$!
pids+=("$ng")
sleep 3
printf '%s' '{"temperature": 21.5, "humidity": 40.25, "taken_at": "2026-11-25T10:00:00Z", "sequence": 184467, "battery": 87, "tags": ["lobby", "north", "floor-2", "door-east", "ceiling"], "source": "10.20.30.40"}' >"$work/reading.json"
path=/api/devices/bench-cam/telemetry
# measure NAME PID URL: warm up, zero the counters, N requests, dump, report.
measure() {
  ab -q -k -n 500 -c 8 -p "$work/reading.json" -T application/json -E "$work/client.pem" "$3" >/dev/null
  callgrind_control -z "$2" >/dev/null 2>&1
  ab -q -k -n "$N" -c 8 -p "$work/reading.json" -T application/json -E "$work/client.pem" "$3" |
    awk '/Failed requests/ {f=$3} /Non-2xx/ {x=$3} END {if (f + x > 0) {print "requests failed"; exit 1}}'
  callgrind_control -d "$2" >/dev/null 2>&1
  sleep 1
  local f total
  f=$(ls -t "$work"/"$4".out.* | head -1)
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
  # KEEP=DIR keeps the profiles for callgrind_annotate.
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$f" "$KEEP/$4.callgrind"; fi
  printf '%-44s %8d instructions/request (user space)\n' "$1" $((total / N))
}
echo "== $N keep-alive POSTs, concurrency 8, one worker each"
measure "nginx mTLS proxy (no validation)" "$ng" "https://127.0.0.1:$ng_port$path" ng
measure "portcullis gateway (mTLS, auth, OpenAPI)" "$pid" "https://$dev$path" pc
