#!/usr/bin/env bash
# Install the Debian 12 packages the project needs on a fresh machine
# (currently: what tests/guest/build.sh needs to build the test guest).
# Idempotent: packages already installed are not touched, and when nothing
# is missing the script only runs dpkg-query and prints nothing.
# Run as root (or with sudo available).
set -euo pipefail

packages=(
	# test guest kernel (tests/guest/build.sh)
	linux-source-6.1   # /usr/src/linux-source-6.1.tar.xz
	build-essential    # gcc, make, libc headers
	bc flex bison
	libelf-dev         # objtool
	perl
	xz-utils           # unpacking the source tarball
	patch
	util-linux         # flock
	# test guest initramfs
	busybox-static     # /bin/busybox
	cpio
	# end-to-end tests: ext4 root file system images
	e2fsprogs          # mkfs.ext4 -d, debugfs
	iproute2           # ip netns / tuntap for the virtio-net test
)

missing=()
for pkg in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
	[ "$status" = installed ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "setup-host: installing ${missing[*]}" >&2
sudo=()
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null 2>&1 || {
		echo "setup-host: need root to install: ${missing[*]}" >&2
		exit 1
	}
	sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	--no-install-recommends "${missing[@]}" >&2
echo "setup-host: done" >&2
