#!/usr/bin/env bash
# Build the microvm-dev test guest: a minimal Linux 6.1 kernel (vmlinux ELF and
# bzImage) and a tiny uncompressed initramfs (busybox, tests/guest/init,
# /bin/mvm-vsock built from tests/guest/vsock.c and the guest agent
# /sbin/mvm-agent, a static build of bin/agent; boot with
# `rdinit=/sbin/mvm-agent` to have the agent as PID 1 instead of /init).
#
#   tests/guest/build.sh            (from any directory)
#
# Inputs: /usr/src/linux-source-6.1.tar.xz (Debian package linux-source-6.1),
# tests/guest/kernel.config (Kconfig fragment over tinyconfig),
# tests/guest/patches/*.patch, tests/guest/init, tests/guest/vsock.c,
# /bin/busybox (busybox-static), gcc and the kernel's UAPI headers
# (build-essential), the mvm-agent binary (built here with cargo, static,
# unless MVM_AGENT names one).  scripts/setup-host.sh installs the packages.
#
# Results are cached, keyed by a SHA-256 of their inputs, under
#   ${MVM_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microvm-dev/guest}/
#     kernel-<hash>/     vmlinux bzImage config System.map gen_init_cpio build.log
#     initramfs-<hash>/  initramfs.cpio cpio.list
# and rebuilt only when the hash changes.  Builds happen in a temporary
# directory inside the cache and are renamed into place at the end, so an
# interrupted build never leaves a partial entry.
#
# Output: progress on stderr; on stdout exactly three lines
#   vmlinux=/abs/path/vmlinux
#   bzImage=/abs/path/bzImage
#   initramfs=/abs/path/initramfs.cpio
# (paths inside the cache entries).  <repo>/target/guest/{vmlinux,bzImage,
# initramfs.cpio} are symlinked to the same files.
#
# Environment: MVM_GUEST_CACHE (cache directory), MVM_GUEST_JOBS (make -j,
# default nproc), MVM_AGENT (a static mvm-agent to use instead of building
# one), CARGO_TARGET_DIR (where cargo builds the agent).
set -euo pipefail

# Keep stdout for the three result lines only.
exec 3>&1 1>&2

