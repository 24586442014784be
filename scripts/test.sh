#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing
# (scripts/test-deps.sh), then runs every test of the workspace against the real binary.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test hostile`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
SCHEMATHESIS="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/schemathesis"
export SCHEMATHESIS
exec cargo test --workspace --locked "$@"
