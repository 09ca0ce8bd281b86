//! The error type of the `mvm` crate.

use std::path::PathBuf;

/// Everything that can go wrong managing VMs. Messages say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM name that is not `[a-z0-9][a-z0-9-]*` of at most 32 bytes.
    #[error("invalid VM name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// No VM of this name in the state directory.
    #[error("no VM named {name:?} (in {}); `mvm list` shows the VMs, `mvm create {name} --project <dir>` makes one", root.display())]
    UnknownVm { name: String, root: PathBuf },
    /// `create` of a name that exists.
    #[error("a VM named {name:?} already exists; pick another name, or remove it first with `mvm rm {name}`")]
    AlreadyExists { name: String },
    /// `--project` is missing, not a directory, or unusable.
    #[error("project {}: {reason}", path.display())]
    Project { path: PathBuf, reason: String },
    /// A command-line or option value that cannot be used.
    #[error("{0}")]
    Usage(String),
    /// No kernel to boot was given or found.
    #[error("no guest {what} to boot: pass --{what} <file> or set {env} (or install one as {})", default.display())]
    NoKernel {
        what: &'static str,
        env: &'static str,
        default: PathBuf,
    },
    /// The VM definition (vm.toml) is invalid.
    #[error("invalid VM definition {}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: microvm_dev::Error,
    },
    /// A base file given with `--from` cannot be used.
    #[error("{}: {reason}", path.display())]
    BaseFile { path: PathBuf, reason: String },
    /// The VM is running and the operation needs it stopped.
    #[error("VM {name:?} is running (pid {pid}); stop it first with `mvm stop {name}`, or use --force")]
    Running { name: String, pid: u32 },
    /// The VM is not running and the operation needs it running.
    #[error("VM {name:?} is not running; start it with `mvm start {name}`")]
    NotRunning { name: String },
    /// `mvm-vmm` exited before the guest's agent answered.
    #[error("VM {name:?} did not start: mvm-vmm {status}{details}")]
    StartFailed {
        name: String,
        status: String,
        /// The last lines of vmm.log and console.log, preformatted.
        details: String,
    },
    /// The agent did not answer in time.
    #[error("VM {name:?}: the guest agent did not answer within {secs} s (last: {last}); see `mvm logs {name}`. The VM is left running: `mvm stop {name}` stops it")]
    StartTimeout { name: String, secs: u64, last: String },
    /// The VM did not stop even after SIGKILL.
    #[error("VM {name:?} (pid {pid}) did not stop, even after SIGKILL")]
    StopFailed { name: String, pid: u32 },
    /// The `mvm-vmm` program cannot be found or started.
    #[error("cannot run mvm-vmm ({}): {source}; set MVM_VMM to its path", path.display())]
    Vmm {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Talking to the guest agent failed.
    #[error("guest agent: {what}")]
    Agent {
        what: String,
        #[source]
        source: Option<mvm_agent::proto::Error>,
    },
    /// The agent answered a request with an error.
    #[error("the guest agent refused: {0}")]
    Remote(String),
    /// Refusing to delete a state directory something is mounted under.
    #[error("refusing to remove {}: {} is mounted there; unmount it first", dir.display(), mount.display())]
    MountedUnder { dir: PathBuf, mount: PathBuf },
    /// The generated definition does not pass the VMM's checks.
    #[error("the VM definition would be invalid")]
    Invalid(#[source] microvm_dev::Error),
    /// Another `mvm` works on this VM right now.
    #[error("VM {name:?} is busy: {what}; try again when it is done")]
    Busy { name: String, what: String },
    /// No image of this name or id.
    #[error("no image {reference:?} in {}; `mvm image list` shows the images, `mvm image build --name {reference}` builds one", dir.display())]
    UnknownImage { reference: String, dir: PathBuf },
    /// Removing an image that a VM boots from.
    #[error("image {image} is the root of VM(s) {vms}; remove them first (`mvm rm <vm>`)")]
    ImageInUse { image: String, vms: String },
    /// A step of an image build failed.
    #[error("building image {name:?}: {step} failed: {detail}")]
    ImageBuild {
        name: String,
        step: &'static str,
        detail: String,
    },
    /// Not enough disk space.
    #[error("no space left in {}: about {need_mib} MiB are needed, {free_mib} MiB are free; free some space or set MVM_IMAGE_DIR to a larger disk", dir.display())]
    NoSpace { dir: PathBuf, need_mib: u64, free_mib: u64 },
    /// A managed network cannot be set up or changed.
    #[error(transparent)]
    Network(#[from] mvm_net::Error),
    /// A port forward cannot be added, removed or applied.
    #[error("VM {name:?}: {reason}")]
    Forward { name: String, reason: String },
    /// `mvm apply` found host paths that changed since the VM took them.
    #[error("VM {name:?}: {} changed on the host since the VM took {}; nothing was applied:{}\nresolve each (restore the host file, or drop the VM's change with `mvm reset {name} <path>`), then apply again", if conflicts.len() == 1 { "1 path" } else { "some paths" }, if conflicts.len() == 1 { "it" } else { "them" }, conflicts.iter().map(|(p, why)| format!("\n  {}: {why}", p.display())).collect::<String>())]
    Conflicts {
        name: String,
        conflicts: Vec<(PathBuf, String)>,
    },
    /// A devenv.nix that does not parse or cannot be read without Nix.
    #[error("{}: line {line}, column {column}: {message}; fix the file (mvm reads devenv.nix without evaluating Nix)", path.display())]
    Devenv {
        path: PathBuf,
        line: u32,
        column: u32,
        message: String,
    },
    /// A host file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit status for this error: 2 for usage and
    /// configuration errors (bad name, unknown VM, bad project path,
    /// invalid vm.toml), 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidName { .. }
            | Error::UnknownVm { .. }
            | Error::AlreadyExists { .. }
            | Error::Project { .. }
            | Error::Usage(_)
            | Error::NoKernel { .. }
            | Error::Config { .. }
            | Error::Invalid(_)
            | Error::BaseFile { .. }
            | Error::Devenv { .. }
            | Error::UnknownImage { .. } => 2,
            _ => 1,
        }
    }

    /// An `Io` error maker for `map_err`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    pub(crate) fn agent(what: impl Into<String>) -> impl FnOnce(mvm_agent::proto::Error) -> Error {
        let what = what.into();
        move |source| match source {
            mvm_agent::proto::Error::Remote(m) => Error::Remote(m),
            source => Error::Agent {
                what,
                source: Some(source),
            },
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Print an error and its causes to stderr, one line each, no backtrace:
/// `<program>: error: ...` then `  caused by: ...`. A cause whose text the
/// line above already holds (messages often quote their source) is not
/// repeated. Both binaries report this way.
pub fn report(program: &str, e: &dyn std::error::Error) {
    eprintln!("{program}: error: {e}");
    let mut shown = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !shown.contains(&text) {
            eprintln!("  caused by: {text}");
        }
        shown = text;
        source = s.source();
    }
}
