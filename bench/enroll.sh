#!/usr/bin/env bash
# End-to-end EST enrollment benchmark: starts a release `portcullis up` on loopback with
# port 0 in a fresh data dir, runs N concurrent agents against it, and prints the
# throughput next to the in-process ceiling measured in the same run.
#   bench/enroll.sh [N] [CONCURRENCY]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
C=${2:-64}
cargo build --release -q -p portcullis -p portcullis-bench
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
PORTCULLIS_LOG=warn target/release/portcullis --data-dir "$work/data" up \
  --device-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 >"$work/up.out" &
pid=$!
for _ in $(seq 100); do grep -q "admin API" "$work/up.out" 2>/dev/null && break; sleep 0.1; done
dev=$(awk '/device port/ {print $NF}' "$work/up.out")
adm=$(awk '/admin API/ {print $NF}' "$work/up.out")
target/release/portcullis --data-dir "$work/data" ca cert >"$work/root.pem"
target/release/portcullis-enroll-bench --server "https://$dev" --ca "$work/root.pem" \
  --admin "$adm" --admin-token "$work/data/admin.token" -n "$N" -c "$C" --server-pid "$pid"
