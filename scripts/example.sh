#!/usr/bin/env bash
# Boot the example VM (examples/vm.toml): installs the Debian packages the
# guest build needs, builds the test guest kernel and initramfs on first use
# (cached outside the clone, several minutes the first time), builds
# mvm-vmm, and runs the VM on this terminal. Extra arguments are ignored.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
bash scripts/setup-host.sh
bash tests/guest/build.sh >/dev/null
echo "example: building mvm-vmm (release) ..." >&2
cargo build --release --locked -q -p mvm
exec target/release/mvm-vmm run examples/vm.toml
