#!/usr/bin/env bash
# Soak run (not part of CI): SECONDS_TOTAL (default 600) of mixed load with faults injected,
# against a release build, loopback only, stopping by itself. See bench/soak.py for the
# load, the faults and the report. Writes bench/results/soak.{json,csv,png}.
#   bench/soak.sh [SECONDS] [DEVICES]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-600}
DEVICES=${2:-12}
# shellcheck source=bench/lib.sh
source bench/lib.sh
python3 -c 'import dns.message, matplotlib' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check 'dnspython==2.9.2' 'matplotlib==3.11.2' \
  || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'dnspython==2.9.2' 'matplotlib==3.11.2'
cargo build --release -q -p portcullis -p portcullis-agent
ulimit -n "$(ulimit -Hn)"
mkdir -p bench/results
python3 bench/soak.py --bin target/release/portcullis --agent target/release/portcullis-agent \
  --work "$work" --seconds "$SECS" --devices "$DEVICES" --out bench/results
