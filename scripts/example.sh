#!/usr/bin/env bash
# The example VM: installs what a fresh Debian 12 machine lacks, builds the
# guest kernel and its initramfs (mvm-agent as init; cached outside the
# clone, several minutes the first time) and the release binaries, installs
# `mvm` and `mvm-vmm` into /usr/local/bin and the kernel and initramfs as
# mvm's default guest, then:
#
#   mvm create example --project <this repository>
#                            (builds the default Debian image the first time:
#                             mmdebstrap from the Debian archive, ~1 minute)
#   mvm start example
#   mvm shell example        (on a terminal: bash in Debian; `exit` leaves it)
#   mvm stop example
#
# Not on a terminal, it runs a few commands with `mvm exec` instead of the
# shell. Run as root (the state root is /var/lib/microvm-dev unless
# MVM_STATE_DIR says otherwise). Arguments are ignored.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$repo"
bash scripts/setup-host.sh
eval "$(bash tests/guest/build.sh | sed 's/^/guest_/')"
echo "example: building mvm and mvm-vmm (release) ..." >&2
cargo build --release --locked -q -p mvm --bins

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
bindir=/usr/local/bin
"${sudo[@]}" install -m 0755 target/release/mvm target/release/mvm-vmm "$bindir/"
# `create-microvm-env` is `mvm direnv init` under its own name.
"${sudo[@]}" ln -sf mvm "$bindir/create-microvm-env"
"${sudo[@]}" ln -sf mvm "$bindir/mvm-devenv"
state_root=${MVM_STATE_DIR:-/var/lib/microvm-dev}
# mvm create's default guest: <state root>/guest/{vmlinux,initramfs.cpio}.
"${sudo[@]}" mkdir -p "$state_root/guest"
"${sudo[@]}" install -m 0644 "$guest_vmlinux" "$state_root/guest/vmlinux"
"${sudo[@]}" install -m 0644 "$guest_initramfs" "$state_root/guest/initramfs.cpio"
echo "example: installed $bindir/mvm (and create-microvm-env, mvm-devenv), $bindir/mvm-vmm and the guest kernel and initramfs in $state_root/guest/" >&2

mvm=("${sudo[@]}" "$bindir/mvm")
# A fresh example VM each time.
"${mvm[@]}" rm --force example >/dev/null 2>&1 || true
"${mvm[@]}" create example --project "$repo"
"${mvm[@]}" start example
if [ -t 0 ] && [ -t 1 ]; then
	echo "example: a shell in the VM; the repository is /project (changes stay in the VM); 'exit' leaves" >&2
	"${mvm[@]}" shell example || true
else
	"${mvm[@]}" exec example -- uname -a
	"${mvm[@]}" exec example -- bash -c 'echo "hello from $(hostname), Debian $(cat /etc/debian_version), in $(pwd)"; git --version; git log -1 --oneline; df -hT / /project'
fi
"${mvm[@]}" list
"${mvm[@]}" stop example
