#!/usr/bin/env bash
# The DNS port against unbound and dnsmasq, side by side in one run on this machine, the
# way an outside evaluator measures it (issue 18):
#   - data: DOMAINS (1,000,000) synthetic listed domains in a plain-domain file; 1,000
#     allowed names with fixed A records; 200,000 queries, half listed names (a tenth of
#     those a random subdomain of a listed name), half allowed names, repeating;
#   - unbound: `local-zone: "<d>." always_nxdomain` per listed name, `local-data` for the
#     allowed names, `local-zone: "." refuse`; dnsmasq: `address=/<d>/` and
#     `address=/<name>/<ip>`, `--no-resolv --no-hosts`; Portcullis: a blocklist policy
#     for unknown clients over the same file (`match = "subtree"`, the reading the other
#     two give it), the allowed names from an upstream (a dnsmasq holding them with
#     `--local-ttl=3600`, so they are cached) and then from its cache, query log on (the
#     default) and off;
#   - dnsperf, 8 clients, 200 outstanding, SECONDS per server and round; pinned (each
#     server on CPU 1 with one thread/worker, dnsperf on CPU 0) and unpinned (2 threads);
#     ROUNDS rounds, servers in rotating order; medians and ratios to unbound.
# Also: load time (start to the first NXDOMAIN for a listed name), RSS after load and after
# the benchmark, p99 latency (a second, rate-limited dnsperf run with per-query latencies),
# and the query-log entries dropped during the benchmark (portcullis_dns_query_log_dropped).
#   [ROUNDS=3] [MODES="pinned unpinned"] bench/dns.sh [DOMAINS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-1000000}
T=${2:-10}
ROUNDS=${ROUNDS:-3}
MODES=${MODES:-pinned unpinned}
given_bin=${PORTCULLIS_BIN:-}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need dnsmasq dnsmasq-base
need unbound unbound
need dnsperf dnsperf
need dig dnsutils
need curl curl
[ -n "$given_bin" ] || cargo build --release -q -p portcullis

echo "== data: $D listed domains, 1,000 allowed names, 200,000 queries"
dns_bench_data "$D"
probe=$(sed -n 2p "$work/block.txt")

