#!/usr/bin/env bash
# DNS over TLS and DNS over HTTPS, side by side in one run: Portcullis (its DoT port and
# DoH on the device port; with a device certificate, which attributes every query to the
# device, and without one, attributed by address) against unbound 1.17 (DoT and DoH,
# Debian's build has nghttp2; no client certificates). The data and query mix of
# bench/dns.sh (1,000,000 listed names, subtree match, half listed, half cached allowed
# names); Portcullis with its defaults (query log on). dnsperf 2.10 `-m dot` / `-m doh`
# (POST), 8 clients, 200 outstanding, keep-alive connections, SECONDS per run, ROUNDS
# rounds. dnsperf has no client-certificate option: bench/h2load-clientcert.c, preloaded,
# gives its TLS contexts the device's chain and key.
#   [ROUNDS=3] bench/dns-encrypted.sh [DOMAINS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-1000000}
T=${2:-10}
ROUNDS=${ROUNDS:-3}
given_bin=${PORTCULLIS_BIN:-}
# shellcheck source=bench/lib.sh
source bench/lib.sh
need dnsmasq dnsmasq-base
need unbound unbound
need dnsperf dnsperf
need gcc gcc
need openssl openssl
need h2load nghttp2-client
[ -n "$given_bin" ] || cargo build --release -q -p portcullis -p portcullis-agent
gcc -shared -fPIC -O2 -o "$work/clientcert.so" bench/h2load-clientcert.c -ldl

dns_bench_data "$D"

up_port=$(free_port)
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port="$up_port" --listen-address=127.0.0.1 \
  --bind-interfaces --local-ttl=3600 --conf-file="$work/dnsmasq-allowed.conf" --pid-file="$work/up.pid" 2>/dev/null &
pids+=("$!")

cat >"$work/pc.toml" <<CONF
[dns]
upstreams = ["127.0.0.1:$up_port"]
unknown_clients = "lobby"
per_client = { per_second = 100000000, burst = 100000000 }
[dns.lists.big]
path = "$work/block.txt"
match = "subtree"
[[dns.policies]]
name = "lobby"
groups = ["default"]
mode = "blocklist"
lists = ["big"]
block = "nxdomain"
CONF
start_portcullis "$work/pc.toml"
dot=$(awk '/dns over tls/ {print $NF}' "$work/up.out")
enroll_bench_cam

# unbound with DoT and DoH on a self-signed certificate.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -keyout "$work/ub.key" -out "$work/ub.pem" 2>/dev/null
ub_dot=$(free_port); ub_doh=$(free_port)
cat >"$work/unbound.conf" <<CONF
server:
  interface: 127.0.0.1@$ub_dot
  interface: 127.0.0.1@$ub_doh
  tls-port: $ub_dot
  https-port: $ub_doh
  tls-service-key: "$work/ub.key"
  tls-service-pem: "$work/ub.pem"
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$work"
  pidfile: "$work/unbound.pid"
  use-syslog: no
  verbosity: 0
  num-threads: 2
  so-reuseport: yes
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  incoming-num-tcp: 1000
  include: "$work/unbound-zones.conf"
CONF
unbound -c "$work/unbound.conf" 2>"$work/ub.err" &
pids+=("$!")
for _ in $(seq 300); do
  dnsperf -m dot -s 127.0.0.1 -p "$ub_dot" -d "$work/queries.txt" -n 1 -c 1 -q 1 -l 1 >/dev/null 2>&1 && break
  sleep 0.2
done

# run LABEL MODE PORT [cert]: queries/s.
run() {
  local args=(-m "$2" -s 127.0.0.1 -p "$3" -d "$work/queries.txt" -l "$T" -c 8 -q 200)
  [ "$2" = doh ] && args+=(-O doh-method=POST -O "doh-uri=https://127.0.0.1:$3/dns-query")
  local env=()
  [ "${4:-}" = cert ] && env=(H2LOAD_CERT="$work/agent/chain.pem" H2LOAD_KEY="$work/agent/key.pem" LD_PRELOAD="$work/clientcert.so")
  env "${env[@]}" dnsperf "${args[@]}" 2>&1 |
    awk -v name="$1" '/Queries per second/ {q=$4} /Average Latency/ {lat=$4} /Queries lost/ {lost=$3}
      END {printf "%-44s %9.0f queries/s  avg %6.3f ms  lost %s\n", name, q, lat * 1000, lost}'
}
dev_port=${dev##*:}
# One cached allowed name as a DoH POST body, for h2load (dnsperf's DoH client loses
# answers when two streams' frames interleave; h2load does not).
python3 - "$work" <<'PY'
import struct, sys
name = b"".join(bytes([len(l)]) + l for l in [b"host7", b"example", b"net"]) + b"\0"
open(f"{sys.argv[1]}/q.bin", "wb").write(struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1))
PY
# h2 LABEL PORT [cert]: DoH POSTs/s with h2load, 8 connections x 25 streams.
h2() {
  local env=()
  [ "${3:-}" = cert ] && env=(H2LOAD_CERT="$work/agent/chain.pem" H2LOAD_KEY="$work/agent/key.pem" LD_PRELOAD="$work/clientcert.so")
  env "${env[@]}" h2load -n 200000 -c 8 -m 25 -d "$work/q.bin" -H 'content-type: application/dns-message' \
    -H 'accept: application/dns-message' "https://127.0.0.1:$2/dns-query" 2>&1 |
    awk -v name="$1" '/^finished in/ {r=$4} /^requests:/ {ok=$8} END {printf "%-44s %9.0f queries/s  (%s of 200000 succeeded)\n", name, r, ok}'
}
echo "== DoT and DoH, $T s per run, $ROUNDS rounds (query log on for Portcullis)"
for r in $(seq "$ROUNDS"); do
  run "[$r] unbound DoT" dot "$ub_dot"
  run "[$r] portcullis DoT, no client certificate" dot "${dot##*:}"
  run "[$r] portcullis DoT, device certificate" dot "${dot##*:}" cert
  run "[$r] unbound DoH (POST)" doh "$ub_doh"
  run "[$r] portcullis DoH (POST), no client certificate" doh "$dev_port"
  run "[$r] portcullis DoH (POST), device certificate" doh "$dev_port" cert
  h2 "[$r] h2load: unbound DoH (POST, one cached name)" "$ub_doh"
  h2 "[$r] h2load: portcullis DoH, no client certificate" "$dev_port"
  h2 "[$r] h2load: portcullis DoH, device certificate" "$dev_port" cert
done
