#!/usr/bin/env bash
# The DNS port with a big blocklist, side by side with unbound (Debian; local-zone
# always_null, how unbound-based blockers load lists) loading the same names, in one run
# on this machine. (dnsmasq 2.90 serves as the shared upstream; as a filtering peer with a
# big hosts file it answered REFUSED, EDE "Not Ready", for over a minute here.)
#   - load time and memory per listed domain (RSS with the list minus RSS without);
#   - memory across list refreshes (the old list must be freed after each swap);
#   - queries/s with dnsperf (Debian dnsperf): half blocked names from the list, half
#     allowed names answered from the cache of one upstream (dnsmasq answering everything
#     under example.net).
#   [PIN=1] bench/dns.sh [DOMAINS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-2000000}
T=${2:-10}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need dnsmasq dnsmasq-base
need unbound unbound
need dnsperf dnsperf
need dig dnsutils
if [ "${PIN:-0}" = 1 ]; then SERVER_CPU="taskset -c 0"; CLIENT_CPU="taskset -c 1"; else SERVER_CPU=""; CLIENT_CPU=""; fi
cargo build --release -q -p portcullis

echo "== generating $D blocked domains (hosts format) and the query mix"
python3 - "$D" "$work" <<'PY'
import random, sys
n, work = int(sys.argv[1]), sys.argv[2]
random.seed(7)
words = ["ads", "track", "metric", "pixel", "beacon", "cdn", "stat", "log", "tag", "promo"]
tlds = ["com", "net", "org", "io", "biz", "info"]
names = [f"{random.choice(words)}{i}-{random.randrange(1 << 30):x}.{random.choice(words)}.{random.choice(tlds)}" for i in range(n)]
with open(f"{work}/block.hosts", "w") as f:
    f.write("# synthetic blocklist\n")
    for d in names:
        f.write(f"0.0.0.0 {d}\n")
with open(f"{work}/block.unbound", "w") as f:
    for d in names:
        f.write(f'local-zone: "{d}." always_null\n')
with open(f"{work}/queries.txt", "w") as f:
    for i in range(20000):
        if i % 2:
            f.write(f"{random.choice(names)} A\n")
        else:
            f.write(f"host{i % 1000}.example.net A\n")
PY
ls -la "$work/block.hosts" | awk '{printf "list file: %.0f MB\n", $5 / 1e6}'

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
up_port=$(free_port)
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$up_port" --listen-address=127.0.0.1 --bind-interfaces \
  --address=/example.net/192.0.2.1 --pid-file="$work/up.pid" 2>/dev/null &
pids+=("$!")

# Portcullis without the list (baseline), then with it.
base_cfg() {
  cat <<CONF
[dns]
upstreams = ["127.0.0.1:$up_port"]
unknown_clients = "lobby"
per_client = { per_second = 100000000, burst = 100000000 }
log_queries = false
CONF
}
base_cfg >"$work/empty.toml"
printf '[[dns.policies]]\nname = "lobby"\nmode = "blocklist"\n' >>"$work/empty.toml"
start_portcullis "$work/empty.toml"
sleep 1
empty_rss=$(rss_kb "$pid")
kill "$pid"; wait "$pid" 2>/dev/null || true
rm -rf "$work/data"

base_cfg >"$work/list.toml"
cat >>"$work/list.toml" <<CONF
[dns.lists.big]
path = "$work/block.hosts"
refresh = "5s"
[[dns.policies]]
name = "lobby"
mode = "blocklist"
lists = ["big"]
block = "null"
CONF
t0=$(date +%s.%N)
PORTCULLIS_ENV="$SERVER_CPU" start_portcullis "$work/list.toml"
t1=$(date +%s.%N)
dns=$(awk '/dns \(udp, tcp\)/ {print $NF}' "$work/up.out")
dport=${dns##*:}
sleep 1
full_rss=$(rss_kb "$pid")
awk -v a="$t0" -v b="$t1" -v e="$empty_rss" -v f="$full_rss" -v n="$D" 'BEGIN {
  printf "portcullis: start with the list %.1f s; RSS %d MB without, %d MB with: %.0f bytes per domain\n", b - a, e / 1024, f / 1024, (f - e) * 1024 / n }'
# Refreshes: the file changes twice; RSS after each swap (the old list is freed).
for r in 1 2; do
  echo "0.0.0.0 refresh-$r.example" >>"$work/block.hosts"
  for _ in $(seq 120); do
    [ "$(dig @127.0.0.1 -p "$dport" +short refresh-$r.example A)" = "0.0.0.0" ] && break
    sleep 0.5
  done
  just=$(rss_kb "$pid")
  sleep 10
  echo "portcullis: refresh $r (list rebuilt and swapped): RSS $(( just / 1024 )) MB right after, $(( $(rss_kb "$pid") / 1024 )) MB 10 s later"
done

# unbound with the same names as local zones.
ub_port=$(free_port)
cat >"$work/unbound.conf" <<CONF
server:
  interface: 127.0.0.1
  port: $ub_port
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$work"
  pidfile: "$work/unbound.pid"
  use-syslog: no
  verbosity: 0
  num-threads: 1
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  module-config: "iterator"
  include: "$work/block.unbound"
  local-zone: "refresh-1.example." always_null
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@$up_port
CONF
t0=$(date +%s.%N)
$SERVER_CPU unbound -c "$work/unbound.conf" 2>"$work/ub.err" &
ub=$!
pids+=("$ub")
for _ in $(seq 3000); do
  [ "$(dig @127.0.0.1 -p "$ub_port" +short +time=1 +tries=1 refresh-1.example A 2>/dev/null)" = "0.0.0.0" ] && break
  sleep 0.1
done
t1=$(date +%s.%N)
ub_rss=$(rss_kb "$ub")
awk -v a="$t0" -v b="$t1" -v f="$ub_rss" -v n="$D" 'BEGIN {
  printf "unbound:    start with the list %.1f s; RSS %d MB: %.0f bytes per domain (whole process)\n", b - a, f / 1024, f * 1024 / n }'

echo "== dnsperf, $T s each, queries: half blocked, half allowed (cached after the first)"
run() {
  $CLIENT_CPU dnsperf -s 127.0.0.1 -p "$2" -d "$work/queries.txt" -l "$T" -c 8 -Q 200000 -q 500 2>&1 |
    awk -v name="$1" '/Queries per second/ {q=$4} /Average Latency/ {lat=$4} /Queries lost/ {lost=$3}
      END {printf "%-34s %10.0f queries/s  avg latency %.3f ms  lost %s\n", name, q, lat * 1000, lost}'
}
for r in 1 2 3; do
  run "[$r] unbound (local zones)" "$ub_port"
  run "[$r] portcullis (blocklist policy)" "$dport"
done
echo "portcullis after the benchmark: RSS $(( $(rss_kb "$pid") / 1024 )) MB"
