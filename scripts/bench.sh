#!/usr/bin/env bash
# Run the benchmarks (release build): every bench of benches/ (the trivial
# guest cycle, boot to guest userspace, device request costs, guest block
# and network throughput; README.md lists them). Results print as tables and
# JSON, and are written to target/bench-results/. MVM_BENCH_RUNS /
# MVM_BENCH_BOOT_RUNS set the counts. guest_net makes a network namespace
# and a TAP, network (managed networks: up/down, attach, port forwards)
# makes namespaces with a bridge, nftables and dnsmasq: run as root.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
bash scripts/setup-host.sh
bash tests/guest/build.sh >/dev/null
cargo build --release --locked --workspace --bins
cargo bench --locked -p mvm-benches
