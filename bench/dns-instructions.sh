#!/usr/bin/env bash
# User-space instructions per DNS query, under valgrind's callgrind (Debian `valgrind`),
# for one or more release builds of Portcullis, with the defaults users get (query log
# on, log level info): a 100,000-name blocklist for unknown clients, half the queries
# listed names (NXDOMAIN from the policy), half allowed names that an upstream (dnsmasq,
# `--local-ttl=3600`) answers once and the cache answers after. Unlike queries/s on a
# shared machine, an instruction count barely moves between runs: the number to compare
# two builds with, and to watch while optimising. Kernel time is not in it.
#   [N=queries] bench/dns-instructions.sh BIN-DIR [BIN-DIR...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/dns-instructions.sh BIN-DIR [BIN-DIR...]" >&2; exit 2; }
N=${N:-20000}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need valgrind valgrind
need dnsperf dnsperf
need dnsmasq dnsmasq-base
dns_up=$(free_port)
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$dns_up" --listen-address=127.0.0.1 \
  --bind-interfaces --local-ttl=3600 --address=/example.net/192.0.2.1 --pid-file="$work/dm.pid" 2>/dev/null &
pids+=("$!")
python3 - "$work" "$N" <<'PY'
import random, sys
work, n = sys.argv[1], int(sys.argv[2])
random.seed(7)
names = [f"ads{i}-{random.randrange(1 << 30):x}.track.com" for i in range(100000)]
with open(f"{work}/block.hosts", "w") as f:
    f.writelines(f"0.0.0.0 {d}\n" for d in names)
with open(f"{work}/queries.txt", "w") as f:
    for i in range(n):
        f.write(f"{random.choice(names)} A\n" if i % 2 else f"host{i % 1000}.example.net A\n")
PY
cat >"$work/dns.toml" <<CONF
[dns]
upstreams = ["127.0.0.1:$dns_up"]
unknown_clients = "lobby"
per_client = { per_second = 100000000, burst = 100000000 }
[dns.lists.big]
path = "$work/block.hosts"
[[dns.policies]]
name = "lobby"
mode = "blocklist"
lists = ["big"]
block = "nxdomain"
CONF
echo "== $N queries (half listed, half cached allowed names), query log on, log level info"
i=0
for dir in "$@"; do
  i=$((i + 1))
  INSTANCE=$i PORTCULLIS_BIN="$dir/portcullis" BENCH_LOG=${BENCH_LOG:-info} \
    PORTCULLIS_ENV="valgrind --tool=callgrind --callgrind-out-file=$work/pc$i.out" start_portcullis "$work/dns.toml"
  for _ in $(seq 600); do grep -q "admin API" "$work/up$i.out" 2>/dev/null && break; sleep 0.1; done
  port=${dns##*:}
  # Warm the cache with every allowed name, then count N queries.
  dnsperf -s 127.0.0.1 -p "$port" -d "$work/queries.txt" -n 1 -c 4 -q 50 >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null 2>&1
  out=$(dnsperf -s 127.0.0.1 -p "$port" -d "$work/queries.txt" -n 1 -c 4 -q 50 2>&1)
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  lost=$(awk '/Queries lost/ {print $3}' <<<"$out")
  f=$(ls -t "$work"/pc$i.out.* | head -1)
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$f" "$KEEP/dns$i.callgrind"; fi
  printf '%-40s %8d instructions/query (user space), %s lost\n' "$dir" $((total / N)) "${lost:-?}"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
done
