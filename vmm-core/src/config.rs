//! VM configuration: built in code ([`VmConfig::new`]) or read from a
//! `vm.toml` file ([`VmConfig::from_file`]).
//!
//! The file format (every key, its default and meaning, is documented in
//! `docs/vm-toml.md`):
//!
//! ```toml
//! version = 1
//! name = "web"        # default: the file's stem; MACs derive from it
//! state_root = "/var/lib/microvm-dev"  # default: $MVM_STATE_DIR, else this;
//!                     # the VM's state dir is <state_root>/<name>
//!
//! [machine]
//! vcpus = 2           # default 1
//! memory_mib = 256    # default 128
//! acpi = true         # default true
//! rng = true          # default true: virtio-rng
//!
//! [boot]
//! kernel = "vmlinux"  # required; ELF vmlinux or bzImage
//! initrd = "initramfs.cpio"
//! cmdline = "console=ttyS0 reboot=k panic=-1"
//! host_cmdline = true # default true: add what this host's KVM needs
//!
//! [[net]]             # any number; eth0, eth1, ... in this order
//! network = "default" # a managed network (bridge, DHCP, DNS, NAT) under
//!                     # <state_root>/networks/; the guest gets its pinned
//!                     # address by DHCP (mvm.dhcp=ethN). Not with `bridge`.
//! tap = "mvmtap0"     # required without `network` (default with it:
//!                     # "mvm" + 10 hex digits of the MAC); created, or
//!                     # taken over if it exists
//! mac = "02:00:00:00:00:01"  # default: derived from the VM name
//! bridge = "br0"      # optional: attach the TAP to this existing bridge
//!
//! [[forward]]         # any number: host port -> guest port (needs a
//!                     # [[net]] with `network`; runs in the VMM process)
//! host_port = 8080    # required; 1-65535
//! guest_port = 80     # required; 1-65535
//! host_address = "127.0.0.1"  # default 127.0.0.1 (not reachable from the
//!                     # LAN); "0.0.0.0" for every address
//! protocol = "tcp"    # "tcp" (default) or "udp"
//!
//! [[disk]]            # any number; vda, vdb, ... in this order
//! path = "disk.img"   # required; raw image, size a multiple of 512
//! read_only = false   # default false
//! serial = "data"     # default "mvm-disk<N>"
//!
//! [vsock]             # optional: a host channel (Firecracker's protocol)
//! uds_path = "vsock.sock"    # required; host programs connect here;
//!                            # guest connections to port P go to "<uds_path>_P"
//! guest_cid = 3              # default 3
//!
//! [[share]]          # any number: a host directory in the guest (virtio-fs)
//! tag = "project"     # required; 1-36 of [A-Za-z0-9._-]; the guest mounts it by tag
//! source = "/home/me/src/app"  # required; a directory (the overlay's lower layer)
//! overlay = true      # default true: the guest writes to its own upper layer
//! persist = false     # default false: each start begins with an empty upper layer
//! upper = "/srv/up"   # default <state dir>/overlay/<tag>
//! backend = "builtin" # "builtin" (default, in-process) or "virtiofsd"
//! socket = "fs.sock"  # virtiofsd only: connect to this running virtiofsd
//! mount = "/project"  # where the guest's init mounts it (kernel command line)
//! watch = false       # default false: replay host changes to source in the
//!                     # guest so its file watchers fire (needs overlay, the
//!                     # builtin backend, [vsock] and mvm-agent in the guest)
//!
//! [[volume]]          # any number: a persistent ext4 disk in the state dir
//! name = "data"       # required; 1-16 of [a-z0-9_-]
//! size_mib = 256      # required; created and formatted on first start
//! mount = "/data"     # where the guest's init mounts it
//!
//! [root]            # optional: the guest's root file system from an image
//! image = "rootfs.ext4"  # required; ext4 image, attached read-only (shareable
//!                     # by many VMs); the initrd's init (mvm-agent) mounts it
//!                     # as the lower layer of an overlayfs root
//! upper = "volume"    # "volume" (default): the writable layer is volume "root"
//!                     # in the state dir, kept across restarts; "tmpfs": in
//!                     # guest memory, empty at every start
//! size_mib = 8192     # default 8192: size of the "root" volume (sparse)
//!
//! [console]
//! output = "stdio"    # "stdio" (default), "file" or "none"
//! file = "console.log"
//! input = "auto"      # "auto" (default), "stdin" or "none"
//!
//! [devenv]            # optional, written by `mvm create` (the VMM ignores it)
//! file = "/home/me/src/app/devenv.nix"   # the devenv.nix it read
//!
//! [env]               # optional: `mvm shell`/`exec` sessions (the VMM ignores it)
//! set = { EDITOR = "vim" }   # default {}: set in every session
//! passthrough = ["AWS_PROFILE", "GITHUB_*"]  # default []: host variables
//!                     # copied into sessions at exec time (`*`: any text)
//! ```

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

mod env;
use env::FileEnv;
pub use env::{check_pattern, is_env_name, pattern_matches, EnvConfig};

