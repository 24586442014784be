# Shared by the benchmark scripts: a work dir cleaned on exit, free loopback ports, and a
# release `portcullis up` on port 0 whose bound addresses land in $dev and $adm.
# shellcheck shell=bash

work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

need() { # need TOOL DEBIAN-PACKAGE...
  command -v "$1" >/dev/null || { shift; apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}

# start_portcullis [CONFIG-FILE]: sets $pid, $dev, $adm and $P (the CLI for this instance).
start_portcullis() {
  local cfg=()
  [ -n "${1:-}" ] && cfg=(--config "$1")
  P="target/release/portcullis ${cfg[*]} --data-dir $work/data"
  PORTCULLIS_LOG=warn ${PORTCULLIS_ENV:-} $P up --device-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --dns-addr 127.0.0.1:0 --dot-addr 127.0.0.1:0 >"$work/up.out" 2>"$work/up.err" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do grep -q "admin API" "$work/up.out" 2>/dev/null && break; sleep 0.1; done
  dev=$(awk '/device port/ {print $NF}' "$work/up.out")
  adm=$(awk '/admin API/ {print $NF}' "$work/up.out")
  $P ca cert >"$work/root.pem"
  $P ca chain >"$work/chain.pem"
}