say() { printf 'guest: %s\n' "$*" >&2; }
die() { printf 'guest: ERROR: %s\n' "$*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
self="$here/$(basename "${BASH_SOURCE[0]}")"
fragment="$here/kernel.config"
patch_dir="$here/patches"
init_script="$here/init"
vsock_src="$here/vsock.c"
cache=${MVM_GUEST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/microvm-dev/guest}
jobs=${MVM_GUEST_JOBS:-$(nproc)}
linux_tar=/usr/src/linux-source-6.1.tar.xz
busybox=/bin/busybox

# A make started from cargo or another make must not inherit its jobserver or
# flags; a stray O=/KBUILD_OUTPUT would send the build elsewhere.
unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES KBUILD_OUTPUT O CROSS_COMPILE \
	ARCH LOCALVERSION KCONFIG_CONFIG 2>/dev/null || true
export KBUILD_BUILD_USER=microvm-dev KBUILD_BUILD_HOST=guest \
	KBUILD_BUILD_TIMESTAMP='1970-01-01 00:00:00 UTC' LC_ALL=C

# ---------------------------------------------------------------- checks
missing=()
for tool in make gcc cc flex bison bc perl tar xz patch sha256sum dpkg-query flock find; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -r /usr/include/libelf.h ] || missing+=("libelf.h (libelf-dev)")
[ -r /usr/include/linux/vm_sockets.h ] || missing+=("linux/vm_sockets.h (linux-libc-dev)")
[ -r "$linux_tar" ] || missing+=("$linux_tar (linux-source-6.1)")
[ -x "$busybox" ] || missing+=("$busybox (busybox-static)")
if [ ${#missing[@]} -gt 0 ]; then
	die "missing: ${missing[*]}; run scripts/setup-host.sh (as root) first"
fi
[ -r "$fragment" ] || die "missing $fragment"
[ -r "$init_script" ] || die "missing $init_script"
[ -r "$vsock_src" ] || die "missing $vsock_src"
shopt -s nullglob
patches=("$patch_dir"/*.patch)
shopt -u nullglob
[ ${#patches[@]} -gt 0 ] || die "no patches in $patch_dir"

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }
linux_version=$(pkg_version linux-source-6.1)
busybox_version=$(pkg_version busybox-static)
uapi_version=$(pkg_version linux-libc-dev)
gcc_version=$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)

# ---------------------------------------------------------------- hashes
# Each input is framed by its name so that moving text between files changes
# the hash.
hash_inputs() {
	local kind=$1; shift
	{
		printf 'microvm-dev guest %s\n' "$kind"
		local item
		for item in "$@"; do
			case "$item" in
			file:*)
				printf 'file %s %s\n' "$(basename "${item#file:}")" \
					"$(sha256sum <"${item#file:}" | cut -d' ' -f1)"
				;;
			*) printf '%s\n' "$item" ;;
			esac
		done
	} | sha256sum | cut -c1-16
}
mkdir -p "$cache"
# One build at a time per cache (parallel test runs may all call this).
exec 9>"$cache/.lock"
if ! flock -n 9; then
	say "waiting for another build.sh using $cache ..."
	flock 9
fi

tmp=
ticker=
inputs=
cleanup() {
	[ -n "$ticker" ] && kill "$ticker" 2>/dev/null && wait "$ticker" 2>/dev/null
	[ -n "$tmp" ] && rm -rf "$tmp"
	[ -n "$inputs" ] && rm -rf "$inputs"
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Leftovers of builds that were killed outright (we hold the lock: no other
# build is running).
rm -rf "$cache"/.tmp-kernel-* "$cache"/.tmp-initramfs-* "$cache"/.tmp-inputs-*

# The guest agent: a static binary (it runs in any guest root), built with
# its own profile (panics unwind, so a failing connection cannot take PID 1
# and with it the guest kernel down).
agent=${MVM_AGENT:-}
if [ -z "$agent" ]; then
	say "building mvm-agent (static) ..."
	(cd "$repo" && unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS &&
		CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
			cargo build --locked --quiet --profile agent -p mvm-agent \
			--target x86_64-unknown-linux-gnu) || die "building mvm-agent failed"
	agent="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/agent/mvm-agent"
fi
[ -x "$agent" ] || die "mvm-agent binary $agent is missing"

# Build from a snapshot of the inputs, so that editing them during a build
# cannot put new content into a cache entry named after the old hash.
inputs=$(mktemp -d "$cache/.tmp-inputs-XXXXXX")
mkdir "$inputs/patches"
cp "$fragment" "$inputs/kernel.config"
cp "${patches[@]}" "$inputs/patches/"
cp "$init_script" "$inputs/init"
cp "$vsock_src" "$inputs/vsock.c"
cp "$agent" "$inputs/mvm-agent"
agent="$inputs/mvm-agent"
fragment="$inputs/kernel.config"
patches=("$inputs"/patches/*.patch)
init_script="$inputs/init"
vsock_src="$inputs/vsock.c"

patch_items=()
for p in "${patches[@]}"; do patch_items+=("file:$p"); done
kernel_hash=$(hash_inputs kernel "file:$fragment" "${patch_items[@]}" "file:$self" \
	"linux-source-6.1=$linux_version" "gcc=$gcc_version")
initramfs_hash=$(hash_inputs initramfs "file:$init_script" "file:$vsock_src" "file:$agent" "file:$self" \
	"busybox-static=$busybox_version" "gcc=$gcc_version" "linux-libc-dev=$uapi_version")
kernel_dir="$cache/kernel-$kernel_hash"
initramfs_dir="$cache/initramfs-$initramfs_hash"

# Every `CONFIG_X=...` / `# CONFIG_X is not set` line of the fragment must be
# in .config verbatim (a "not set" option may also be absent: its
# dependencies are off, so it cannot be set).
verify_config() {
	local config=$1 line opt got bad=0
	while IFS= read -r line || [ -n "$line" ]; do
		case "$line" in
		CONFIG_*=*) opt=${line%%=*} ;;
		"# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *} ;;
		*) continue ;;
		esac
		got=$(grep -E "^(# )?${opt}[= ]" "$config" || true)
		if [ -z "$got" ] && [ "${line:0:1}" = "#" ]; then
			continue
		fi
		if [ "$got" != "$line" ]; then
			printf 'guest: ERROR: kernel option %s: fragment wants "%s", .config has "%s"\n' \
				"$opt" "$line" "${got:-<absent: unknown option, or its dependencies are off>}" >&2
			bad=1
		fi
	done <"$fragment"
	[ $bad -eq 0 ] || die "kernel.config options did not survive olddefconfig (see above)"
}

in_dir() { local dir=$1; shift; (cd "$dir" && "$@"); }

# Run a logged step; on failure show the log's tail and its path.
logged() {
	local log=$1; shift
	if ! "$@" >>"$log" 2>&1; then
		printf '\n--- last lines of %s ---\n' "$log" >&2
		tail -n 25 "$log" >&2
		die "'$*' failed; full log: $log"
	fi
}

build_kernel() {
	local log="$cache/kernel-$kernel_hash.log" src start
	start=$SECONDS
	tmp=$(mktemp -d "$cache/.tmp-kernel-$kernel_hash.XXXXXX")
	src="$tmp/src"
	mkdir -p "$src" "$tmp/out"
	rm -f "$cache"/kernel-*.log    # failure logs of earlier attempts
	: >"$log"
	say "building kernel $kernel_hash (linux-source-6.1 $linux_version, gcc $gcc_version); log: $log"

	say "extracting linux-source-6.1 (about a minute) ..."
	logged "$log" tar -xf "$linux_tar" -C "$src" --strip-components=1

	local p
	for p in "${patches[@]}"; do
		say "applying $(basename "$p") ..."
		logged "$log" patch -d "$src" -p1 --forward --batch --fuzz=0 -i "$p"
	done

	say "configuring (tinyconfig + tests/guest/kernel.config) ..."
	logged "$log" make -C "$src" ARCH=x86_64 tinyconfig
	# merge_config.sh writes temporary files to its cwd: run it in the tree.
	logged "$log" in_dir "$src" scripts/kconfig/merge_config.sh -m .config "$fragment"
	logged "$log" make -C "$src" ARCH=x86_64 olddefconfig
	verify_config "$src/.config"

	say "compiling kernel with $jobs jobs (several minutes) ..."
	(
		while sleep 30; do
			kill -0 $$ 2>/dev/null || exit 0 # build.sh itself was killed
			n=$(find "$src" -name '*.o' -type f 2>/dev/null | wc -l)
			say "still compiling: $n objects built (a full build has about 900), $((SECONDS - start)) s so far"
		done
	) &
	ticker=$!
	logged "$log" make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux bzImage
	kill "$ticker" 2>/dev/null || true
	wait "$ticker" 2>/dev/null || true
	ticker=

	# The kernel's own cpio writer (for device nodes without root/fakeroot).
	logged "$log" cc -O2 -o "$tmp/out/gen_init_cpio" "$src/usr/gen_init_cpio.c"

	cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/System.map" "$tmp/out/"
	cp "$src/.config" "$tmp/out/config"
	cp "$log" "$tmp/out/build.log"
	mv -T "$tmp/out" "$kernel_dir"
	rm -f "$log"
	rm -rf "$tmp"
	tmp=
	say "kernel built in $((SECONDS - start)) s"
}

build_initramfs() {
	local list
	tmp=$(mktemp -d "$cache/.tmp-initramfs-$initramfs_hash.XXXXXX")
	mkdir -p "$tmp/out"
	say "building initramfs $initramfs_hash (busybox-static $busybox_version) ..."
	cat >"$tmp/out/fstab" <<-'EOF'
		proc     /proc proc     nosuid,nodev,noexec 0 0
		sysfs    /sys  sysfs    nosuid,nodev,noexec 0 0
		devtmpfs /dev  devtmpfs nosuid              0 0
	EOF
	cp "$init_script" "$tmp/out/init"
	cp "$busybox" "$tmp/out/busybox"
	cp "$agent" "$tmp/out/mvm-agent"
	echo 'root:x:0:0:root:/root:/bin/sh' >"$tmp/out/passwd"
	# No libc, stripped: 10 KiB instead of a static glibc binary's 670
	# (the guest kernel copies the initramfs interpreted on PVM hosts).
	gcc -static -Os -Wall -Wextra -Werror -nostdlib -ffreestanding \
		-fno-stack-protector -fno-asynchronous-unwind-tables -fno-pie -no-pie -s \
		-o "$tmp/out/mvm-vsock" "$vsock_src" || die "compiling tests/guest/vsock.c failed"
	list="$tmp/out/cpio.list"
	# Uncompressed newc; /dev/console must exist when the kernel starts /init
	# (devtmpfs is mounted by /init itself).  Applet symlinks are left out on
	# purpose: busybox sh runs applets without them, and every entry costs
	# interpreted kernel time to unpack on the PVM host.
	cat >"$list" <<-EOF
		dir /dev 0755 0 0
		nod /dev/console 0600 0 0 c 5 1
		dir /proc 0555 0 0
		dir /sys 0555 0 0
		dir /tmp 1777 0 0
		dir /root 0700 0 0
		dir /bin 0755 0 0
		dir /etc 0755 0 0
		file /bin/busybox $tmp/out/busybox 0755 0 0
		file /bin/mvm-vsock $tmp/out/mvm-vsock 0755 0 0
		slink /bin/sh busybox 0777 0 0
		file /etc/fstab $tmp/out/fstab 0644 0 0
		file /etc/passwd $tmp/out/passwd 0644 0 0
		file /init $tmp/out/init 0755 0 0
		dir /sbin 0755 0 0
		dir /run 0755 0 0
		file /sbin/mvm-agent $tmp/out/mvm-agent 0755 0 0
	EOF
	# Programs the agent runs by name (it has no shell to find applets):
	# the common ones, as links to busybox.
	for applet in cat chmod cp date dd df echo env false find grep head hostname id kill ln ls \
		halt mkdir mount mv poweroff printenv ps pwd reboot rm sleep stat stty sync tail tee test \
		touch tr true tty uname vi wc; do
		printf 'slink /bin/%s busybox 0777 0 0\n' "$applet" >>"$list"
	done
	"$kernel_dir/gen_init_cpio" -t 0 "$list" >"$tmp/out/initramfs.cpio" ||
		die "gen_init_cpio failed"
	# Record the list with stable paths, drop the copies.
	sed -i "s|$tmp/out/busybox|$busybox|; s|$tmp/out/init|tests/guest/init|; s|$tmp/out/fstab|(generated fstab)|; s|$tmp/out/mvm-vsock|(built from tests/guest/vsock.c)|; s|$tmp/out/mvm-agent|(static build of bin/agent)|; s|$tmp/out/passwd|(generated passwd)|" "$list"
	rm -f "$tmp/out/busybox" "$tmp/out/init" "$tmp/out/mvm-vsock" "$tmp/out/mvm-agent" "$tmp/out/passwd"
	mv -T "$tmp/out" "$initramfs_dir"
	rm -rf "$tmp"
	tmp=
}

if [ -f "$kernel_dir/vmlinux" ] && [ -f "$kernel_dir/bzImage" ] && [ -x "$kernel_dir/gen_init_cpio" ]; then
	say "kernel $kernel_hash: cached"
else
	rm -rf "$kernel_dir"
	build_kernel
fi
if [ -f "$initramfs_dir/initramfs.cpio" ]; then
	say "initramfs $initramfs_hash: cached"
else
	rm -rf "$initramfs_dir"
	build_initramfs
fi

out="$repo/target/guest"
mkdir -p "$out"
ln -sfn "$kernel_dir/vmlinux" "$out/vmlinux"
ln -sfn "$kernel_dir/bzImage" "$out/bzImage"
ln -sfn "$initramfs_dir/initramfs.cpio" "$out/initramfs.cpio"

printf 'vmlinux=%s\nbzImage=%s\ninitramfs=%s\n' \
	"$kernel_dir/vmlinux" "$kernel_dir/bzImage" "$initramfs_dir/initramfs.cpio" >&3
