#!/usr/bin/env bash
# The audit's exposure scan against nmap's connect scan (Debian nmap, `nmap -sT -T4`),
# side by side in one run on this machine: DEVICES simulated devices on their own
# loopback addresses (127.0.30.1 …, five open ports each: 22, 23, 80, 443, 554), every
# one registered in Portcullis with its address, then PORTS scanned on all of them by
#   portcullis audit run --scan-only --ports PORTS --rate 100000
# (the rate cap at its maximum, since nmap -T4 has none; the default cap is 10,000/s)
# and by
#   nmap -sT -T4 -Pn -n -p PORTS 127.0.30.1-DEVICES
# alternating, ROUNDS times. Reports wall time of each (the whole command), the ratio
# nmap/Portcullis, probes per second, and checks that both found the same open ports.
#   bench/audit.sh [DEVICES] [PORTS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
PORTS=${2:-1-1000}
ROUNDS=${3:-5}
[ "$N" -le 254 ] || { echo "at most 254 devices (one /24 of loopback)" >&2; exit 2; }
# shellcheck source=bench/lib.sh
source bench/lib.sh
need nmap nmap
cargo build --release -q -p portcullis -p portcullis-simdevice

target/release/portcullis-simdevice "127.0.30.1-127.0.30.$N" 22=open 23=open 80=open 443=open 554=open >"$work/sim.out" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do grep -q ready "$work/sim.out" 2>/dev/null && break; sleep 0.1; done
start_portcullis
for i in $(seq 1 "$N"); do
  $P device add "sim-$i" >/dev/null 2>&1
  $P device addresses "sim-$i" "127.0.30.$i" >/dev/null
done
probes=$(python3 -c "
import sys
n=0
for part in '$PORTS'.split(','):
    a,_,b=part.partition('-'); n+= (int(b)-int(a)+1) if b else 1
print(n*$N)")
echo "== $N devices x ports $PORTS = $probes probes per scan; $ROUNDS rounds"
now() { date +%s.%N; }
ratios=()
for r in $(seq 1 "$ROUNDS"); do
  t0=$(now)
  $P audit run --scan-only --ports "$PORTS" --rate 100000 --json >"$work/ours.json"
  t1=$(now)
  nmap -sT -T4 -Pn -n -p "$PORTS" -oG "$work/nmap.gnmap" "127.0.30.1-$N" >/dev/null
  t2=$(now)
  python3 - "$work/ours.json" "$work/nmap.gnmap" <<'PY'
import json, sys
ours = set()
for f in json.load(open(sys.argv[1]))["findings"]:
    if f["check"] == "exposure" and f["status"] != "resolved":
        ours.add(tuple(f["target"].rsplit(":", 1)))
theirs = set()
for line in open(sys.argv[2]):
    if line.startswith("Host: ") and "Ports: " in line:
        addr = line.split()[1]
        for p in line.split("Ports: ")[1].split(", "):
            if "/open/" in p:
                theirs.add((addr, p.split("/")[0].strip()))
if ours != theirs:
    print(f"MISMATCH: only ours {sorted(ours - theirs)[:5]}, only nmap {sorted(theirs - ours)[:5]}")
    sys.exit(1)
print(f"   open ports identical: {len(ours)}")
PY
  ratio=$(python3 -c "print(f'{($t2-$t1)/($t1-$t0):.2f}')")
  ratios+=("$ratio")
  python3 -c "print(f'round $r: portcullis {$t1-$t0:.2f} s ({$probes/($t1-$t0):,.0f} probes/s), nmap {$t2-$t1:.2f} s ({$probes/($t2-$t1):,.0f} probes/s), nmap/portcullis {$ratio}x')"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print "median nmap/portcullis wall-time ratio: " a[int((NR+1)/2)] "x"}'
