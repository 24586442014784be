#!/usr/bin/env bash
# Two builds of Portcullis side by side in one run on this machine, in alternating
# rounds, on the paths users hit most, with the defaults they get (access log at info,
# DNS query log on):
#   - gateway: keep-alive mTLS POSTs of a ~200-byte reading validated against
#     examples/telemetry.openapi.yaml, per-device rate limit on (ApacheBench, -k);
#   - DNS: dnsperf over UDP, half names from a 100,000-name blocklist (NXDOMAIN), half
#     allowed names answered from the cache of one upstream (dnsmasq).
# Both instances run at once with the same configuration; odd rounds measure the base
# first, even rounds the new build first. Prints each round and the ratio new/base of
# the medians. Used to show that a change leaves the hot paths unchanged within noise.
#   [PIN=1] [ROUNDS=n] bench/ab.sh BASE-DIR NEW-DIR [REQUESTS] [SECONDS]
# BASE-DIR and NEW-DIR each hold release builds of portcullis and portcullis-agent.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?BASE-DIR}
NEW=${2:?NEW-DIR}
N=${3:-30000}
T=${4:-10}
C=${C:-32}
ROUNDS=${ROUNDS:-4}
# shellcheck source=bench/lib.sh
source bench/lib.sh
# The log level `portcullis up` has by default: the gateway's access log line per request
# (to a file here, as a service manager would keep it).
BENCH_LOG=${BENCH_LOG:-info}
need nginx nginx
need ab apache2-utils
need dnsperf dnsperf
need dnsmasq dnsmasq-base
need dig dnsutils
if [ "${PIN:-0}" = 1 ]; then
  PORTCULLIS_ENV="taskset -c 0"; CLIENT_CPU="taskset -c 1"
else
  PORTCULLIS_ENV=""; CLIENT_CPU=""
fi

up_port=$(free_port)
dns_up=$(free_port)
nginx_upstream_conf "$up_port"
$CLIENT_CPU nginx -c "$work/up/nginx.conf" -g 'daemon off;' &
pids+=("$!")
$CLIENT_CPU dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$dns_up" --listen-address=127.0.0.1 \
  --bind-interfaces --local-ttl=3600 --address=/example.net/192.0.2.1 --pid-file="$work/dm.pid" 2>/dev/null &
pids+=("$!")

python3 - "$work" <<'PY'
import random, sys
work = sys.argv[1]
random.seed(7)
names = [f"ads{i}-{random.randrange(1 << 30):x}.track.com" for i in range(100000)]
with open(f"{work}/block.hosts", "w") as f:
    f.writelines(f"0.0.0.0 {d}\n" for d in names)
with open(f"{work}/queries.txt", "w") as f:
    for i in range(20000):
        f.write(f"{random.choice(names)} A\n" if i % 2 else f"host{i % 1000}.example.net A\n")
PY
gateway_route_conf "$up_port" >"$work/ab.toml"
cat >>"$work/ab.toml" <<CONF
rate_limit = { per_second = 1000000, burst = 1000000 }
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
printf '%s' '{"temperature": 21.5, "humidity": 40.25, "taken_at": "2026-11-25T10:00:00Z", "sequence": 184467, "battery": 87, "tags": ["lobby", "north", "floor-2", "door-east", "ceiling"], "source": "10.20.30.40"}' >"$work/reading.json"
path=/api/devices/bench-cam/telemetry

declare -A DEV DNSPORT
for b in base new; do
  dir=$BASE; [ "$b" = new ] && dir=$NEW
  INSTANCE=$b PORTCULLIS_BIN="$dir/portcullis" start_portcullis "$work/ab.toml"
  DEV[$b]=$dev
  DNSPORT[$b]=${dns##*:}
  INSTANCE=$b AGENT_BIN="$dir/portcullis-agent" enroll_bench_cam "$b"
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/root$b.pem" --cert "$work/agent$b/chain.pem" \
    --key "$work/agent$b/key.pem" -H 'Content-Type: application/json' -d '{"temperature": 1000}' "https://$dev$path")
  [ "$code" = 400 ] || { echo "$b: validation is not on (got $code)" >&2; exit 1; }
  for _ in $(seq 100); do
    dig @127.0.0.1 -p "${DNSPORT[$b]}" +time=1 +tries=1 host1.example.net A 2>/dev/null | grep -q "status: NOERROR" && break
    sleep 0.2
  done
  echo "$b: $dir/portcullis: device port $dev, dns ${DNSPORT[$b]}"
done

gw() { # gw BUILD -> requests/s
  $CLIENT_CPU ab -q -k -n "$N" -c "$C" -p "$work/reading.json" -T application/json -E "$work/client$1.pem" \
    "https://${DEV[$1]}$path" 2>&1 | awk '/Requests per second/ {print $4} /Non-2xx/ {print "non-2xx " $3 > "/dev/stderr"}'
}
dn() { # dn BUILD -> queries/s
  $CLIENT_CPU dnsperf -s 127.0.0.1 -p "${DNSPORT[$1]}" -d "$work/queries.txt" -l "$T" -c 8 -Q 200000 -q 500 2>&1 |
    awk '/Queries per second/ {print $4} /Queries lost/ {print "lost " $3 > "/dev/stderr"}'
}
for b in base new; do gw "$b" >/dev/null; N=2000 gw "$b" >/dev/null; dn "$b" >/dev/null; done
echo "== $ROUNDS rounds: gateway $N keep-alive POSTs at concurrency $C; DNS dnsperf $T s; PIN=${PIN:-0}"
: >"$work/results"
for r in $(seq "$ROUNDS"); do
  order="base new"; [ $((r % 2)) = 0 ] && order="new base"
  for b in $order; do
    g=$(gw "$b"); d=$(dn "$b")
    printf '[%d] %-4s gateway %10.0f req/s   dns %10.0f queries/s\n' "$r" "$b" "$g" "$d"
    echo "$b $g $d" >>"$work/results"
  done
done
awk '
  function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  { if ($1 == "base") { nb++; gb[nb] = $2; db[nb] = $3 } else { nn++; gn[nn] = $2; dn[nn] = $3 } }
  END {
    g0 = median(gb, nb); g1 = median(gn, nn); d0 = median(db, nb); d1 = median(dn, nn)
    printf "median gateway: base %.0f, new %.0f req/s: new/base %.3f\n", g0, g1, g1 / g0
    printf "median dns:     base %.0f, new %.0f queries/s: new/base %.3f\n", d0, d1, d1 / d0
  }' "$work/results"
