#!/usr/bin/env bash
# Install what the project needs on a fresh machine: the Debian 12 packages
# (what tests/guest/build.sh needs to build the test guest, and the
# libraries virtiofsd links against), then virtiofsd itself from crates.io
# for the `backend = "virtiofsd"` project share.
# Idempotent: packages already installed are not touched, and when nothing
# is missing the script only runs dpkg-query and `virtiofsd --version` and
# prints nothing.
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
	tmux               # drives `mvm shell` in the manager test
	direnv             # `use mvm` (mvm direnv init) in the manager test
	# Debian root file system images (`mvm image build`)
	mmdebstrap
	git                # the image test's project is a git repository
	# managed networks (`mvm network`; the network test and bench)
	dnsmasq-base       # DHCP and DNS per network
	nftables           # nft: NAT and isolation
	iptables           # the network test sets a Docker-like FORWARD policy
	python3            # the network test's stand-in internet and clients
	postgresql-client  # psql: the host-side client of a guest PostgreSQL ([[service]])
	redis-tools        # redis-cli: the same for a guest Redis (services test)
	# virtiofsd (built by cargo install below)
	libseccomp-dev
	libcap-ng-dev
	pkg-config
)

missing=()
for pkg in "${packages[@]}"; do
	status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
	[ "$status" = installed ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "setup-host: installing ${missing[*]}" >&2
	sudo=()
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null 2>&1 || {
			echo "setup-host: need root to install: ${missing[*]}" >&2
			exit 1
		}
		sudo=(sudo)
	fi
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends "${missing[@]}" >&2
	echo "setup-host: packages done" >&2
fi

# virtiofsd for `backend = "virtiofsd"` shares. cargo's own bin directory is
# the cache: an installed binary of this version is not rebuilt. Found the
# same way the VMM looks for it (PATH, then ~/.cargo/bin).
virtiofsd_version=1.14.0
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
installed=$(PATH="$PATH:$cargo_bin" virtiofsd --version 2>/dev/null || true)
case "$installed" in
*" $virtiofsd_version"*) ;;
*)
	echo "setup-host: building virtiofsd $virtiofsd_version (cargo install, a few minutes)" >&2
	cargo install --locked virtiofsd --version "$virtiofsd_version" >&2
	echo "setup-host: virtiofsd done" >&2
	;;
esac

# The unprivileged user `[security] user = "microvm-dev"` runs VMMs as
# (`mvm create --vmm-user`; see docs/security.md): a system account with no
# home, no shell and no password.
if ! getent passwd microvm-dev >/dev/null; then
	sudo=()
	[ "$(id -u)" -eq 0 ] || sudo=(sudo)
	echo "setup-host: creating the system user microvm-dev" >&2
	"${sudo[@]}" useradd --system --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin --user-group microvm-dev >&2
fi