/// The only `version` of the file format so far.
pub const CONFIG_VERSION: u32 = 1;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u32 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 128;
/// Default kernel command line: serial console, reboot through the i8042
/// (which ends the VM), and reboot (so: end the VM) on a kernel panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Default guest context id of the vsock device (the first one not reserved).
pub const DEFAULT_GUEST_CID: u32 = 3;
/// Longest `vsock.uds_path`: `<uds_path>_<port>` must still fit a Unix
/// socket address (108 bytes with its terminating zero).
pub const MAX_UDS_PATH: usize = 107 - 11;
/// Where VM state directories live unless `state_root` or
/// [`STATE_DIR_ENV`] says otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/microvm-dev";
/// Environment variable that overrides [`DEFAULT_STATE_ROOT`].
pub const STATE_DIR_ENV: &str = "MVM_STATE_DIR";
/// Longest share tag: the virtio-fs config space holds 36 bytes.
pub const MAX_TAG_LEN: usize = mvm_storage::fs::TAG_LEN;
/// Longest volume name: its disk serial `vol-<name>` must fit virtio-blk's
/// 20 bytes.
pub const MAX_VOLUME_NAME: usize = 16;
/// Largest volume, 16 TiB: far above any use here, and keeps byte
/// arithmetic in u64.
pub const MAX_VOLUME_MIB: u64 = 1 << 24;
/// Disk serial of the `[root]` image (the guest's init finds it by this).
pub const ROOT_SERIAL: &str = "mvm-root";
/// Name of the volume that holds a `[root]`'s writable layer (reserved).
pub const ROOT_VOLUME: &str = "root";
/// Default size of that volume: room for packages and builds; the file is
/// sparse, so only what the guest writes takes host disk.
pub const DEFAULT_ROOT_MIB: u64 = 8192;
/// Longest VM name used for a state directory.
pub const MAX_NAME_LEN: usize = 64;
/// Upper bound on guest memory, far above any use here; it keeps size
/// arithmetic comfortably inside u64.
pub const MAX_MEMORY_MIB: u32 = 1 << 24; // 16 TiB

/// A complete VM definition.
#[derive(Debug)]
pub struct VmConfig {
    /// The VM's name: MAC addresses are derived from it. Default: the
    /// vm.toml file's stem, or "vm" for a configuration built in code.
    pub name: String,
    pub machine: MachineConfig,
    pub boot: BootConfig,
    pub console: ConsoleConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in the order the guest sees them (eth0, ...).
    pub nets: Vec<NetConfig>,
    /// Host ports forwarded to the guest (needs a managed network).
    pub forwards: Vec<ForwardConfig>,
    /// The virtio-vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Host directories shared with the guest (virtio-fs), in tag order.
    pub shares: Vec<ShareConfig>,
    /// Persistent ext4 volumes kept in the VM's state directory.
    pub volumes: Vec<VolumeConfig>,
    /// The root file system image and its writable layer, if the guest
    /// boots from an image rather than from its initrd alone.
    pub root: Option<RootConfig>,
    /// Where the VM's state directory lives: `<state_root>/<name>`.
    pub state_root: PathBuf,
    /// The environment of `mvm shell`/`exec` sessions (not the VMM's).
    pub env: EnvConfig,
    /// Servers the guest agent runs (`[[service]]`; the VMM ignores them).
    pub services: Vec<crate::service::ServiceConfig>,
    /// The project's devenv.nix that `mvm create` read (`[devenv] file`;
    /// a record for `mvm status`, the VMM ignores it).
    pub devenv: Option<PathBuf>,
    /// How the VMM confines itself (`[security]`).
    pub security: SecurityConfig,
}

/// `[security]`: the VMM's own confinement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityConfig {
    /// Install a seccomp filter on every VMM thread before the guest runs
    /// (see [`crate::seccomp`]). Default: true; `false` is for debugging
    /// (e.g. running the VMM under a tool that needs other system calls).
    pub seccomp: bool,
    /// The host user that runs the VM when `mvm-vmm` is started as root:
    /// the root process prepares what needs privilege (TAPs and their
    /// bridge ports, virtiofsd and its overlay mount, /dev/kvm, the state
    /// directory's ownership) and runs the VMM as this user, with no
    /// capabilities and `no_new_privs` (see [`crate::privsep`]). Default:
    /// none, the VMM runs as whoever started it; ignored when not root.
    pub user: Option<String>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            seccomp: true,
            user: None,
        }
    }
}

/// A root file system image with a per-VM writable layer (`[root]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootConfig {
    /// The ext4 image, attached read-only as the first disk (serial
    /// [`ROOT_SERIAL`]).
    pub image: PathBuf,
    /// Where the guest's writes go.
    pub upper: RootUpper,
    /// Size of the upper volume ([`RootUpper::Volume`]).
    pub size_mib: u64,
}

/// The writable layer of an image root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RootUpper {
    /// Volume [`ROOT_VOLUME`] in the state directory: kept across restarts.
    #[default]
    Volume,
    /// tmpfs in guest memory: every start begins from the image.
    Tmpfs,
}

impl RootConfig {
    /// The upper layer's volume, when it is one.
    pub fn volume(&self) -> Option<VolumeConfig> {
        (self.upper == RootUpper::Volume).then(|| VolumeConfig {
            name: ROOT_VOLUME.into(),
            size_mib: self.size_mib,
            mount: None,
        })
    }
}

/// Which file server serves a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShareBackend {
    /// The VMM's own virtio-fs device and overlay, in-process.
    #[default]
    Builtin,
    /// An external `virtiofsd` over vhost-user, serving a host overlayfs
    /// mount of the same layers (or the daemon behind `socket`).
    Virtiofsd,
}

/// A host directory the guest mounts with `mount -t virtiofs <tag> <dir>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// What the guest mounts it by: 1-36 of `[A-Za-z0-9._-]`.
    pub tag: String,
    /// The host directory (the read-only lower layer with `overlay`).
    /// Unused when `socket` names a running virtiofsd.
    pub source: PathBuf,
    /// The guest's writes go to a per-VM upper layer; `source` is never
    /// modified. Without it the guest writes to `source` itself.
    pub overlay: bool,
    /// Keep the upper layer across starts (else it is emptied at start).
    pub persist: bool,
    /// Explicit upper layer directory; default `<state dir>/overlay/<tag>`.
    pub upper: Option<PathBuf>,
    pub backend: ShareBackend,
    /// With the virtiofsd backend: connect to this socket of a daemon the
    /// user runs, instead of starting one.
    pub socket: Option<PathBuf>,
    /// Where the guest's init mounts the share (`mvm.share=<tag>:<mount>`
    /// on the kernel command line); none: the guest mounts it itself.
    pub mount: Option<String>,
    /// Watch `source` on the host and have the guest agent replay its
    /// changes, so that file watchers in the guest fire (overlay, builtin
    /// backend and vsock only).
    pub watch: bool,
}

