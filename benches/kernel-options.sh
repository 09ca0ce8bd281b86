#!/usr/bin/env bash
# Boot-time cost of guest kernel options: boots each given kernel with
# mvm-vmm, interleaved (A B C A B C ...), and times process start -> the
# agent's "ready on vsock port 1024" console line.
#
#   benches/kernel-options.sh ROUNDS INITRD LABEL=VMLINUX [LABEL=VMLINUX ...]
#
# Env: MVM_VMM (default target/debug/mvm-vmm), MEMORY_MIB (256),
# TIMEOUT (s per boot, 300), OUT (result directory, a new temp dir).
# Prints one tab-separated line per boot:
#   label  round  wall_s  cpu_s  guest_init_s  vmlinux_bytes
# cpu_s is the VMM's user+system CPU time until the ready line: on a PVM
# host the interpreted guest kernel runs inside KVM_RUN, so this counts
# the guest's work and, unlike wall time, hardly depends on what else the
# shared machine runs.  guest_init_s is the guest's printk time of
# "Run /sbin/mvm-agent as init process".  Then a median/min/max summary
# per label.  Console logs stay in OUT.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
rounds=$1 initrd=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd -P)
vmm=${MVM_VMM:-$here/target/debug/mvm-vmm}
mem=${MEMORY_MIB:-256}
timeout=${TIMEOUT:-300}
out=${OUT:-$(mktemp -d /tmp/kernel-options.XXXXXX)}
mkdir -p "$out"
[ -x "$vmm" ] || { echo "no mvm-vmm at $vmm (cargo build -p mvm --bin mvm-vmm)" >&2; exit 1; }
results="$out/results.tsv"
: >"$results"

boot() { # label round vmlinux
	local label=$1 round=$2 kernel=$3 state="$out/state-$1-$2" log="$out/console-$1-$2.log"
	mkdir -p "$state"
	cat >"$state/vm.toml" <<-TOML
		version = 1
		name = "kbench"
		state_root = "$state"
		[machine]
		vcpus = 1
		memory_mib = $mem
		[boot]
		kernel = "$kernel"
		initrd = "$initrd"
		cmdline = "console=ttyS0 reboot=k panic=-1 rdinit=/sbin/mvm-agent"
		[vsock]
		uds_path = "$state/v.sock"
		[console]
		output = "stdio"
		input = "none"
	TOML
	local t0 t1 pid wall=timeout cpu=none init
	: >"$log"
	t0=$(date +%s.%N)
	"$vmm" run "$state/vm.toml" >"$log" 2>&1 </dev/null &
	pid=$!
	while kill -0 "$pid" 2>/dev/null; do
		if grep -q 'mvm-agent: ready on vsock port 1024' "$log"; then
			t1=$(date +%s.%N)
			# utime + stime (fields 14, 15), in clock ticks.
			cpu=$(sed 's/^.*) //' "/proc/$pid/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($12 + $13) / hz}')
			wall=$(echo "$t1 - $t0" | bc)
			break
		fi
		if [ "$(echo "$(date +%s.%N) - $t0 > $timeout" | bc)" = 1 ]; then break; fi
		sleep 0.1
	done
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	init=$(sed -n 's/^\[ *\([0-9.]*\)\] Run \/sbin\/mvm-agent as init process.*/\1/p' "$log" | head -n1)
	printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$round" "$wall" "$cpu" "${init:-none}" \
		"$(stat -L -c %s "$kernel")" | tee -a "$results"
}

for round in $(seq 1 "$rounds"); do
	for spec in "$@"; do
		boot "${spec%%=*}" "$round" "${spec#*=}"
	done
done

echo "# label  wall: median min max  cpu: median min max  guest init: median min max (s), n=$rounds"
for spec in "$@"; do
	label=${spec%%=*}
	for col in 3 4 5; do
		awk -F'\t' -v l="$label" -v c=$col '$1==l && $c ~ /^[0-9.]+$/ {print $c}' "$results" | sort -n |
			awk '{v[NR]=$1} END {if (NR==0) {printf " - - -"; exit}
				m = NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2
				printf " %.1f %.1f %.1f", m, v[1], v[NR]}'
	done | sed "s/^/$label/"
	echo
done
echo "# results: $results"
