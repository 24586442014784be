#!/usr/bin/env bash
# Installs the outside clients the tests drive, when missing, and exports nothing: run it
# as root (or with sudo available) on a fresh Debian machine; on a machine that has them
# it only checks, in well under a second.
#   Debian: openssl and curl (EST/mTLS interop), dig from dnsutils (DNS tests), nmap (the
#   audit's outside reference), openssh-server (the audit's SSH probe peer), gcc/g++/make
#   (bundled SQLite, libFuzzer), procps, strace (the agent's durable writes, syscall by syscall).
#   PyPI: schemathesis (OpenAPI conformance), dnspython (second DNS client), tuf
#   (python-tuf's ngclient reads the firmware repository).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive

missing=()
for pair in openssl:openssl curl:curl dig:dnsutils nmap:nmap gcc:gcc g++:g++ make:make ps:procps strace:strace; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3 python3-pip)
need_sshd=0
[ -x /usr/sbin/sshd ] || need_sshd=1

if [ "${#missing[@]}" -gt 0 ] || [ "$need_sshd" = 1 ]; then
  echo "== system packages: ${missing[*]} $([ "$need_sshd" = 1 ] && echo openssh-server)"
  $SUDO apt-get update -qq
  if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ "$need_sshd" = 1 ]; then
    # The audit test starts its own sshd on a loopback address; keep the package from
    # starting a system sshd on *:22 (it would answer on every simulated device's address).
    had_policy=0
    [ -e /usr/sbin/policy-rc.d ] && had_policy=1
    [ "$had_policy" = 1 ] || printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    $SUDO apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
    [ "$had_policy" = 1 ] || $SUDO rm -f /usr/sbin/policy-rc.d
  fi
fi

# Python clients, pinned; installed only when one is missing or at another version.
want=('schemathesis==4.32.5' 'dnspython==2.9.2' 'tuf==7.0.1')
if ! python3 - "${want[@]}" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, v = spec.split("==")
    if version(name) != v:
        sys.exit(1)
PY
  echo "== python test clients: ${want[*]}"
  python3 -m pip install --quiet --disable-pip-version-check "${want[@]}" \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${want[@]}"
fi