/// A raw ext4 image in the VM's state directory, created and formatted on
/// first start, attached as a virtio-blk disk with serial `vol-<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// 1-16 of `[a-z0-9_-]`; the image is `<state dir>/volumes/<name>.ext4`.
    pub name: String,
    /// Size at creation; an existing image keeps its size.
    pub size_mib: u64,
    /// Where the guest's init mounts it (`mvm.volume=<name>:<mount>`).
    pub mount: Option<String>,
}

/// A virtio-vsock device whose host side is a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id, 3 to 2^32-2; each VM has its own device, so
    /// copies of one definition may share it.
    pub guest_cid: u32,
    /// Where host programs connect (`CONNECT <port>\n`); guest connections
    /// to host port P go to `<uds_path>_P`. A stale socket file is replaced.
    pub uds_path: PathBuf,
}

/// A virtio-net interface on a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP device name: created, or taken over when it exists. Default
    /// (only with `network`): [`default_tap_name`] of the MAC.
    pub tap: Option<String>,
    /// Guest MAC; default derived from the VM name and the interface index.
    pub mac: Option<[u8; 6]>,
    /// Linux bridge to attach the TAP to.
    pub bridge: Option<String>,
    /// A managed network (`mvm_net::host::network`) to join.
    pub network: Option<String>,
}

/// A TAP name unique to a MAC: "mvm" and the last five bytes in hex.
pub fn default_tap_name(mac: [u8; 6]) -> String {
    let hex: String = mac[1..].iter().map(|b| format!("{b:02x}")).collect();
    format!("mvm{hex}")
}

/// A host port forwarded to the guest's address on its managed network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    pub protocol: mvm_net::forward::Protocol,
    /// Where the host listens; default 127.0.0.1.
    pub host_address: std::net::IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

impl ForwardConfig {
    /// The proxy's view of it.
    pub fn spec(&self) -> mvm_net::forward::ForwardSpec {
        mvm_net::forward::ForwardSpec {
            protocol: self.protocol,
            host: std::net::SocketAddr::new(self.host_address, self.host_port),
            guest_port: self.guest_port,
        }
    }
}

/// Parse `[[forward]]` tables (vm.toml, or the run-time forwards file the
/// manager writes), checking every value; `key` prefixes the key names in
/// errors.
pub fn parse_forwards(entries: Vec<FileForward>) -> Result<Vec<ForwardConfig>> {
    let mut out: Vec<ForwardConfig> = Vec::new();
    for f in entries {
        let port = |key: &'static str, v: i64| -> Result<u16> {
            u16::try_from(v)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| Error::ConfigValue {
                    key,
                    value: v.to_string(),
                    reason: "a port is 1 to 65535".into(),
                })
        };
        let host_port = port("forward.host_port", f.host_port)?;
        let guest_port = port("forward.guest_port", f.guest_port)?;
        let host_address = match &f.host_address {
            None => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            Some(text) => text.parse().map_err(|_| Error::ConfigValue {
                key: "forward.host_address",
                value: format!("{text:?}"),
                reason: "expected an IP address such as \"127.0.0.1\" or \"0.0.0.0\"".into(),
            })?,
        };
        let protocol = match f.protocol.as_deref() {
            None => mvm_net::forward::Protocol::Tcp,
            Some(text) => text.parse().map_err(|_| Error::ConfigValue {
                key: "forward.protocol",
                value: format!("{text:?}"),
                reason: "expected \"tcp\" or \"udp\"".into(),
            })?,
        };
        let new = ForwardConfig {
            protocol,
            host_address,
            host_port,
            guest_port,
        };
        if let Some(old) = out.iter().find(|o| {
            o.protocol == new.protocol
                && o.host_port == new.host_port
                && addresses_clash(o.host_address, new.host_address)
        }) {
            return Err(Error::ConfigValue {
                key: "forward.host_port",
                value: host_port.to_string(),
                reason: format!(
                    "{}:{}/{} is forwarded twice (to guest ports {} and {})",
                    new.host_address, host_port, new.protocol, old.guest_port, new.guest_port
                ),
            });
        }
        out.push(new);
    }
    Ok(out)
}

/// Whether two listening addresses with the same port would collide: the
/// same address, or one of them is the wildcard.
pub fn addresses_clash(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// A virtio-blk disk backed by a raw image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image; its size must be a multiple of 512 bytes.
    pub path: PathBuf,
    /// The guest cannot write (the device says so; writes fail).
    pub read_only: bool,
    /// What the guest reads as the disk's serial (at most 20 bytes);
    /// default `mvm-disk<index>`.
    pub serial: Option<String>,
}

/// vCPUs, memory and platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to the host's limit (at most 254).
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Provide ACPI tables (needed for guest power-off and by stock kernels).
    pub acpi: bool,
    /// Give the guest a virtio-rng device (`/dev/hwrng`) fed by the host.
    pub rng: bool,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Uncompressed ELF `vmlinux` or `bzImage`.
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed if the kernel supports it).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Append the arguments this host's KVM needs (see [`crate::host`]).
    pub host_cmdline: bool,
}

/// Where the guest's serial console goes.
pub enum ConsoleOutput {
    /// This process's standard output.
    Stdout,
    /// A file, created or truncated at start.
    File(PathBuf),
    /// Any writer, e.g. the sending half of [`crate::console::channel`].
    Writer(Box<dyn Write + Send>),
    /// Discard.
    Null,
}

impl fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleOutput::Stdout => write!(f, "Stdout"),
            ConsoleOutput::File(p) => write!(f, "File({})", p.display()),
            ConsoleOutput::Writer(_) => write!(f, "Writer(..)"),
            ConsoleOutput::Null => write!(f, "Null"),
        }
    }
}

