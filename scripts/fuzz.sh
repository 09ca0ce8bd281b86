#!/usr/bin/env bash
# Run every fuzz target (or the ones named after SECONDS) for SECONDS each
# (default 60), seeded from fuzz/seeds/<target>/ where present, and print a
# table of what each run did: executions, libFuzzer's coverage counters
# (cov: covered edges, ft: features), the corpus size, and where coverage
# last grew (an early share of the run means the target has plateaued).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   MVM_FUZZ_MINIMIZE=1 scripts/fuzz.sh ...   also minimise each working
#                                            corpus (fuzz/corpus/<target>) in place
#
# fuzz/seeds/<target>/ (in git) holds small hand-written starting inputs and
# the inputs of fixed crashes; the grown corpora (megabytes) stay out of git.
#
# Needs cargo-fuzz (installed here on first use); RUSTC_BOOTSTRAP lets the
# stable toolchain build with the sanitizer flags cargo-fuzz uses. The
# working corpora live in fuzz/corpus/ (not in git). A crash stops the run
# with the artifact's path.
set -euo pipefail
seconds=${1:-60}
shift || true
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo/fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
rows=()
for target in "${targets[@]}"; do
	corpus="corpus/$target"
	mkdir -p "$corpus"
	seeds=()
	[ -d "seeds/$target" ] && seeds=("seeds/$target")
	echo "fuzz: $target for ${seconds}s" >&2
	log=$(mktemp)
	cargo fuzz run -O "$target" "$corpus" "${seeds[@]}" -- \
		-max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || true
	# A crash leaves an artifact; report it and stop.
	if compgen -G "artifacts/$target/crash-*" >/dev/null; then
		grep -E 'panicked|SUMMARY|ERROR' "$log" >&2 || true
		echo "fuzz: $target found a crash: $(ls artifacts/$target/crash-*)" >&2
		exit 1
	fi
	# The last status line: "#<execs> <event> cov: <n> ft: <n> corp: <units>/<size> ...".
	done_line=$(grep -E '^#[0-9]+[[:space:]].* cov: [0-9]+' "$log" | tail -1 || true)
	execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -1)
	rate=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -1)
	cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$done_line")
	ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$done_line")
	corp=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$done_line")
	# Plateau: edges covered at half the run against the end, and the
	# execution at which a new feature was last found ("#<n> NEW ..."), as
	# a share of all executions (near 0 %: the last stretch found nothing).
	half_cov=$(awk -v half="$(( ${execs:-0} / 2 ))" '
		match($0, /^#[0-9]+/) && / cov: / {
			n = substr($0, 2, RLENGTH - 1) + 0
			if (n <= half) { sub(/.* cov: /, ""); split($0, f, " "); c = f[1] }
		}
		END { print (c == "" ? "?" : c) }' "$log")
	last_new=$(grep -E '^#[0-9]+[[:space:]]+NEW ' "$log" | tail -1 | sed -nE 's/^#([0-9]+).*/\1/p' || true)
	if [ -n "$last_new" ] && [ -n "$execs" ] && [ "$execs" -gt 0 ]; then
		last_new_pct=$((100 * last_new / execs))
	else
		last_new_pct=0
	fi
	if [ -z "$done_line" ]; then
		tail -20 "$log" >&2
		echo "fuzz: $target: no final status line (build or run failed, log above)" >&2
		exit 1
	fi
	rm -f "$log"
	if [ "${MVM_FUZZ_MINIMIZE:-0}" = 1 ]; then
		cargo fuzz cmin -O "$target" "$corpus" >/dev/null 2>&1 || true
	fi
	rows+=("| $target | ${seconds} s | ${execs:-?} | ${rate:-?}/s | ${half_cov} -> ${cov:-?} | ${ft:-?} | ${corp:-?} | ${last_new:-none} (${last_new_pct} %) |")
done
echo
echo "| target | time | execs | rate | cov (edges) at half -> end | ft (features) | corpus (units/bytes) | last new feature at exec (share of run) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
