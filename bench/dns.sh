#!/usr/bin/env bash
# The DNS port with a big blocklist, side by side in one run on this machine with
# unbound (Debian; each name as `local-zone: "<d>" always_nxdomain`) and dnsmasq (Debian
# dnsmasq-base, the resolver inside Pi-hole; each name as `address=/<d>/`), all loaded
# with the same deterministic synthetic list (NXDOMAIN for listed names everywhere):
#   - load time and memory per listed domain (RSS with the list minus RSS without);
#   - memory across list refreshes (the old list must be freed after each swap);
#   - queries/s with dnsperf (Debian dnsperf): half blocked names from the list, half
#     allowed names answered from the cache of one upstream (dnsmasq answering everything
#     under example.net).
#   [PIN=1] bench/dns.sh [DOMAINS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-1000000}
T=${2:-10}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need dnsmasq dnsmasq-base
need unbound unbound
# dnsmasq's start with a big address= list is waited for at most this long.
DNSMASQ_WAIT=${DNSMASQ_WAIT:-300}
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
        f.write(f'local-zone: "{d}." always_nxdomain\n')
with open(f"{work}/block.dnsmasq", "w") as f:
    for d in names:
        f.write(f"address=/{d}/\n")
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
block = "nxdomain"
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
    dig @127.0.0.1 -p "$dport" refresh-$r.example A | grep -q "status: NXDOMAIN" && break
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
  local-zone: "refresh-1.example." always_nxdomain
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@$up_port
CONF
t0=$(date +%s.%N)
$SERVER_CPU unbound -c "$work/unbound.conf" 2>"$work/ub.err" &
ub=$!
pids+=("$ub")
for _ in $(seq 3000); do
  dig @127.0.0.1 -p "$ub_port" +time=1 +tries=1 refresh-1.example A 2>/dev/null | grep -q "status: NXDOMAIN" && break
  sleep 0.1
done
t1=$(date +%s.%N)
ub_rss=$(rss_kb "$ub")
awk -v a="$t0" -v b="$t1" -v f="$ub_rss" -v n="$D" 'BEGIN {
  printf "unbound:    start with the list %.1f s; RSS %d MB: %.0f bytes per domain (whole process)\n", b - a, f / 1024, f * 1024 / n }'

# dnsmasq with the same names as address=/<d>/ lines.
dm_port=$(free_port)
echo "address=/refresh-1.example/" >>"$work/block.dnsmasq"
t0=$(date +%s.%N)
$SERVER_CPU dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$dm_port" --listen-address=127.0.0.1 \
  --bind-interfaces --server="127.0.0.1#$up_port" --conf-file="$work/block.dnsmasq" --cache-size=10000 \
  --pid-file="$work/dm.pid" 2>"$work/dm.err" &
dm=$!
pids+=("$dm")
dm_ok=0
for _ in $(seq $((DNSMASQ_WAIT * 5))); do
  if dig @127.0.0.1 -p "$dm_port" +time=1 +tries=1 refresh-1.example A 2>/dev/null | grep -q "status: NXDOMAIN"; then dm_ok=1; break; fi
  sleep 0.2
done
t1=$(date +%s.%N)
if [ "$dm_ok" = 1 ]; then
  dm_rss=$(rss_kb "$dm")
  awk -v a="$t0" -v b="$t1" -v f="$dm_rss" -v n="$D" 'BEGIN {
    printf "dnsmasq:    start with the list %.1f s; RSS %d MB: %.0f bytes per domain (whole process)\n", b - a, f / 1024, f * 1024 / n }'
else
  echo "dnsmasq:    not answering NXDOMAIN for a listed name after ${DNSMASQ_WAIT} s; left out ($(tail -1 "$work/dm.err"))"
fi

echo "== dnsperf, $T s each, queries: half blocked, half allowed (cached after the first)"
run() {
  $CLIENT_CPU dnsperf -s 127.0.0.1 -p "$2" -d "$work/queries.txt" -l "$T" -c 8 -Q 200000 -q 500 2>&1 |
    awk -v name="$1" '/Queries per second/ {q=$4} /Average Latency/ {lat=$4} /Queries lost/ {lost=$3}
      END {printf "%-34s %10.0f queries/s  avg latency %.3f ms  lost %s\n", name, q, lat * 1000, lost}'
}
for r in 1 2 3; do
  [ "$dm_ok" = 1 ] && run "[$r] dnsmasq (address=)" "$dm_port"
  run "[$r] unbound (local zones)" "$ub_port"
  run "[$r] portcullis (blocklist policy)" "$dport"
done
echo "portcullis after the benchmark: RSS $(( $(rss_kb "$pid") / 1024 )) MB"
