#!/usr/bin/env bash
# The one command that runs every test: installs the system packages the
# tests need when they are missing, then runs the tests, the doc tests, the
# format check and clippy. CI runs it through .ci/run.
set -euo pipefail

# Run from the repository root whatever the caller's directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# redis-server (Redis cache and cluster tests) and chromium (browser checks
# of the demo page). Installed up front so this stays the only command to
# run; skipped when both are present or when apt-get is not available.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
    packages=(redis-server chromium)
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: apt-get not found; not installing ${packages[*]}" >&2
    else
        sudo=()
        if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        fi
        echo "test.sh: installing ${packages[*]}"
        "${sudo[@]}" apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "${packages[@]}"
    fi
fi

# --locked: test exactly the dependency versions in Cargo.lock.
# --all-targets covers the library, the binary, the integration tests and
# the benches, but not doc tests, which need their own run.
cargo test --all-targets --locked
cargo test --doc --locked

# Formatting and lints are part of the test: warnings fail the run.
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
