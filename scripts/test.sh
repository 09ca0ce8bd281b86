#!/usr/bin/env bash
# Run every test: unit tests, end-to-end guest boots and bad-input checks.
# Installs what a fresh Debian 12 machine lacks and builds the test guest
# first (cached outside the clone; rebuilt only when its inputs change).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
bash scripts/setup-host.sh
bash tests/guest/build.sh >/dev/null
# The end-to-end tests run the mvm-vmm binary of the same profile.
cargo build --locked --workspace --bins
cargo test --locked --workspace
