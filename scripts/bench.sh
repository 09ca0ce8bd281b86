#!/usr/bin/env bash
# Run the benchmarks (release build): (a) the trivial guest cycle, (b) boot
# to guest userspace. Results print as tables and JSON, and are written to
# target/bench-results/. MVM_BENCH_RUNS / MVM_BENCH_BOOT_RUNS set the counts.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
bash scripts/setup-host.sh
bash tests/guest/build.sh >/dev/null
cargo build --release --locked --workspace --bins
cargo bench --locked -p mvm-benches
