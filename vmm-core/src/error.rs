//! The error type of the `microvm-dev` crate.

use std::path::PathBuf;

/// Everything that can stop a VM from being built or run.
///
/// Messages name what the user has to fix: the file, the key, the value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ConfigRead { path: PathBuf, source: std::io::Error },
    /// The configuration file is not valid TOML for `vm.toml`.
    #[error("{location}: {message}")]
    ConfigSyntax { location: String, message: String },
    /// A configuration value is out of range or inconsistent.
    #[error("{key} = {value}: {reason}")]
    ConfigValue {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// A file named in the configuration cannot be used.
    #[error("{key} = \"{}\": {reason}", path.display())]
    ConfigPath {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The kernel image is not something this VMM can boot.
    #[error("kernel \"{}\": {reason}", path.display())]
    KernelImage { path: PathBuf, reason: String },
    /// Guest memory cannot hold the kernel, initrd and boot structures.
    #[error("machine.memory_mib = {memory_mib}: too small, {reason}; give the VM at least {needed_mib} MiB")]
    MemoryTooSmall {
        memory_mib: u32,
        needed_mib: u64,
        reason: String,
    },
    /// The kernel command line cannot be passed to this kernel.
    #[error("boot.cmdline: {0}")]
    Cmdline(String),
    /// `/dev/kvm` is missing or not accessible.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// A disk image cannot be used.
    #[error("{0}")]
    Disk(#[from] mvm_storage::Error),
    /// A network interface cannot be set up.
    #[error("{0}")]
    Net(#[from] mvm_net::Error),
    /// A device could not be created.
    #[error("device setup: {0}")]
    Device(#[from] mvm_devices::Error),
    /// Another process runs this VM (holds its state directory's lock).
    #[error("VM {name:?} is already running: another process holds {}", lock.display())]
    AlreadyRunning { name: String, lock: PathBuf },
    /// A thread's seccomp filter could not be built or installed.
    #[error(
        "seccomp filter of the {kind} threads: {reason} (`[security] seccomp = false` in vm.toml runs without \
         filters)"
    )]
    Seccomp { kind: &'static str, reason: String },
    /// A virtio-fs share cannot be served.
    #[error("share {tag:?}: {reason}")]
    Share { tag: String, reason: String },
    /// A host resource (thread, terminal, file, eventfd) failed.
    #[error("{what}: {source}")]
    Host {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// True when the error is caused by the configuration or the files it
    /// names (the user can fix it), false for host or VMM failures.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            Error::ConfigRead { .. }
                | Error::ConfigSyntax { .. }
                | Error::ConfigValue { .. }
                | Error::ConfigPath { .. }
                | Error::KernelImage { .. }
                | Error::MemoryTooSmall { .. }
                | Error::Cmdline(_)
                | Error::Disk(_)
                | Error::Device(mvm_devices::Error::VsockSocket { .. })
        )
    }

    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }

    pub(crate) fn host(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Host { what, source }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