/// Where the guest's serial input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleInput {
    /// This process's standard input; a terminal is put in raw mode for the
    /// run (Ctrl-A x ends the VM) and restored afterwards.
    Stdin,
    /// No input.
    None,
}

/// Serial console configuration.
#[derive(Debug)]
pub struct ConsoleConfig {
    pub output: ConsoleOutput,
    pub input: ConsoleInput,
}

impl VmConfig {
    /// A configuration with every default: 1 vCPU, 128 MiB, ACPI on,
    /// [`DEFAULT_CMDLINE`], console on stdout without input.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            name: "vm".to_string(),
            machine: MachineConfig {
                vcpus: DEFAULT_VCPUS,
                memory_mib: DEFAULT_MEMORY_MIB,
                acpi: true,
                rng: true,
            },
            boot: BootConfig {
                kernel: kernel.into(),
                initrd: None,
                cmdline: DEFAULT_CMDLINE.to_string(),
                host_cmdline: true,
            },
            console: ConsoleConfig {
                output: ConsoleOutput::Stdout,
                input: ConsoleInput::None,
            },
            disks: Vec::new(),
            nets: Vec::new(),
            forwards: Vec::new(),
            vsock: None,
            shares: Vec::new(),
            volumes: Vec::new(),
            root: None,
            state_root: default_state_root(),
            env: EnvConfig::default(),
            services: Vec::new(),
            devenv: None,
            security: SecurityConfig::default(),
        }
    }

    /// The VM's state directory: `<state_root>/<name>`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_root.join(&self.name)
    }

    /// Whether the VM keeps anything in its state directory (shares with a
    /// default upper layer, volumes).
    pub fn needs_state_dir(&self) -> bool {
        !self.volumes.is_empty()
            || self.nets.iter().any(|n| n.network.is_some())
            || self.root.as_ref().is_some_and(|r| r.volume().is_some())
            || self
                .shares
                .iter()
                .any(|s| s.overlay && s.upper.is_none() && s.socket.is_none())
    }

    /// Read a `vm.toml` file. Relative paths in it are relative to the
    /// file's directory.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let mut config = Self::parse(&text, &path.display().to_string(), base)?;
        if config.name.is_empty() {
            config.name = path
                .file_stem()
                .map_or("vm".into(), |s| s.to_string_lossy().into_owned());
        }
        Ok(config)
    }

    /// Parse `vm.toml` text. `origin` names the text in error messages;
    /// relative paths are resolved against `base_dir`.
    pub fn from_toml(text: &str, origin: &str, base_dir: &Path) -> Result<Self> {
        let mut config = Self::parse(text, origin, base_dir)?;
        if config.name.is_empty() {
            config.name = "vm".into();
        }
        Ok(config)
    }

    fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self> {
        let file: FileConfig = toml::from_str(text).map_err(|e| syntax_error(text, origin, &e))?;
        if file.version != CONFIG_VERSION {
            return Err(Error::ConfigValue {
                key: "version",
                value: file.version.to_string(),
                reason: format!("this microvm-dev reads version {CONFIG_VERSION}"),
            });
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base_dir.join(p) };
        let console = file.console;
        let output = match (console.output, console.file) {
            (OutputKind::Stdio, None) => ConsoleOutput::Stdout,
            (OutputKind::None, None) => ConsoleOutput::Null,
            (OutputKind::File, Some(f)) => ConsoleOutput::File(resolve(f)),
            (OutputKind::File, None) => {
                return Err(Error::ConfigValue {
                    key: "console.output",
                    value: "\"file\"".into(),
                    reason: "needs console.file = \"<path>\"".into(),
                })
            }
            (_, Some(f)) => {
                return Err(Error::ConfigPath {
                    key: "console.file",
                    path: f,
                    reason: "only used with console.output = \"file\"".into(),
                })
            }
        };
        let input = match console.input {
            InputKind::Stdin => ConsoleInput::Stdin,
            InputKind::None => ConsoleInput::None,
            InputKind::Auto if matches!(output, ConsoleOutput::Stdout) => ConsoleInput::Stdin,
            InputKind::Auto => ConsoleInput::None,
        };
        let mut nets = Vec::new();
        for net in file.net {
            let iface = |key: &'static str, name: &Option<String>| -> Result<()> {
                match name {
                    Some(n) => mvm_net::host::network::check_interface_name(n).map_err(|reason| Error::ConfigValue {
                        key,
                        value: format!("{n:?}"),
                        reason,
                    }),
                    None => Ok(()),
                }
            };
            iface("net.tap", &net.tap)?;
            iface("net.bridge", &net.bridge)?;
            if let Some(network) = &net.network {
                mvm_net::host::network::check_network_name(network).map_err(|_| Error::ConfigValue {
                    key: "net.network",
                    value: format!("{network:?}"),
                    reason: "a network name is 1-15 of a-z, 0-9, '-' and '_'".into(),
                })?;
                if net.bridge.is_some() {
                    return Err(Error::ConfigValue {
                        key: "net.bridge",
                        value: format!("{:?}", net.bridge.as_deref().unwrap_or_default()),
                        reason: "a managed network brings its own bridge: set `network` or `bridge`, not both".into(),
                    });
                }
            } else if net.tap.is_none() {
                return Err(Error::ConfigValue {
                    key: "net.tap",
                    value: "(missing)".into(),
                    reason: "required unless `network` is set".into(),
                });
            }
            let mac = match &net.mac {
                Some(text) => Some(parse_mac(text).ok_or_else(|| Error::ConfigValue {
                    key: "net.mac",
                    value: format!("{text:?}"),
                    reason: "expected six hex bytes like \"02:00:00:00:00:01\", unicast".into(),
                })?),
                None => None,
            };
            nets.push(NetConfig {
                tap: net.tap,
                mac,
                bridge: net.bridge,
                network: net.network,
            });
        }
        let forwards = parse_forwards(file.forward)?;
        if !forwards.is_empty() && !nets.iter().any(|n| n.network.is_some()) {
            return Err(Error::ConfigValue {
                key: "forward",
                value: format!("{} entries", forwards.len()),
                reason: "forwards go to the guest's address on a managed network: add [[net]] network = \"default\""
                    .into(),
            });
        }
        let services = crate::service::parse_services(file.service)?;
        let vsock = file.vsock.map(|v| VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: resolve(v.uds_path),
        });
        let shares = file
            .share
            .into_iter()
            .map(|s| ShareConfig {
                tag: s.tag,
                source: s.source.map(&resolve).unwrap_or_default(),
                overlay: s.overlay,
                persist: s.persist,
                upper: s.upper.map(&resolve),
                backend: s.backend,
                socket: s.socket.map(&resolve),
                mount: s.mount,
                watch: s.watch,
            })
            .collect();
        let volumes = file
            .volume
            .into_iter()
            .map(|v| VolumeConfig {
                name: v.name,
                size_mib: v.size_mib,
                mount: v.mount,
            })
            .collect();
        let root = file.root.map(|r| RootConfig {
            image: resolve(r.image),
            upper: r.upper,
            size_mib: r.size_mib,
        });
        Ok(VmConfig {
            name: file.name.unwrap_or_default(),
            root,
            nets,
            forwards,
            vsock,
            shares,
            volumes,
            state_root: file.state_root.map(&resolve).unwrap_or_else(default_state_root),
            env: EnvConfig::from_file(file.env)?,
            services,
            devenv: file.devenv.map(|d| resolve(d.file)),
            security: SecurityConfig {
                seccomp: file.security.seccomp,
                user: file.security.user,
            },
            machine: MachineConfig {
                vcpus: file.machine.vcpus,
                memory_mib: file.machine.memory_mib,
                acpi: file.machine.acpi,
                rng: file.machine.rng,
            },
            boot: BootConfig {
                kernel: resolve(file.boot.kernel),
                initrd: file.boot.initrd.map(resolve),
                cmdline: file.boot.cmdline,
                host_cmdline: file.boot.host_cmdline,
            },
            console: ConsoleConfig { output, input },
            disks: file
                .disk
                .into_iter()
                .map(|d| DiskConfig {
                    path: resolve(d.path),
                    read_only: d.read_only,
                    serial: d.serial,
                })
                .collect(),
        })
    }

    /// Check values that need no kernel: vCPU count against `max_vcpus`
    /// (the host's limit), memory size, the files named.
    pub fn validate(&self, max_vcpus: u32) -> Result<()> {
        let m = &self.machine;
        if m.vcpus == 0 {
            return Err(Error::ConfigValue {
                key: "machine.vcpus",
                value: "0".into(),
                reason: "a VM needs at least 1 vCPU".into(),
            });
        }
        if m.vcpus > max_vcpus {
            return Err(Error::ConfigValue {
                key: "machine.vcpus",
                value: m.vcpus.to_string(),
                reason: format!("this host allows at most {max_vcpus} vCPUs per VM"),
            });
        }
        if m.memory_mib == 0 || m.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::ConfigValue {
                key: "machine.memory_mib",
                value: m.memory_mib.to_string(),
                reason: format!("must be between 1 and {MAX_MEMORY_MIB}"),
            });
        }
        check_file("boot.kernel", &self.boot.kernel)?;
        if let Some(initrd) = &self.boot.initrd {
            check_file("boot.initrd", initrd)?;
        }
        for disk in &self.disks {
            check_file("disk.path", &disk.path)?;
            if let Some(serial) = &disk.serial {
                if serial.len() > 20 || !serial.is_ascii() {
                    return Err(Error::ConfigValue {
                        key: "disk.serial",
                        value: format!("{serial:?}"),
                        reason: "at most 20 ASCII characters".into(),
                    });
                }
            }
        }
        if let Some(vsock) = &self.vsock {
            if !(3..u32::MAX).contains(&vsock.guest_cid) {
                return Err(Error::ConfigValue {
                    key: "vsock.guest_cid",
                    value: vsock.guest_cid.to_string(),
                    reason: format!("0-2 and {} are reserved; use 3 to {}", u32::MAX, u32::MAX - 1),
                });
            }
            let path = &vsock.uds_path;
            if path.as_os_str().len() > MAX_UDS_PATH {
                return Err(Error::ConfigPath {
                    key: "vsock.uds_path",
                    path: path.clone(),
                    reason: format!(
                        "longer than {MAX_UDS_PATH} bytes: \"<uds_path>_<port>\" would not fit a Unix socket address"
                    ),
                });
            }
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(Error::ConfigPath {
                    key: "vsock.uds_path",
                    path: path.clone(),
                    reason: format!("directory {} does not exist", parent.display()),
                });
            }
        }
        crate::state::validate(self)?;
        if let Some(bad) = self.boot.cmdline.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(Error::Cmdline(format!(
                "contains {bad:?}; only printable ASCII is passed to the kernel"
            )));
        }
        Ok(())
    }
}

