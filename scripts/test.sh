#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing
# (scripts/test-deps.sh), then runs every test of the workspace against the real binary.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test hostile`); without
# any, the device port's end-to-end tests run a second time over HTTP/2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
SCHEMATHESIS="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/schemathesis"
export SCHEMATHESIS
cargo test --workspace --locked "$@"
if [ $# -eq 0 ]; then
    # The device port's end-to-end tests once more with every curl speaking HTTP/2
    # (ALPN h2): each answer must be the same over both protocols.
    PORTCULLIS_TEST_HTTP=2 cargo test --locked -p portcullis \
        --test gateway --test gateway_differentials --test gateway_upstream --test openapi \
        --test enrollment --test certificates --test firmware --test dns --test bad_input
fi
