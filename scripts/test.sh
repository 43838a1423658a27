#!/usr/bin/env bash
# The one command that runs every test: installs the system packages the
# tests need when they are missing, then runs the tests, the doc tests, the
# format check and clippy. CI runs it through .ci/run.
set -euo pipefail

# Run from the repository root whatever the caller's directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# redis-server (Redis cache and cluster tests), chromium (browser checks of
# the demo page) and python3-venv (the virtual environment of the OpenAI
# SDK, below; it brings python3). Installed up front so this stays the only
# command to run; skipped when all are present or when apt-get is not
# available.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 ||
    ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    packages=(redis-server chromium python3-venv)
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

# The official OpenAI Python SDK, which tests/http_api_sdk.rs runs against
# the server: a virtual environment under the target directory (where cargo
# builds, so CARGO_TARGET_DIR moves it too) with the exact versions of
# tests/openai_sdk/requirements.txt. Kept as long as it imports the pinned
# openai version and was built from the same requirements; rebuilt from
# scratch otherwise (`cargo clean` removes it with the rest of target/).
venv="${CARGO_TARGET_DIR:-target}/py-venv"
requirements=tests/openai_sdk/requirements.txt
openai_pin="$(sed -n 's/^openai==//p' "$requirements")"
if ! cmp -s "$requirements" "$venv/requirements.txt" ||
    ! "$venv/bin/python" -c 'import sys, openai; sys.exit(openai.__version__ != sys.argv[1])' \
        "$openai_pin" >/dev/null 2>&1; then
    echo "test.sh: creating $venv with openai $openai_pin"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi

# --locked: test exactly the dependency versions in Cargo.lock.
# --all-targets covers the library, the binary, the integration tests and
# the benches, but not doc tests, which need their own run.
cargo test --all-targets --locked
cargo test --doc --locked

# Formatting and lints are part of the test: warnings fail the run.
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