/// A file the VM needs must exist and be a readable regular file.
pub(crate) fn check_file(key: &'static str, path: &Path) -> Result<std::fs::File> {
    let fail = |reason: String| Error::ConfigPath {
        key,
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => fail("file not found".into()),
        _ => fail(format!("cannot open: {e}")),
    })?;
    let meta = file.metadata().map_err(|e| fail(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    Ok(file)
}

/// One line: `file:line:column: message (in `source line`)`.
fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> Error {
    let (location, snippet) = match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line_no = text[..start].matches('\n').count() + 1;
            let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
            let col = text[line_start..start].chars().count() + 1;
            let line = text[line_start..].lines().next().unwrap_or("").trim();
            (format!("{origin}:{line_no}:{col}"), line.to_string())
        }
        None => (origin.to_string(), String::new()),
    };
    let message = e.message().trim().replace('\n', " ");
    let message = if snippet.is_empty() {
        message
    } else {
        format!("{message} (in `{snippet}`)")
    };
    Error::ConfigSyntax { location, message }
}

/// `aa:bb:cc:dd:ee:ff`, unicast.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNet {
    tap: Option<String>,
    mac: Option<String>,
    bridge: Option<String>,
    network: Option<String>,
}

/// One `[[forward]]` table as written.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileForward {
    pub host_port: i64,
    pub guest_port: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    version: u32,
    name: Option<String>,
    #[serde(default)]
    net: Vec<FileNet>,
    #[serde(default)]
    forward: Vec<FileForward>,
    #[serde(default)]
    machine: FileMachine,
    boot: FileBoot,
    #[serde(default)]
    console: FileConsole,
    #[serde(default)]
    disk: Vec<FileDisk>,
    vsock: Option<FileVsock>,
    #[serde(default)]
    share: Vec<FileShare>,
    #[serde(default)]
    volume: Vec<FileVolume>,
    root: Option<FileRoot>,
    state_root: Option<PathBuf>,
    #[serde(default)]
    env: FileEnv,
    #[serde(default)]
    service: Vec<crate::service::FileService>,
    devenv: Option<FileDevenv>,
    #[serde(default)]
    security: FileSecurity,
}

