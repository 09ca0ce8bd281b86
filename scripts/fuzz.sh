#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60), seeded from
# fuzz/seeds/<target>/ where present. Needs cargo-fuzz (installed here on
# first use); RUSTC_BOOTSTRAP lets the stable toolchain build with the
# sanitizer flags cargo-fuzz uses.
set -euo pipefail
seconds=${1:-60}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo/fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
	corpus="corpus/$target"
	mkdir -p "$corpus"
	seeds=()
	[ -d "seeds/$target" ] && seeds=("seeds/$target")
	echo "fuzz: $target for ${seconds}s" >&2
	cargo fuzz run -O "$target" "$corpus" "${seeds[@]}" -- -max_total_time="$seconds" 2>&1 |
		grep -E '^(Done|#[0-9]+ +DONE)|SUMMARY|ERROR|panicked' || true
	# A crash leaves an artifact and a non-zero status above; check for it.
	if compgen -G "artifacts/$target/crash-*" >/dev/null; then
		echo "fuzz: $target found a crash: $(ls artifacts/$target/crash-*)" >&2
		exit 1
	fi
done