rss_mb() { awk '/VmRSS/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }
# wait_nx PORT [T0]: seconds from T0 (default: now) until a listed name gets NXDOMAIN.
wait_nx() {
  local t0=${2:-$(date +%s.%N)}
  for _ in $(seq 3000); do
    dig @127.0.0.1 -p "$1" +time=1 +tries=1 "$probe" A 2>/dev/null | grep -q "status: NXDOMAIN" && break
    sleep 0.1
  done
  awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'
}

# The upstream of Portcullis for the allowed names (cacheable: --local-ttl).
up_port=$(free_port)
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$up_port" --listen-address=127.0.0.1 \
  --bind-interfaces --local-ttl=3600 --conf-file="$work/dnsmasq-allowed.conf" --pid-file="$work/up.pid" 2>/dev/null &
pids+=("$!")

declare -A PORT PID
# start_servers CPU-PREFIX THREADS: unbound, dnsmasq and Portcullis (log on, log off).
start_servers() {
  local cpu=$1 threads=$2 t
  PORT[unbound]=$(free_port)
  cat >"$work/unbound.conf" <<CONF
server:
  interface: 127.0.0.1
  port: ${PORT[unbound]}
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$work"
  pidfile: "$work/unbound.pid"
  use-syslog: no
  verbosity: 0
  num-threads: $threads
  so-reuseport: yes
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  include: "$work/unbound-zones.conf"
CONF
  local t0; t0=$(date +%s.%N)
  $cpu unbound -c "$work/unbound.conf" 2>"$work/ub.err" &
  PID[unbound]=$!
  pids+=("${PID[unbound]}")
  t=$(wait_nx "${PORT[unbound]}" "$t0")
  echo "unbound:              loaded in $t s, RSS $(rss_mb "${PID[unbound]}") MB"

  PORT[dnsmasq]=$(free_port)
  t0=$(date +%s.%N)
  $cpu dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="${PORT[dnsmasq]}" --listen-address=127.0.0.1 \
    --bind-interfaces --conf-file="$work/dnsmasq-all.conf" --cache-size=10000 --pid-file="$work/dm.pid" 2>"$work/dm.err" &
  PID[dnsmasq]=$!
  pids+=("${PID[dnsmasq]}")
  t=$(wait_nx "${PORT[dnsmasq]}" "$t0")
  echo "dnsmasq:              loaded in $t s, RSS $(rss_mb "${PID[dnsmasq]}") MB"

  local log
  for log in on off; do
    cat >"$work/pc-$log.toml" <<CONF
[device]
workers = $threads
[dns]
upstreams = ["127.0.0.1:$up_port"]
unknown_clients = "lobby"
per_client = { per_second = 100000000, burst = 100000000 }
log_queries = $([ "$log" = on ] && echo true || echo false)
[dns.lists.big]
path = "$work/block.txt"
match = "subtree"
[[dns.policies]]
name = "lobby"
mode = "blocklist"
lists = ["big"]
block = "nxdomain"
CONF
    rm -rf "$work/datapc-$log"
    t0=$(date +%s.%N)
    INSTANCE=pc-$log PORTCULLIS_ENV="$cpu" BENCH_LOG=${BENCH_LOG:-info} start_portcullis "$work/pc-$log.toml"
    PORT[pc-$log]=${dns##*:}
    PID[pc-$log]=$pid
    ADM[pc-$log]=$adm
    t=$(wait_nx "${PORT[pc-$log]}" "$t0")
    echo "portcullis (log $log): loaded in $t s, RSS $(rss_mb "$pid") MB"
  done
}
declare -A ADM
stop_servers() {
  local k
  for k in "${!PID[@]}"; do kill "${PID[$k]}" 2>/dev/null || true; wait "${PID[$k]}" 2>/dev/null || true; done
}

# perf CPU-PREFIX SERVER: queries/s, avg latency (ms), lost.
perf() {
  $1 dnsperf -s 127.0.0.1 -p "${PORT[$2]}" -d "$work/queries.txt" -l "$T" -c 8 -q 200 2>&1 |
    awk '/Queries per second/ {q=$4} /Average Latency/ {lat=$4} /Queries lost/ {lost=$3}
      END {printf "%.0f %.3f %s\n", q, lat * 1000, lost}'
}
# p99 CPU-PREFIX SERVER: the 99th percentile of per-query latency (ms) at 20,000 queries/s.
p99() {
  $1 dnsperf -s 127.0.0.1 -p "${PORT[$2]}" -d "$work/queries.txt" -l 3 -c 8 -q 200 -Q 20000 -v 2>/dev/null |
    awk '$1 == ">" {print $NF}' | sort -g | awk '{a[NR] = $1} END {if (NR) printf "%.3f", a[int(NR * 0.99)] * 1000; else printf "-"}'
}
dropped() {
  curl -s -H "Authorization: Bearer $(cat "$work/datapc-on/metrics.token" 2>/dev/null || echo none)" "http://${ADM[pc-on]}/metrics" |
    awk '/^portcullis_dns_query_log_dropped_total/ {print $2}'
}

servers="unbound dnsmasq pc-off pc-on"
for mode in $MODES; do
  if [ "$mode" = pinned ]; then srv="taskset -c 1"; cli="taskset -c 0"; threads=1; else srv=""; cli=""; threads=2; fi
  echo "== $mode: servers $([ "$mode" = pinned ] && echo "on CPU 1, one thread each; dnsperf on CPU 0" || echo "with 2 threads; nothing pinned")"
  start_servers "$srv" "$threads"
  for s in $servers; do perf "$cli" "$s" >/dev/null; done # warm-up: caches filled
  : >"$work/results-$mode"
  for r in $(seq "$ROUNDS"); do
    set -- $servers
    for _ in $(seq $(( (r - 1) % 4 ))); do set -- "${@:2}" "$1"; done
    for s in "$@"; do
      read -r q lat lost < <(perf "$cli" "$s")
      printf '[%s %d] %-10s %9.0f queries/s  avg %6.3f ms  lost %s\n' "$mode" "$r" "$s" "$q" "$lat" "$lost"
      echo "$s $q" >>"$work/results-$mode"
    done
  done
  for s in $servers; do printf '%-10s p99 %s ms at 20,000 queries/s\n' "$s" "$(p99 "$cli" "$s")"; done
  echo "portcullis (log on): query-log entries dropped during the benchmark: $(dropped)"
  for s in $servers; do printf '%-10s RSS after the benchmark %s MB\n' "$s" "$(rss_mb "${PID[$s]}")"; done
  awk -v mode="$mode" '
    function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    { n[$1]++; v[$1, n[$1]] = $2 }
    END {
      split("unbound dnsmasq pc-off pc-on", order, " ")
      for (k = 1; k <= 4; k++) { s = order[k]; for (i = 1; i <= n[s]; i++) a[i] = v[s, i]; m[s] = median(a, n[s]) }
      for (k = 1; k <= 4; k++) { s = order[k]; printf "median %-8s %-10s %9.0f queries/s  %.2fx unbound\n", mode, s, m[s], m[s] / m["unbound"] }
    }' "$work/results-$mode"
  stop_servers
done