/// `[security]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSecurity {
    #[serde(default = "default_true")]
    seccomp: bool,
    user: Option<String>,
}

impl Default for FileSecurity {
    fn default() -> Self {
        FileSecurity {
            seccomp: true,
            user: None,
        }
    }
}

/// `[devenv]`: what `mvm create` read from the project.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDevenv {
    /// The devenv.nix (relative paths: to the vm.toml's directory).
    file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoot {
    image: PathBuf,
    #[serde(default)]
    upper: RootUpper,
    #[serde(default = "default_root_mib")]
    size_mib: u64,
}

fn default_root_mib() -> u64 {
    DEFAULT_ROOT_MIB
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShare {
    tag: String,
    source: Option<PathBuf>,
    #[serde(default = "default_true")]
    overlay: bool,
    #[serde(default)]
    persist: bool,
    upper: Option<PathBuf>,
    #[serde(default)]
    backend: ShareBackend,
    socket: Option<PathBuf>,
    mount: Option<String>,
    #[serde(default)]
    watch: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVolume {
    name: String,
    size_mib: u64,
    mount: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVsock {
    uds_path: PathBuf,
    #[serde(default = "default_guest_cid")]
    guest_cid: u32,
}

fn default_guest_cid() -> u32 {
    DEFAULT_GUEST_CID
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDisk {
    path: PathBuf,
    #[serde(default)]
    read_only: bool,
    serial: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMachine {
    #[serde(default = "default_vcpus")]
    vcpus: u32,
    #[serde(default = "default_memory")]
    memory_mib: u32,
    #[serde(default = "default_true")]
    acpi: bool,
    #[serde(default = "default_true")]
    rng: bool,
}

impl Default for FileMachine {
    fn default() -> Self {
        FileMachine {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            acpi: true,
            rng: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBoot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    cmdline: String,
    #[serde(default = "default_true")]
    host_cmdline: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConsole {
    #[serde(default)]
    output: OutputKind,
    file: Option<PathBuf>,
    #[serde(default)]
    input: InputKind,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum OutputKind {
    #[default]
    Stdio,
    File,
    None,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum InputKind {
    #[default]
    Auto,
    Stdin,
    None,
}

/// `$MVM_STATE_DIR` when set and not empty, else [`DEFAULT_STATE_ROOT`].
pub fn default_state_root() -> PathBuf {
    match std::env::var_os(STATE_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_STATE_ROOT),
    }
}

fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}
fn default_true() -> bool {
    true
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig> {
        VmConfig::from_toml(text, "vm.toml", Path::new("/etc/vms"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_file_gets_defaults_and_resolves_paths() {
        let c = parse("version = 1\n[boot]\nkernel = \"vmlinux\"\n").unwrap();
        assert_eq!(
            c.machine,
            MachineConfig {
                vcpus: 1,
                memory_mib: 128,
                acpi: true,
                rng: true
            }
        );
        assert_eq!(c.boot.kernel, PathBuf::from("/etc/vms/vmlinux"));
        assert_eq!(c.boot.cmdline, DEFAULT_CMDLINE);
        assert!(c.boot.host_cmdline);
        assert!(matches!(c.console.output, ConsoleOutput::Stdout));
        assert_eq!(c.console.input, ConsoleInput::Stdin);
        assert!(c.security.seccomp, "seccomp is on by default");
    }

    #[test]
    fn security_table_turns_seccomp_off_and_rejects_unknown_keys() {
        let base = "version = 1\n[boot]\nkernel = \"vmlinux\"\n";
        let c = parse(&format!("{base}[security]\nseccomp = false\n")).unwrap();
        assert!(!c.security.seccomp);
        assert!(parse(&format!("{base}[security]\n")).unwrap().security.seccomp);
        let e = err(&format!("{base}[security]\nsandbox = true\n"));
        assert!(e.contains("sandbox"), "{e}");
        assert_eq!(parse(base).unwrap().security.user, None);
        let c = parse(&format!("{base}[security]\nuser = \"microvm-dev\"\n")).unwrap();
        assert_eq!(c.security.user.as_deref(), Some("microvm-dev"));
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"version = 1
[machine]
vcpus = 4
memory_mib = 512
acpi = false
rng = false
[boot]
kernel = "/boot/vmlinux"
initrd = "../initrd.img"
cmdline = "console=ttyS0 quiet"
host_cmdline = false
[console]
output = "file"
file = "log/console.txt"
"#,
        )
        .unwrap();
        assert_eq!(
            c.machine,
            MachineConfig {
                vcpus: 4,
                memory_mib: 512,
                acpi: false,
                rng: false
            }
        );
        assert_eq!(c.boot.kernel, PathBuf::from("/boot/vmlinux"));
        assert_eq!(c.boot.initrd, Some(PathBuf::from("/etc/vms/../initrd.img")));
        assert!(!c.boot.host_cmdline);
        assert!(matches!(&c.console.output, ConsoleOutput::File(p) if p == Path::new("/etc/vms/log/console.txt")));
        assert_eq!(c.console.input, ConsoleInput::None);
    }

    #[test]
    fn nets_and_macs() {
        let c = parse("version = 1\nname = \"web\"\n[boot]\nkernel = \"k\"\n[[net]]\ntap = \"t0\"\n[[net]]\ntap = \"t1\"\nmac = \"02:aa:bb:cc:dd:0e\"\nbridge = \"br0\"\n").unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(
            c.nets[0],
            NetConfig {
                tap: Some("t0".into()),
                network: None,
                mac: None,
                bridge: None
            }
        );
        assert_eq!(c.nets[1].mac, Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e]));
        assert_eq!(c.nets[1].bridge.as_deref(), Some("br0"));
        for bad in [
            "01:00:00:00:00:01",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "zz:00:00:00:00:01",
            "2:0:0:0:0:1",
        ] {
            let e = err(&format!(
                "version = 1\n[boot]\nkernel = \"k\"\n[[net]]\ntap = \"t\"\nmac = \"{bad}\"\n"
            ));
            assert!(e.starts_with("net.mac = "), "{bad}: {e}");
        }
    }

    #[test]
    fn managed_networks_and_forwards() {
        let base = "version = 1\nname = \"web\"\n[boot]\nkernel = \"k\"\n";
        let c = parse(&format!(
            "{base}[[net]]\nnetwork = \"default\"\n[[forward]]\nhost_port = 8080\nguest_port = 80\n[[forward]]\nhost_port = 5353\nguest_port = 53\nprotocol = \"udp\"\nhost_address = \"0.0.0.0\"\n"
        ))
        .unwrap();
        assert_eq!(c.nets[0].network.as_deref(), Some("default"));
        assert_eq!(c.nets[0].tap, None);
        assert_eq!(default_tap_name([2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e]), "mvmaabbccdd0e");
        assert_eq!(c.forwards.len(), 2);
        assert_eq!(c.forwards[0].host_address.to_string(), "127.0.0.1");
        assert_eq!(c.forwards[0].protocol, mvm_net::forward::Protocol::Tcp);
        assert_eq!(c.forwards[1].protocol, mvm_net::forward::Protocol::Udp);
        let net = "[[net]]\nnetwork = \"default\"\n";
        for (extra, key) in [
            ("[[net]]\ntap = \"a-tap-name-longer-than-ifnamsiz\"\n", "net.tap = "),
            ("[[net]]\ntap = \"bad/name\"\n", "net.tap = "),
            ("[[net]]\ntap = \"..\"\n", "net.tap = "),
            ("[[net]]\ntap = \"t\"\nbridge = \"a b\"\n", "net.bridge = "),
            ("[[net]]\nnetwork = \"Bad!\"\n", "net.network = "),
            ("[[net]]\nnetwork = \"default\"\nbridge = \"br0\"\n", "net.bridge = "),
            ("[[net]]\nmac = \"02:00:00:00:00:01\"\n", "net.tap = "),
            ("[[forward]]\nhost_port = 1\nguest_port = 2\n", "forward = "),
            (&format!("{net}[[forward]]\nhost_port = 0\nguest_port = 80\n"), "forward.host_port = 0"),
            (&format!("{net}[[forward]]\nhost_port = 65536\nguest_port = 80\n"), "forward.host_port = 65536"),
            (&format!("{net}[[forward]]\nhost_port = 80\nguest_port = -1\n"), "forward.guest_port = -1"),
            (&format!("{net}[[forward]]\nhost_port = 80\nguest_port = 80\nprotocol = \"sctp\"\n"), "forward.protocol = "),
            (&format!("{net}[[forward]]\nhost_port = 80\nguest_port = 80\nhost_address = \"localhost\"\n"), "forward.host_address = "),
            (
                &format!("{net}[[forward]]\nhost_port = 80\nguest_port = 80\n[[forward]]\nhost_port = 80\nguest_port = 81\nhost_address = \"0.0.0.0\"\n"),
                "forward.host_port = 80",
            ),
        ] {
            let e = err(&format!("{base}{extra}"));
            assert!(e.starts_with(key), "{extra}: {e}");
        }
        // The same port over both protocols is two forwards.
        parse(&format!(
            "{base}{net}[[forward]]\nhost_port = 53\nguest_port = 53\n[[forward]]\nhost_port = 53\nguest_port = 53\nprotocol = \"udp\"\n"
        ))
        .unwrap();
    }

    #[test]
    fn disks_in_order_with_defaults() {
        let c = parse(
            "version = 1\n[boot]\nkernel = \"k\"\n[[disk]]\npath = \"a.img\"\n[[disk]]\npath = \"/b.img\"\nread_only = true\nserial = \"bee\"\n",
        )
        .unwrap();
        assert_eq!(
            c.disks,
            vec![
                DiskConfig {
                    path: "/etc/vms/a.img".into(),
                    read_only: false,
                    serial: None
                },
                DiskConfig {
                    path: "/b.img".into(),
                    read_only: true,
                    serial: Some("bee".into())
                },
            ]
        );
        let e = err("version = 1\n[boot]\nkernel = \"k\"\n[[disk]]\nread_only = true\n");
        assert!(e.contains("missing field `path`"), "{e}");
        let e = err("version = 1\n[boot]\nkernel = \"k\"\n[[disk]]\npath = \"a\"\nro = true\n");
        assert!(e.contains("unknown field `ro`"), "{e}");
    }

    #[test]
    fn vsock_section() {
        let c = parse("version = 1\n[boot]\nkernel = \"k\"\n").unwrap();
        assert_eq!(c.vsock, None);
        let c = parse("version = 1\n[boot]\nkernel = \"k\"\n[vsock]\nuds_path = \"v.sock\"\n").unwrap();
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                guest_cid: DEFAULT_GUEST_CID,
                uds_path: PathBuf::from("/etc/vms/v.sock")
            })
        );
        let e = err("version = 1\n[boot]\nkernel = \"k\"\n[vsock]\nguest_cid = 4\n");
        assert!(e.contains("missing field `uds_path`"), "{e}");
        let e = err("version = 1\n[boot]\nkernel = \"k\"\n[vsock]\nuds_path = \"v\"\ncid = 4\n");
        assert!(e.contains("unknown field `cid`"), "{e}");
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e = err("version = 1\n[machine]\nvcpu = 2\n[boot]\nkernel = \"k\"\n");
        assert!(e.starts_with("vm.toml:3:1: unknown field `vcpu`"), "{e}");
        assert!(e.contains("`vcpus`"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = err("version = 1\nvcpus = 2\n[boot]\nkernel = \"k\"\n");
        assert!(e.contains("unknown field `vcpus`"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err("version = 1\n[machine]\nvcpus = \"two\"\n[boot]\nkernel = \"k\"\n");
        assert!(e.starts_with("vm.toml:3:"), "{e}");
        assert!(e.contains("invalid type") && e.contains("vcpus = \"two\""), "{e}");
        let e = err("version = 1\n[machine]\nmemory_mib = -5\n[boot]\nkernel = \"k\"\n");
        assert!(e.contains("memory_mib = -5"), "{e}");
        let e = err("version = 1\n[console]\noutput = \"tty\"\n[boot]\nkernel = \"k\"\n");
        assert!(e.contains("unknown variant `tty`"), "{e}");
    }

    #[test]
    fn missing_and_wrong_version() {
        let e = err("[boot]\nkernel = \"k\"\n");
        assert!(e.contains("missing field `version`"), "{e}");
        let e = err("version = 2\n[boot]\nkernel = \"k\"\n");
        assert_eq!(e, "version = 2: this microvm-dev reads version 1");
        let e = err("version = 1\n");
        assert!(e.contains("missing field `boot`"), "{e}");
        let e = err("version = 1\n[boot]\ninitrd = \"i\"\n");
        assert!(e.contains("missing field `kernel`"), "{e}");
    }

    #[test]
    fn console_file_consistency() {
        let e = err("version = 1\n[boot]\nkernel = \"k\"\n[console]\noutput = \"file\"\n");
        assert_eq!(e, "console.output = \"file\": needs console.file = \"<path>\"");
        let e = err("version = 1\n[boot]\nkernel = \"k\"\n[console]\nfile = \"x\"\n");
        assert!(e.starts_with("console.file = \"x\""), "{e}");
        let c =
            parse("version = 1\n[boot]\nkernel = \"k\"\n[console]\noutput = \"none\"\ninput = \"stdin\"\n").unwrap();
        assert!(matches!(c.console.output, ConsoleOutput::Null));
        assert_eq!(c.console.input, ConsoleInput::Stdin);
    }

    #[test]
    fn validate_rejects_bad_values() {
        let dir = std::env::temp_dir().join(format!("mvm-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        let mut c = VmConfig::new(&kernel);
        assert!(c.validate(8).is_ok());

        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: dir.join("v.sock"),
        });
        assert_eq!(
            c.validate(8).unwrap_err().to_string(),
            "vsock.guest_cid = 2: 0-2 and 4294967295 are reserved; use 3 to 4294967294"
        );
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("missing-dir/v.sock"),
        });
        let e = c.validate(8).unwrap_err().to_string();
        assert!(
            e.starts_with("vsock.uds_path") && e.contains("missing-dir does not exist"),
            "{e}"
        );
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("x".repeat(100)),
        });
        assert!(c.validate(8).unwrap_err().to_string().contains("longer than 96 bytes"));
        c.vsock = None;

        c.machine.vcpus = 0;
        assert_eq!(
            c.validate(8).unwrap_err().to_string(),
            "machine.vcpus = 0: a VM needs at least 1 vCPU"
        );
        c.machine.vcpus = 9;
        assert_eq!(
            c.validate(8).unwrap_err().to_string(),
            "machine.vcpus = 9: this host allows at most 8 vCPUs per VM"
        );
        c.machine.vcpus = 1;
        c.machine.memory_mib = 0;
        assert!(c
            .validate(8)
            .unwrap_err()
            .to_string()
            .starts_with("machine.memory_mib = 0:"));
        c.machine.memory_mib = 128;

        c.boot.initrd = Some(dir.join("missing.cpio"));
        let e = c.validate(8).unwrap_err();
        assert!(e.is_config_error());
        assert_eq!(
            e.to_string(),
            format!(
                "boot.initrd = \"{}\": file not found",
                dir.join("missing.cpio").display()
            )
        );
        c.boot.initrd = Some(dir.clone());
        assert!(c.validate(8).unwrap_err().to_string().ends_with("not a regular file"));
        c.boot.initrd = None;

        c.boot.cmdline = "console=ttyS0\nfoo".into();
        assert!(c
            .validate(8)
            .unwrap_err()
            .to_string()
            .starts_with("boot.cmdline: contains '\\n'"));
        c.boot.cmdline = DEFAULT_CMDLINE.into();

        c.boot.kernel = dir.join("nope");
        assert!(c.validate(8).unwrap_err().to_string().starts_with("boot.kernel = "));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
