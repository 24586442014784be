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

# The binaries under test: this tree's release build unless PORTCULLIS_BIN / AGENT_BIN
# name others (bench/ab.sh compares two builds that way).
PORTCULLIS_BIN=${PORTCULLIS_BIN:-target/release/portcullis}
AGENT_BIN=${AGENT_BIN:-target/release/portcullis-agent}

# start_portcullis [CONFIG-FILE]: sets $pid, $dev, $adm, $dns and $P (the CLI for this
# instance). INSTANCE=name keeps its data dir and output apart from other instances.
start_portcullis() {
  local cfg=() out="$work/up${INSTANCE:-}.out"
  [ -n "${1:-}" ] && cfg=(--config "$1")
  P="$PORTCULLIS_BIN ${cfg[*]} --data-dir $work/data${INSTANCE:-}"
  PORTCULLIS_LOG=${BENCH_LOG:-warn} ${PORTCULLIS_ENV:-} $P up --device-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 --dns-addr 127.0.0.1:0 --dot-addr 127.0.0.1:0 >"$out" 2>"$work/up${INSTANCE:-}.err" &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do grep -q "admin API" "$out" 2>/dev/null && break; sleep 0.1; done
  dev=$(awk '/device port/ {print $NF}' "$out")
  adm=$(awk '/admin API/ {print $NF}' "$out")
  dns=$(awk '/dns \(udp, tcp\)/ {print $NF}' "$out")
  $P ca cert >"$work/root${INSTANCE:-}.pem"
  $P ca chain >"$work/chain${INSTANCE:-}.pem"
}

# gateway_route_conf UPSTREAM-PORT: the gateway benchmarks' route (OpenAPI validation of
# the telemetry API, 4 KiB bodies) with the unauthenticated limit out of the way.
gateway_route_conf() {
  cat <<CONF
[gateway]
unauthenticated_per_ip = { per_second = 1000000, burst = 1000000 }
[[gateway.routes]]
prefix = "/api/"
upstream = "http://127.0.0.1:$1"
openapi = "$PWD/examples/telemetry.openapi.yaml"
max_body_bytes = 4096
CONF
}

# enroll_bench_cam [SUFFIX]: registers bench-cam on the instance started last and enrolls
# it with the agent ($AGENT_BIN) into $work/agentSUFFIX; $work/clientSUFFIX.pem holds its
# chain and key (for ab -E).
enroll_bench_cam() {
  local token
  token=$($P device add bench-cam 2>/dev/null)
  $AGENT_BIN enroll --server "https://$dev" --ca "$work/root${INSTANCE:-}.pem" --id bench-cam \
    --token "$token" --dir "$work/agent${1:-}" >/dev/null
  cat "$work/agent${1:-}/chain.pem" "$work/agent${1:-}/key.pem" >"$work/client${1:-}.pem"
}

# The gateway benchmarks' nginx pair, both written under $work:
#   nginx_upstream_conf UPSTREAM-PORT: $work/up/nginx.conf, `return 200` on plain HTTP;
#   nginx_proxy_conf PORT UPSTREAM-PORT WORKERS [EXTRA-MAIN-DIRECTIVE]: $work/nginx/nginx.conf,
#     mTLS (`ssl_verify_client on`, the Portcullis CA) proxying to the upstream, keep-alive;
#     NGINX_REUSEPORT=1 gives each worker its own listening socket (`listen … reuseport`);
#     NGINX_HTTP2=1 offers HTTP/2 (`listen … ssl http2`, nginx 1.22's syntax).
nginx_upstream_conf() {
  mkdir -p "$work/up"
  cat >"$work/up/nginx.conf" <<CONF
worker_processes 1;
pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$1; keepalive_requests 1000000; location / { return 200 "ok\n"; } }
}
CONF
}

nginx_proxy_conf() {
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<CONF
${4:-}
worker_processes $3;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:$2; keepalive 64; }
  server {
    listen 127.0.0.1:$1 ssl${NGINX_HTTP2:+ http2}${NGINX_REUSEPORT:+ reuseport};
    ssl_certificate $work/data/tls/server.crt;
    ssl_certificate_key $work/data/tls/server.key;
    ssl_client_certificate $work/chain.pem;
    ssl_verify_client on;
    ssl_verify_depth 2;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Device \$ssl_client_s_dn;
    }
  }
}
CONF
}

# dns_bench_data DOMAINS: issue 18's DNS data in $work — block.txt (DOMAINS synthetic names,
# one per line), unbound-zones.conf (an always_nxdomain local zone per name, local-data for
# 1,000 allowed names, "." refused), dnsmasq-all.conf (address= for both),
# dnsmasq-allowed.conf (the allowed names only) and queries.txt (200,000 queries: half
# listed names, a tenth of those a random subdomain; half allowed names).
dns_bench_data() {
  python3 - "$1" "$work" <<'PY'
import random, sys
n, work = int(sys.argv[1]), sys.argv[2]
random.seed(7)
words = ["ads", "track", "metric", "pixel", "beacon", "cdn", "stat", "log", "tag", "promo"]
tlds = ["com", "net", "org", "io", "biz", "info"]
names = [f"{random.choice(words)}{i}-{random.randrange(1 << 30):x}.{random.choice(words)}.{random.choice(tlds)}" for i in range(n)]
allowed = [(f"host{i}.example.net", f"192.0.2.{i % 250 + 1}") for i in range(1000)]
with open(f"{work}/block.txt", "w") as f:
    f.write("# synthetic blocklist, one domain per line\n")
    f.writelines(f"{d}\n" for d in names)
with open(f"{work}/unbound-zones.conf", "w") as f:
    f.writelines(f'  local-zone: "{d}." always_nxdomain\n' for d in names)
    for a, ip in allowed:
        f.write(f'  local-data: "{a}. 3600 IN A {ip}"\n')
    f.write('  local-zone: "." refuse\n')
with open(f"{work}/dnsmasq-all.conf", "w") as f:
    f.writelines(f"address=/{d}/\n" for d in names)
    f.writelines(f"address=/{a}/{ip}\n" for a, ip in allowed)
with open(f"{work}/dnsmasq-allowed.conf", "w") as f:
    f.writelines(f"address=/{a}/{ip}\n" for a, ip in allowed)
with open(f"{work}/queries.txt", "w") as f:
    for i in range(200000):
        if i % 2:
            d = random.choice(names)
            if random.random() < 0.1:
                d = f"x{random.randrange(1 << 20):x}.{d}"
            f.write(f"{d} A\n")
        else:
            f.write(f"{allowed[(i // 2) % 1000][0]} A\n")
PY
}
