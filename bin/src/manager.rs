//! VMs in a state root: create, list, start, stop, remove.
//!
//! Each VM is a directory `<root>/<name>/` holding its definition
//! (`vm.toml`, read by `mvm-vmm run`) and its run-time files; the layout
//! is in `docs/manager.md`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use microvm_dev::VmConfig;
use serde::Serialize;

pub mod changes;
mod definition;
mod devenv_plan;
pub mod direnv;
mod env;
mod network;
mod review;
pub mod services;
pub mod user;

use definition::check_definition;
pub use definition::default_cmdline;
#[cfg(test)]
use definition::with_hostname;
pub use devenv_plan::{plan as devenv_plan, DevenvPlan};
pub use env::{export_lines, guest_workdir, session_env, shell_quote, EnvArg, SessionSettings};
pub use network::{parse_host_port, ForwardInfo, NetworkChoice, PortSpec};
pub use review::ApplyReport;
pub use user::{GuestUser, UserChoice};

use crate::agent::{AgentClient, Info, PowerAction, AGENT_PORT};
use crate::image::ImageStore;
use crate::pidfile::{self, Record};
use crate::{Error, Result};

/// Longest VM name.
pub const MAX_NAME_LEN: usize = 32;
/// The definition file in a VM's directory.
pub const VM_TOML: &str = "vm.toml";
/// The guest console output.
pub const CONSOLE_LOG: &str = "console.log";
/// `mvm-vmm`'s standard output and error, appended at each start.
pub const VMM_LOG: &str = "vmm.log";
/// `mvm-vmm`'s pid file (see [`crate::pidfile`]).
pub const VMM_PID: &str = "vmm.pid";
/// The VM's vsock Unix socket.
pub const VSOCK_SOCK: &str = "vsock.sock";
/// Held while a start is in progress.
pub const START_LOCK: &str = "start.lock";
/// Directory of the default guest kernel and initramfs in the state root;
/// also why no VM may be called "guest".
pub const GUEST_DIR: &str = "guest";
/// Default directory of the root file system images in the state root.
pub const IMAGES_DIR: &str = "images";
/// Environment variables naming the default kernel and initramfs.
pub const KERNEL_ENV: &str = "MVM_KERNEL";
pub const INITRD_ENV: &str = "MVM_INITRD";
/// Environment variable naming the `mvm-vmm` program.
pub const VMM_ENV: &str = "MVM_VMM";
/// The share tag of the project directory.
pub const PROJECT_TAG: &str = "project";
/// Where the guest mounts the project.
pub const PROJECT_MOUNT: &str = "/project";
/// Defaults of `create`.
pub const DEFAULT_CPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// Default time limits.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(300);
/// Stop: the agent stops the services cleanly, then powers off.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop` waits after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(200);

/// Check a VM name: `[a-z0-9][a-z0-9-]*`, at most 32 bytes.
pub fn validate_name(name: &str) -> Result<()> {
    let fail = |reason: &str| {
        Err(Error::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return fail("a name is needed");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("at most 32 characters");
    }
    if name.starts_with('-') {
        return fail("must start with a lowercase letter or a digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("only lowercase letters a-z, digits and '-' are allowed");
    }
    Ok(())
}

/// A persistent volume for `create`: `name:size_mib[:mount]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    pub size_mib: u64,
    pub mount: Option<String>,
}

impl FromStr for VolumeSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Usage(format!(
                "volume {s:?}: {why}; expected name:size_mib[:mount], e.g. data:1024:/data"
            ))
        };
        let mut parts = s.splitn(3, ':');
        let name = parts.next().unwrap_or_default();
        if name.is_empty() {
            return Err(bad("the name is empty"));
        }
        let size = parts.next().ok_or_else(|| bad("the size is missing"))?;
        let size_mib = size
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("the size is not a positive number of MiB"))?;
        let mount = parts.next().map(str::to_string);
        if mount.as_deref().is_some_and(|m| !m.starts_with('/')) {
            return Err(bad("the mount point must be an absolute path"));
        }
        Ok(VolumeSpec {
            name: name.to_string(),
            size_mib,
            mount,
        })
    }
}

/// What `create` makes.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub name: String,
    /// A host directory the guest sees at `/project` (an overlay: the
    /// guest's changes stay in the VM).
    pub project: Option<PathBuf>,
    /// vCPUs; default [`DEFAULT_CPUS`] (or the `--from` file's).
    pub cpus: Option<u32>,
    /// Memory; default [`DEFAULT_MEMORY_MIB`] (or the `--from` file's).
    pub memory_mib: Option<u32>,
    /// Keep the guest's changes to the project across restarts.
    pub persist: bool,
    pub volumes: Vec<VolumeSpec>,
    /// An existing vm.toml to start from: its machine, boot and other keys
    /// are kept; name, state_root, vsock, console and the project share
    /// are set by `create`.
    pub from: Option<PathBuf>,
    /// Guest kernel; default `$MVM_KERNEL`, else `<root>/guest/vmlinux`.
    pub kernel: Option<PathBuf>,
    /// Initramfs; default `$MVM_INITRD`, else `<root>/guest/initramfs.cpio`
    /// if it exists. Its init must be mvm-agent.
    pub initrd: Option<PathBuf>,
    /// The root file system.
    pub root: RootChoice,
    /// With an image root: keep the guest's changes to it in memory only,
    /// so every start begins from the image.
    pub ephemeral: bool,
    /// With an image root: size of the volume that keeps the changes;
    /// default [`microvm_dev::config::DEFAULT_ROOT_MIB`] (sparse).
    pub root_size_mib: Option<u64>,
    /// The managed network the VM joins (DHCP address, name, NAT).
    pub network: NetworkChoice,
    /// Host ports forwarded to the guest, written to vm.toml.
    pub forwards: Vec<PortSpec>,
    /// The guest user `shell` and `exec` run as (see [`user`]).
    pub user: UserChoice,
    /// `[env].set` entries: set in every `shell`/`exec` session.
    pub env: Vec<(String, String)>,
    /// The project's devenv.nix, recorded as `[devenv] file` (see
    /// [`CreateOptions::apply_devenv`]).
    pub devenv: Option<PathBuf>,
    /// `[env].passthrough` patterns: host variables copied into sessions
    /// at exec time (only the patterns are written, never values).
    pub pass_env: Vec<String>,
    /// Servers the agent runs from Debian packages (see [`services`]):
    /// each gets a `[[service]]` table and a host forward, the VM the
    /// `services` volume and an image with the packages.
    pub services: Vec<microvm_dev::service::ServiceConfig>,
    /// `[security] user`: the host user the VMM runs as when started as
    /// root (root prepares TAPs, virtiofsd and /dev/kvm; see
    /// `microvm_dev::privsep`). Default (None): [`DEFAULT_VMM_USER`] when
    /// mvm runs as root and that account exists; "root": the VMM keeps
    /// the caller's rights.
    pub vmm_user: Option<String>,
}

/// The account VMMs run as by default when mvm runs as root
/// (scripts/setup-host.sh creates it).
pub const DEFAULT_VMM_USER: &str = "microvm-dev";

/// `[security] user` for a new VM: the one asked for ("root": none), else
/// [`DEFAULT_VMM_USER`] if we are root and it exists (a warning if not).
pub(crate) fn vmm_user_for(asked: Option<&str>) -> Option<String> {
    match asked {
        Some("root") => None,
        Some(user) => Some(user.to_string()),
        // SAFETY: geteuid has no preconditions.
        None if unsafe { libc::geteuid() } != 0 => None,
        None if user::host_user_by_name(DEFAULT_VMM_USER).is_some() => Some(DEFAULT_VMM_USER.to_string()),
        None => {
            log::warn!(
                "no user {DEFAULT_VMM_USER} on this host: the VM's VMM will run as root (scripts/setup-host.sh \
                 creates the user; --vmm-user chooses another)"
            );
            None
        }
    }
}

/// What a new VM boots into.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RootChoice {
    /// The image named [`crate::image::DEFAULT_IMAGE`], built first if
    /// there is none (a `--from` file's `[root]` wins over this).
    #[default]
    DefaultImage,
    /// An image by name, `<name>-<id>`, id, or the path of an ext4 file.
    Image(String),
    /// No image: the initramfs is the whole system.
    Initramfs,
}

/// Whether a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    /// Never started, or its last run ended normally (power-off, reboot,
    /// `mvm stop`).
    Stopped,
    /// Its last run ended abnormally (guest crash, VMM error, VMM killed).
    /// It can be started again.
    Crashed,
    /// Its vm.toml cannot be read (see `error`).
    Broken,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Broken => "broken",
        }
    }
}

/// A VM as `list` and `status` show it (`--json` prints exactly these
/// fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    /// The `mvm-vmm` process, while running.
    pub pid: Option<u32>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The host directory shared as /project.
    pub project: Option<PathBuf>,
    /// The MAC address of the VM's first NIC.
    pub mac: String,
    /// The managed network of its first NIC on one.
    pub network: Option<String>,
    /// Its address there (pinned at the first start).
    pub ip: Option<String>,
    /// Host ports forwarded to it (vm.toml's and `mvm port`'s).
    pub forwards: Vec<ForwardInfo>,
    /// The guest user `shell` and `exec` run as; `None`: root.
    pub user: Option<GuestUser>,
    /// Its `[[service]]`s; their states come from the agent in `status`.
    pub services: Vec<services::ServiceInfo>,
    /// The devenv.nix its services and variables came from.
    pub devenv: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Unix time of the start, while running.
    pub started_at: Option<u64>,
    pub uptime_s: Option<u64>,
    /// How the last run ended, when not running.
    pub last_exit: Option<String>,
    /// Unix time of the last run's end.
    pub exited_at: Option<u64>,
    /// The last console lines, for a crashed VM.
    pub console_tail: Vec<String>,
    /// Why the definition cannot be read (state "broken").
    pub error: Option<String>,
}

/// How `start` went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// Started; the agent answered after `ready_after`.
    Started { ready_after: Duration, info: Info },
    /// It was running already.
    AlreadyRunning { pid: u32 },
}

/// Options of `start`.
pub struct StartOptions<'a> {
    /// How long to wait for the guest agent.
    pub timeout: Duration,
    /// Called about every 200 ms while waiting, with the time since the
    /// start.
    pub progress: Option<&'a mut dyn FnMut(Duration)>,
}

impl Default for StartOptions<'_> {
    fn default() -> Self {
        StartOptions {
            timeout: DEFAULT_START_TIMEOUT,
            progress: None,
        }
    }
}

/// How `stop` stopped the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest powered off when the agent asked it to.
    Poweroff,
    /// `mvm-vmm` stopped the VM on SIGTERM.
    Terminated,
    /// `mvm-vmm` was killed with SIGKILL.
    Killed,
    /// It was not running.
    NotRunning,
}

impl StopOutcome {
    pub fn describe(self) -> &'static str {
        match self {
            StopOutcome::Poweroff => "powered off by its agent",
            StopOutcome::Terminated => "stopped with SIGTERM (the agent did not power it off in time)",
            StopOutcome::Killed => "killed with SIGKILL (it did not stop on SIGTERM)",
            StopOutcome::NotRunning => "was not running",
        }
    }
}

/// A held `flock`, released on drop.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    fn open(path: &Path) -> Result<File> {
        pidfile::open_lock_file(path).map_err(Error::io(format!("cannot open the lock file {}", path.display())))
    }

    /// Wait for the lock.
    pub(crate) fn acquire(path: &Path) -> Result<FileLock> {
        let f = Self::open(path)?;
        loop {
            match pidfile::flock(&f, libc::LOCK_EX) {
                Ok(()) => return Ok(FileLock { _file: f }),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("cannot lock {}", path.display()))(e)),
            }
        }
    }

    /// Take the lock if free.
    pub(crate) fn try_acquire(path: &Path) -> Result<Option<FileLock>> {
        let f = Self::open(path)?;
        match pidfile::flock(&f, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { _file: f })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(Error::io(format!("cannot lock {}", path.display()))(e)),
        }
    }
}

/// Removes a directory on drop unless disarmed: nothing half-created stays.
pub(crate) struct RemoveOnDrop(pub(crate) Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Manages the VMs of one state root.
///
/// ```no_run
/// use mvm::{CreateOptions, Manager, StartOptions};
/// # fn main() -> mvm::Result<()> {
/// let mvm = Manager::from_env();
/// mvm.create(&CreateOptions {
///     name: "web".into(),
///     project: Some("/home/me/web".into()),
///     ..Default::default()
/// })?;
/// mvm.start("web", &mut StartOptions::default())?;
/// let out = mvm.agent("web")?.exec_output(&["ls", "/project"])?;
/// print!("{}", String::from_utf8_lossy(&out.stdout));
/// mvm.stop("web", mvm::manager::DEFAULT_STOP_TIMEOUT)?;
/// mvm.rm("web", false)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Manager {
    root: PathBuf,
}

impl Manager {
    /// The VMs under `root` (made absolute against the current directory).
    pub fn new(root: PathBuf) -> Self {
        let root = std::path::absolute(&root).unwrap_or(root);
        Manager { root }
    }

    /// The VMs under `$MVM_STATE_DIR`, else /var/lib/microvm-dev.
    pub fn from_env() -> Self {
        Self::new(microvm_dev::config::default_state_root())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<name>`, without checks.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The directory of an existing VM.
    fn existing(&self, name: &str) -> Result<PathBuf> {
        validate_name(name)?;
        let dir = self.vm_dir(name);
        let is_vm = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
            && std::fs::symlink_metadata(dir.join(VM_TOML)).is_ok_and(|m| m.is_file());
        if is_vm {
            Ok(dir)
        } else {
            Err(Error::UnknownVm {
                name: name.to_string(),
                root: self.root.clone(),
            })
        }
    }

    /// A client for the agent of VM `name` (which need not be running yet).
    pub fn agent(&self, name: &str) -> Result<AgentClient> {
        Ok(AgentClient::new(self.existing(name)?.join(VSOCK_SOCK)))
    }

    fn root_lock(&self) -> Result<FileLock> {
        std::fs::create_dir_all(&self.root).map_err(Error::io(format!(
            "cannot create the state directory {} (set MVM_STATE_DIR or --state-dir to a directory you may write)",
            self.root.display()
        )))?;
        FileLock::acquire(&self.root.join(".lock"))
    }

    /// Create a VM: write its definition to `<root>/<name>/vm.toml`.
    /// Nothing is left on disk when this fails.
    pub fn create(&self, opts: &CreateOptions) -> Result<VmInfo> {
        self.create_with_progress(opts, &mut |_| {})
    }

    /// [`Manager::create`], reporting the steps of an image build it needs
    /// (the default image, the first time).
    pub fn create_with_progress(
        &self,
        opts: &CreateOptions,
        progress: &mut dyn FnMut(crate::image::Progress<'_>),
    ) -> Result<VmInfo> {
        let name = opts.name.as_str();
        validate_name(name)?;
        if name == GUEST_DIR || name == IMAGES_DIR || name == mvm_net::host::network::NETWORKS_DIR {
            return Err(Error::InvalidName {
                name: name.into(),
                reason: format!(
                    "reserved: {}/{name} holds the default guest {}",
                    self.root.display(),
                    match name {
                        GUEST_DIR => "kernel",
                        IMAGES_DIR => "images",
                        _ => "networks",
                    }
                ),
            });
        }
        let project = match &opts.project {
            None => None,
            Some(p) => Some(check_project(p)?),
        };
        let text = self.definition(opts, project.as_deref(), progress)?;

        let _lock = self.root_lock()?;
        let dir = self.vm_dir(name);
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(Error::AlreadyExists { name: name.into() });
        }
        let tmp = self
            .root
            .join(format!(".tmp-{name}-{}-{}", std::process::id(), unique()));
        std::fs::create_dir(&tmp).map_err(Error::io(format!("cannot create {}", tmp.display())))?;
        let mut guard = RemoveOnDrop(Some(tmp.clone()));
        let file = tmp.join(VM_TOML);
        // Synced before the rename below makes the VM exist: a crash
        // leaves no VM, or one with its whole definition.
        mvm_net::host::replace_file(&file, text.as_bytes(), 0o644)
            .map_err(Error::io(format!("cannot write {}", file.display())))?;
        check_definition(&file, &dir)?;
        rename_noreplace(&tmp, &dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::AlreadyExists { name: name.into() }
            } else {
                Error::io(format!("cannot rename {} to {}", tmp.display(), dir.display()))(e)
            }
        })?;
        guard.0 = None;
        std::fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(Error::io(format!("cannot sync {}", self.root.display())))?;
        self.status(name)
    }

    /// The root file system images (`$MVM_IMAGE_DIR`, else
    /// `<root>/images`).
    pub fn images(&self) -> ImageStore {
        ImageStore::for_state_root(&self.root)
    }

    /// Each VM whose root is an image, with that image's file.
    pub fn image_roots(&self) -> Result<Vec<(String, PathBuf)>> {
        Ok(self
            .list()?
            .into_iter()
            .filter_map(|vm| {
                let root = VmConfig::from_file(vm.state_dir.join(VM_TOML)).ok()?.root?;
                Some((vm.name, root.image))
            })
            .collect())
    }

    /// Delete the images `reference` names (see [`ImageStore::remove`]),
    /// refusing while a VM boots from one.
    pub fn remove_image(&self, reference: &str) -> Result<Vec<crate::ImageInfo>> {
        let roots = self.image_roots()?;
        let users = |image: &Path| {
            roots
                .iter()
                .filter(|(_, r)| r == image)
                .map(|(n, _)| n.clone())
                .collect()
        };
        self.images().remove(reference, &users)
    }

    /// Every VM, by name.
    pub fn list(&self) -> Result<Vec<VmInfo>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("cannot read {}", self.root.display()))(e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_name(n).is_ok() && self.existing(n).is_ok())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            match self.info(&name) {
                Ok(i) => out.push(i),
                // Removed meanwhile.
                Err(Error::UnknownVm { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One VM; an error if its definition cannot be read.
    pub fn status(&self, name: &str) -> Result<VmInfo> {
        let mut info = self.info(name)?;
        if info.state == VmState::Running && !info.services.is_empty() {
            if let Ok(config) = VmConfig::from_file(info.state_dir.join(VM_TOML)) {
                let states = self.service_states(name, &config).ok();
                info.services = services::service_infos(&config, info.state, states.as_deref());
            }
        }
        if info.state == VmState::Broken {
            let file = info.state_dir.join(VM_TOML);
            return Err(match VmConfig::from_file(&file) {
                Err(source) => Error::Config { path: file, source },
                Ok(_) => Error::Usage(info.error.unwrap_or_default()),
            });
        }
        Ok(info)
    }

    /// One VM; a definition that cannot be read gives state `Broken`.
    fn info(&self, name: &str) -> Result<VmInfo> {
        let dir = self.existing(name)?;
        let config = VmConfig::from_file(dir.join(VM_TOML));
        let observed = pidfile::observe(&dir.join(VMM_PID))
            .map_err(Error::io(format!("cannot read {}", dir.join(VMM_PID).display())))?;
        let run = RunState::from_observed(observed.as_ref());
        let mut info = VmInfo {
            name: name.to_string(),
            state: run.state,
            pid: run.pid,
            vcpus: 0,
            memory_mib: 0,
            project: None,
            mac: mvm_net::format_mac(mvm_net::mac_for(name, 0)),
            network: None,
            ip: None,
            forwards: Vec::new(),
            user: None,
            services: Vec::new(),
            devenv: None,
            state_dir: dir.clone(),
            started_at: run.started_at,
            uptime_s: run.started_at.map(|s| pidfile::unix_now().saturating_sub(s)),
            last_exit: run.last_exit,
            exited_at: run.exited_at,
            console_tail: Vec::new(),
            error: None,
        };
        match config {
            Ok(c) => {
                info.vcpus = c.machine.vcpus;
                info.memory_mib = c.machine.memory_mib;
                info.project = c.shares.iter().find(|s| s.tag == PROJECT_TAG).map(|s| s.source.clone());
                if let Some(mac) = c.nets.first().and_then(|n| n.mac) {
                    info.mac = mvm_net::format_mac(mac);
                }
                info.network = Self::vm_network(&c).map(str::to_string);
                info.ip = self.vm_ip(name, &c);
                info.forwards = self.forward_infos(name, &c).unwrap_or_default();
                info.user = user::from_cmdline(&c.boot.cmdline);
                info.services = services::service_infos(&c, info.state, None);
                info.devenv = c.devenv.clone();
            }
            Err(e) => {
                info.error = Some(e.to_string());
                if info.state != VmState::Running {
                    info.state = VmState::Broken;
                }
            }
        }
        if info.state == VmState::Crashed {
            info.console_tail = tail_lines(&dir.join(CONSOLE_LOG), 0, 10);
        }
        Ok(info)
    }

    /// Start VM `name` and wait until its agent answers.
    pub fn start(&self, name: &str, opts: &mut StartOptions<'_>) -> Result<StartOutcome> {
        let dir = self.existing(name)?;
        let _start = FileLock::acquire(&dir.join(START_LOCK))?;
        let info = self.info(name)?;
        if info.state == VmState::Running {
            return Ok(StartOutcome::AlreadyRunning {
                pid: info.pid.unwrap_or(0),
            });
        }
        let file = dir.join(VM_TOML);
        let config = VmConfig::from_file(&file).map_err(|source| Error::Config {
            path: file.clone(),
            source,
        })?;
        config.validate(254).map_err(|source| Error::Config {
            path: file.clone(),
            source,
        })?;
        self.check_forwards_free(name, &config)?;
        let uds = config.vsock.as_ref().map(|v| v.uds_path.clone()).ok_or_else(|| {
            Error::Usage(format!(
                "{}: [vsock] is missing; mvm talks to the guest through it (uds_path = \"{VSOCK_SOCK}\")",
                file.display()
            ))
        })?;

        let vmm = vmm_program();
        let log_path = dir.join(VMM_LOG);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Error::io(format!("cannot open {}", log_path.display())))?;
        let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
        let _ = writeln!(log, "--- mvm start {name} at unix time {} ---", pidfile::unix_now());
        let log_err = log.try_clone().map_err(Error::io("vmm.log"))?;
        let mut cmd = Command::new(&vmm);
        cmd.arg("run")
            .arg(&file)
            .arg("--restart-on-reboot")
            .arg("--pid-file")
            .arg(dir.join(VMM_PID))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: setsid is async-signal-safe; the VMM gets its own
        // session so the terminal's hangup or Ctrl-C never reaches it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let began = Instant::now();
        let mut child = cmd.spawn().map_err(|source| Error::Vmm {
            path: vmm.clone(),
            source,
        })?;

        let client = AgentClient {
            uds,
            port: AGENT_PORT,
            timeout: Duration::from_secs(5),
        };
        let mut last = String::from("the VMM is starting");
        let info = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut details = String::new();
                let vlog = tail_lines(&log_path, log_start, 15);
                if !vlog.is_empty() {
                    details.push_str(&format!("\n  last lines of {}:", log_path.display()));
                    for l in vlog {
                        details.push_str(&format!("\n    {l}"));
                    }
                }
                let clog = tail_lines(&dir.join(CONSOLE_LOG), 0, 10);
                if !clog.is_empty() {
                    details.push_str(&format!(
                        "\n  last console lines ({}):",
                        dir.join(CONSOLE_LOG).display()
                    ));
                    for l in clog {
                        details.push_str(&format!("\n    {l}"));
                    }
                }
                return Err(Error::StartFailed {
                    name: name.into(),
                    status: describe_vmm_status(status),
                    details,
                });
            }
            if began.elapsed() >= opts.timeout {
                // Reap it later if it ends; we leave it running.
                std::thread::spawn(move || child.wait());
                return Err(Error::StartTimeout {
                    name: name.into(),
                    secs: opts.timeout.as_secs(),
                    last,
                });
            }
            if client.uds.exists() {
                match client.info() {
                    Ok(info) => break info,
                    Err(e) => last = e.to_string(),
                }
            }
            if let Some(p) = opts.progress.as_mut() {
                p(began.elapsed());
            }
            std::thread::sleep(POLL);
        };
        let ready_after = began.elapsed();
        // The guest's clock starts from the RTC and lags on slow hosts.
        if let Err(e) = client.sync_clock() {
            log::warn!("VM {name}: cannot set the guest clock: {e}");
        }
        // The agent starts them in the background; `status` follows them.
        if !config.services.is_empty() {
            if let Err(e) = self.send_services(name, &config) {
                log::warn!("VM {name}: cannot have the agent start its services: {e}");
            }
        }
        // Reap the VMM when it ends, for long-lived library users.
        std::thread::spawn(move || child.wait());
        Ok(StartOutcome::Started { ready_after, info })
    }

    /// Stop VM `name`: ask its agent to power off, wait up to `timeout`,
    /// then SIGTERM (10 s), then SIGKILL.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<StopOutcome> {
        let dir = self.existing(name)?;
        let info = self.info(name)?;
        if info.state != VmState::Running {
            return Ok(StopOutcome::NotRunning);
        }
        let pid_path = dir.join(VMM_PID);
        let agent = AgentClient {
            uds: dir.join(VSOCK_SOCK),
            port: AGENT_PORT,
            timeout: Duration::from_secs(5).min(timeout.max(Duration::from_millis(500))),
        };
        match agent.power(PowerAction::Poweroff) {
            Ok(()) => {
                if wait_unlocked(&pid_path, timeout) {
                    return Ok(StopOutcome::Poweroff);
                }
            }
            Err(e) => log::info!("VM {name}: agent power-off failed ({e}); using SIGTERM"),
        }
        self.signal_stop(name, &pid_path, info.pid)
    }

    fn signal_stop(&self, name: &str, pid_path: &Path, pid: Option<u32>) -> Result<StopOutcome> {
        let failed = || Error::StopFailed {
            name: name.into(),
            pid: pid.unwrap_or(0),
        };
        let Some(pid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()).filter(|&p| p > 1) else {
            return Err(failed());
        };
        // Only while the lock is held: then the pid is still mvm-vmm's.
        if !is_locked(pid_path) {
            return Ok(StopOutcome::Terminated);
        }
        // SAFETY: kill(2) with a checked pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if wait_unlocked(pid_path, TERM_GRACE) {
            return Ok(StopOutcome::Terminated);
        }
        if is_locked(pid_path) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !wait_unlocked(pid_path, Duration::from_secs(5)) {
            return Err(failed());
        }
        // Killed processes write nothing: record the stop so the VM shows
        // as stopped, not crashed.
        if let Some(lock) = pidfile::PidFile::try_take(pid_path) {
            let mut lock = lock;
            let _ = lock.write(&Record::Exited {
                status: 128 + libc::SIGKILL,
                at: pidfile::unix_now(),
                reason: "killed with SIGKILL by mvm stop".into(),
            });
        }
        Ok(StopOutcome::Killed)
    }

    /// Stop (if running) and start again.
    pub fn restart(&self, name: &str, stop_timeout: Duration, opts: &mut StartOptions<'_>) -> Result<StartOutcome> {
        self.stop(name, stop_timeout)?;
        self.start(name, opts)
    }

    /// Remove VM `name` and everything in its state directory (never the
    /// project: it is outside). A running VM is refused unless `force`,
    /// which kills it first.
    pub fn rm(&self, name: &str, force: bool) -> Result<()> {
        let dir = self.existing(name)?;
        let _lock = self.root_lock()?;
        let Some(_start) = FileLock::try_acquire(&dir.join(START_LOCK))? else {
            return Err(Error::Busy {
                name: name.into(),
                what: "it is being started".into(),
            });
        };
        let info = self.info(name)?;
        if info.state == VmState::Running {
            if !force {
                return Err(Error::Running {
                    name: name.into(),
                    pid: info.pid.unwrap_or(0),
                });
            }
            self.signal_stop(name, &dir.join(VMM_PID), info.pid)?;
        }
        let real = std::fs::canonicalize(&dir).map_err(Error::io(format!("cannot resolve {}", dir.display())))?;
        if let Some(mount) = mount_under(&real)? {
            return Err(Error::MountedUnder { dir: real, mount });
        }
        if let Ok(config) = VmConfig::from_file(dir.join(VM_TOML)) {
            self.release_addresses(name, &config);
        }
        // Out of sight first, so a half-removed VM is never listed.
        let doomed = self
            .root
            .join(format!(".rm-{name}-{}-{}", std::process::id(), unique()));
        std::fs::rename(&dir, &doomed).map_err(Error::io(format!("cannot remove {}", dir.display())))?;
        // remove_dir_all never follows symbolic links.
        std::fs::remove_dir_all(&doomed).map_err(Error::io(format!("cannot remove {}", doomed.display())))
    }
}

/// Where a VM stands according to its pid file.
struct RunState {
    state: VmState,
    pid: Option<u32>,
    started_at: Option<u64>,
    last_exit: Option<String>,
    exited_at: Option<u64>,
}

impl RunState {
    fn from_observed(observed: Option<&pidfile::Observed>) -> RunState {
        let mut r = RunState {
            state: VmState::Stopped,
            pid: None,
            started_at: None,
            last_exit: None,
            exited_at: None,
        };
        let Some(o) = observed else { return r };
        match (&o.record, o.locked) {
            (Some(Record::Running { pid, started }), true) => {
                r.state = VmState::Running;
                r.pid = Some(*pid);
                r.started_at = Some(*started);
            }
            // Locked, but not written yet (or unreadable): it runs.
            (_, true) => r.state = VmState::Running,
            (Some(Record::Running { pid, .. }), false) => {
                r.state = VmState::Crashed;
                r.last_exit = Some(format!("mvm-vmm (pid {pid}) ended without recording why (killed?)"));
            }
            (Some(Record::Exited { status, at, reason }), false) => {
                let (state, what) = exit_meaning(*status);
                r.state = state;
                r.exited_at = Some(*at);
                r.last_exit = Some(if reason.is_empty() || *reason == what {
                    format!("{what} (exit status {status})")
                } else {
                    format!("{what}: {reason} (exit status {status})")
                });
            }
            (None, false) => {}
        }
        r
    }
}

/// What an `mvm-vmm` exit status means, and the state it leaves.
pub fn exit_meaning(status: i32) -> (VmState, String) {
    match status {
        0 => (VmState::Stopped, "the guest powered off".into()),
        3 => (VmState::Stopped, "the guest rebooted".into()),
        4 => (VmState::Crashed, "the guest crashed".into()),
        2 => (VmState::Crashed, "configuration error".into()),
        130 => (VmState::Stopped, "stopped from the console (Ctrl-A x) or SIGINT".into()),
        s if s == microvm_dev::seccomp::VIOLATION_EXIT_CODE => (
            VmState::Crashed,
            "a VMM thread made a system call its seccomp filter forbids (vmm.log names it)".into(),
        ),
        s @ 129..=192 => (VmState::Stopped, format!("stopped by signal {}", s - 128)),
        s => (VmState::Crashed, format!("mvm-vmm failed (status {s})")),
    }
}

fn describe_vmm_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c} ({})", exit_meaning(c).1),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9)
}

pub(crate) fn check_project(p: &Path) -> Result<PathBuf> {
    let bad = |reason: String| Error::Project {
        path: p.to_path_buf(),
        reason,
    };
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad("not a directory; --project takes the directory to share".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(bad("no such directory".into())),
        Err(e) => return Err(bad(format!("cannot use it: {e}"))),
    }
    std::fs::canonicalize(p).map_err(|e| bad(format!("cannot resolve it: {e}")))
}

/// rename(2) that fails with `AlreadyExists` instead of replacing.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid C strings; renameat2 does not keep them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // File systems without RENAME_NOREPLACE: the root lock and the
        // check before make a plain rename safe among mvm processes.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if to.exists() {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(from, to)
        }
        Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Err(std::io::ErrorKind::AlreadyExists.into()),
        _ => Err(e),
    }
}

fn is_locked(pid_path: &Path) -> bool {
    matches!(pidfile::observe(pid_path), Ok(Some(o)) if o.locked)
}

/// Poll until the pid file's lock is free; false on timeout.
fn wait_unlocked(pid_path: &Path, timeout: Duration) -> bool {
    let began = Instant::now();
    loop {
        if !is_locked(pid_path) {
            return true;
        }
        if began.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of `path` after byte `from` (lossy UTF-8, without
/// carriage returns).
pub fn tail_lines(path: &Path, from: u64, n: usize) -> Vec<String> {
    let Ok(mut f) = File::open(path) else { return Vec::new() };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = from.max(len.saturating_sub(64 << 10));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.replace('\r', ""))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// A mount point at or under `dir`.
fn mount_under(dir: &Path) -> Result<Option<PathBuf>> {
    let points =
        mvm_storage::fs::host_overlay::mount_points().map_err(Error::io("cannot read /proc/self/mountinfo"))?;
    Ok(points.into_iter().find(|m| m.starts_with(dir)))
}

/// The `mvm-vmm` to run: `$MVM_VMM`, else the one next to this program,
/// else from `PATH`.
pub fn vmm_program() -> PathBuf {
    if let Some(p) = std::env::var_os(VMM_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(p) = exe.parent().map(|d| d.join("mvm-vmm")).filter(|p| p.is_file()) {
            return p;
        }
    }
    PathBuf::from("mvm-vmm")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Fixture {
        dir: PathBuf,
        m: Manager,
        kernel: PathBuf,
        initrd: PathBuf,
        project: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "mvm-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("proj")).unwrap();
            std::fs::write(dir.join("vmlinux"), b"k").unwrap();
            std::fs::write(dir.join("initrd"), b"i").unwrap();
            Fixture {
                m: Manager::new(dir.join("state")),
                kernel: dir.join("vmlinux"),
                initrd: dir.join("initrd"),
                project: dir.join("proj"),
                dir,
            }
        }

        fn opts(&self, name: &str) -> CreateOptions {
            CreateOptions {
                name: name.into(),
                project: Some(self.project.clone()),
                kernel: Some(self.kernel.clone()),
                initrd: Some(self.initrd.clone()),
                root: RootChoice::Initramfs,
                ..Default::default()
            }
        }

        /// A real (tiny) ext4 image in the store, as a build leaves it.
        fn image(&self, name: &str, id: &str) -> PathBuf {
            let dir = self.m.images().dir().join(format!("{name}-{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(crate::image::ROOTFS);
            std::fs::File::create(&file).unwrap().set_len(4 << 20).unwrap();
            let ok = Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&file)
                .status()
                .unwrap();
            assert!(ok.success());
            let info = serde_json::json!({
                "name": name, "id": id, "suite": "bookworm", "packages": ["git"], "mirror": null,
                "created": 1, "size_bytes": 0, "build_secs": 1.0
            });
            std::fs::write(dir.join("image.json"), info.to_string()).unwrap();
            file
        }

        /// Entries of the state root other than `.lock`.
        fn entries(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.m.root())
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n != ".lock")
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        }

        fn pid_file(&self, name: &str) -> PathBuf {
            self.m.vm_dir(name).join(VMM_PID)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn image_roots_in_the_definition() {
        let f = Fixture::new();
        let image = f.image(crate::image::DEFAULT_IMAGE, "0123456789ab");
        let other = f.image("py", "aaaa00001111");
        let root_of = |name: &str| {
            VmConfig::from_file(f.m.vm_dir(name).join(VM_TOML))
                .unwrap()
                .root
                .unwrap()
        };
        let mut o = f.opts("d1");
        o.root = RootChoice::DefaultImage;
        f.m.create(&o).unwrap();
        let r = root_of("d1");
        assert_eq!(r.image, image);
        assert_eq!(r.upper, microvm_dev::RootUpper::Volume);
        let mut o = f.opts("d2");
        o.root = RootChoice::Image("py".into());
        o.ephemeral = true;
        f.m.create(&o).unwrap();
        assert_eq!(root_of("d2").image, other);
        assert_eq!(root_of("d2").upper, microvm_dev::RootUpper::Tmpfs);
        let mut o = f.opts("d3");
        o.root = RootChoice::Image(other.to_string_lossy().into_owned());
        o.root_size_mib = Some(1024);
        f.m.create(&o).unwrap();
        assert_eq!(root_of("d3").size_mib, 1024);
        // Without an image root, nothing of [root].
        f.m.create(&f.opts("plain")).unwrap();
        let text = std::fs::read_to_string(f.m.vm_dir("plain").join(VM_TOML)).unwrap();
        assert!(!text.contains("[root]"), "{text}");

        let fails = |o: CreateOptions, want: &str| {
            let e = f.m.create(&o).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(e.exit_code(), 2, "{e}");
        };
        let mut o = f.opts("bad");
        o.ephemeral = true;
        fails(o, "--ephemeral");
        let mut o = f.opts("bad");
        o.root = RootChoice::Image("nope".into());
        fails(o, "no image \"nope\"");
        let mut o = f.opts("bad");
        o.root = RootChoice::Image("/no/such.ext4".into());
        fails(o, "/no/such.ext4");
        let mut o = f.opts("bad");
        o.root = RootChoice::DefaultImage;
        o.initrd = None;
        std::env::remove_var(INITRD_ENV);
        fails(o, "no guest initrd");
        assert!(!f.m.vm_dir("bad").exists());

        // Images in use stay.
        let e = f.m.remove_image("py").unwrap_err().to_string();
        assert!(e.contains("d2") && e.contains("d3"), "{e}");
        assert!(other.exists());
        f.m.rm("d2", false).unwrap();
        f.m.rm("d3", false).unwrap();
        assert_eq!(f.m.remove_image("py").unwrap().len(), 1);
        assert!(!other.exists());
    }

    #[test]
    fn names() {
        for good in ["a", "web", "my-app-2", "0", &"x".repeat(32)] {
            validate_name(good).unwrap();
        }
        for bad in [
            "",
            "-a",
            "Bad_Name",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(33),
        ] {
            assert!(
                matches!(validate_name(bad), Err(e @ Error::InvalidName { .. }) if e.exit_code() == 2),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn volume_specs() {
        assert_eq!(
            "data:1024:/data".parse::<VolumeSpec>().unwrap(),
            VolumeSpec {
                name: "data".into(),
                size_mib: 1024,
                mount: Some("/data".into())
            }
        );
        assert_eq!("d:1".parse::<VolumeSpec>().unwrap().mount, None);
        for bad in ["", "data", "data:0", "data:x:/d", ":5", "data:5:rel"] {
            assert!(bad.parse::<VolumeSpec>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_writes_a_valid_definition() {
        let f = Fixture::new();
        let mut o = f.opts("web");
        o.cpus = Some(3);
        o.persist = true;
        o.volumes = vec!["data:64:/data".parse().unwrap()];
        let info = f.m.create(&o).unwrap();
        assert_eq!(info.state, VmState::Stopped);
        assert_eq!((info.vcpus, info.memory_mib), (3, DEFAULT_MEMORY_MIB));
        assert_eq!(
            info.project.as_deref(),
            Some(std::fs::canonicalize(&f.project).unwrap().as_path())
        );
        assert_eq!(info.mac, mvm_net::format_mac(mvm_net::mac_for("web", 0)));
        let file = f.m.vm_dir("web").join(VM_TOML);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# VM \"web\", made by `mvm create`"), "{text}");
        let c = VmConfig::from_file(&file).unwrap();
        c.validate(254).unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(c.state_root, f.m.root());
        assert_eq!(c.state_dir(), f.m.vm_dir("web"));
        assert_eq!(c.boot.kernel, f.kernel);
        assert_eq!(c.boot.initrd.as_deref(), Some(f.initrd.as_path()));
        assert_eq!(c.boot.cmdline, default_cmdline("web"));
        assert!(c.boot.cmdline.contains("rdinit=/sbin/mvm-agent"));
        assert!(
            matches!(&c.console.output, microvm_dev::ConsoleOutput::File(p) if *p == f.m.vm_dir("web").join(CONSOLE_LOG))
        );
        let v = c.vsock.as_ref().unwrap();
        assert_eq!(
            (v.guest_cid, v.uds_path.clone()),
            (3, f.m.vm_dir("web").join(VSOCK_SOCK))
        );
        assert_eq!(c.shares.len(), 1);
        let s = &c.shares[0];
        assert_eq!(
            (s.tag.as_str(), s.mount.as_deref(), s.persist, s.overlay),
            ("project", Some("/project"), true, true)
        );
        assert_eq!(c.volumes.len(), 1);
        assert_eq!((c.volumes[0].name.as_str(), c.volumes[0].size_mib), ("data", 64));
        // Only the VM directory and nothing temporary.
        assert_eq!(f.entries(), vec!["web".to_string()]);
    }

    #[test]
    fn create_without_project_and_from_a_base_file() {
        let f = Fixture::new();
        let mut o = f.opts("bare");
        o.project = None;
        f.m.create(&o).unwrap();
        let c = VmConfig::from_file(f.m.vm_dir("bare").join(VM_TOML)).unwrap();
        assert!(c.shares.is_empty());
        assert_eq!(c.machine.vcpus, DEFAULT_CPUS);

        let base = f.dir.join("base.toml");
        std::fs::write(
            &base,
            "version = 1\nname = \"other\"\n[machine]\nvcpus = 1\nacpi = false\n[boot]\nkernel = \"vmlinux\"\ncmdline = \"console=ttyS0 quiet mvm.hostname=x\"\n[console]\noutput = \"stdio\"\n[[share]]\ntag = \"project\"\nsource = \"proj\"\n[[share]]\ntag = \"extra\"\nsource = \"proj\"\noverlay = false\n",
        )
        .unwrap();
        let mut o = f.opts("derived");
        o.from = Some(base);
        o.kernel = None;
        o.initrd = None;
        o.memory_mib = Some(512);
        f.m.create(&o).unwrap();
        let c = VmConfig::from_file(f.m.vm_dir("derived").join(VM_TOML)).unwrap();
        assert_eq!(c.name, "derived");
        assert_eq!((c.machine.vcpus, c.machine.memory_mib, c.machine.acpi), (1, 512, false));
        // Relative paths of the base were resolved against its directory.
        assert_eq!(c.boot.kernel, f.kernel);
        assert_eq!(c.boot.initrd, None);
        assert_eq!(c.boot.cmdline, "console=ttyS0 quiet mvm.hostname=derived");
        assert!(matches!(c.console.output, microvm_dev::ConsoleOutput::File(_)));
        let tags: Vec<_> = c.shares.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(tags, ["extra", "project"]);
        assert_eq!(c.shares[0].source, f.dir.join("proj"));
    }

    #[test]
    fn failed_creates_leave_nothing() {
        let f = Fixture::new();
        let cases: Vec<(CreateOptions, i32)> = vec![
            (
                CreateOptions {
                    project: Some(f.dir.join("missing")),
                    ..f.opts("a")
                },
                2,
            ),
            (
                CreateOptions {
                    project: Some(f.kernel.clone()),
                    ..f.opts("a")
                },
                2,
            ),
            (
                CreateOptions {
                    kernel: Some(f.dir.join("nokernel")),
                    ..f.opts("a")
                },
                2,
            ),
            (f.opts("Bad_Name"), 2),
            (f.opts("guest"), 2),
            // Rejected by the VMM's own checks, after the file was written.
            (
                CreateOptions {
                    volumes: vec!["Bad:5".parse().unwrap()],
                    ..f.opts("a")
                },
                2,
            ),
            (
                CreateOptions {
                    cpus: Some(0),
                    ..f.opts("a")
                },
                2,
            ),
            (
                CreateOptions {
                    from: Some(f.dir.join("nobase.toml")),
                    ..f.opts("a")
                },
                2,
            ),
        ];
        for (o, code) in cases {
            let e = f.m.create(&o).unwrap_err();
            assert_eq!(e.exit_code(), code, "{e}");
            assert!(f.entries().is_empty(), "{e}: left {:?}", f.entries());
        }
        f.m.create(&f.opts("a")).unwrap();
        let e = f.m.create(&f.opts("a")).unwrap_err();
        assert!(matches!(e, Error::AlreadyExists { .. }), "{e}");
        assert_eq!(f.entries(), vec!["a".to_string()]);
    }

    #[test]
    fn concurrent_creates_of_one_name_one_wins() {
        let f = Fixture::new();
        let results: Vec<Result<VmInfo>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| f.m.create(&f.opts("race")))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, Error::AlreadyExists { .. })));
        assert_eq!(f.entries(), vec!["race".to_string()]);
    }

    #[test]
    fn list_status_rm() {
        let f = Fixture::new();
        assert!(f.m.list().unwrap().is_empty());
        f.m.create(&f.opts("b")).unwrap();
        f.m.create(&f.opts("a")).unwrap();
        // Not VMs: ignored by list.
        std::fs::create_dir_all(f.m.root().join("guest")).unwrap();
        std::fs::create_dir_all(f.m.root().join("empty")).unwrap();
        let names: Vec<_> = f.m.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(f.m.status("empty"), Err(Error::UnknownVm { .. })));
        assert!(matches!(f.m.status("nope"), Err(e @ Error::UnknownVm { .. }) if e.exit_code() == 2));
        assert!(matches!(f.m.rm("nope", false), Err(Error::UnknownVm { .. })));
        assert!(matches!(f.m.stop("nope", POLL), Err(Error::UnknownVm { .. })));
        assert!(matches!(f.m.status("Bad"), Err(Error::InvalidName { .. })));
        assert_eq!(f.m.stop("a", POLL).unwrap(), StopOutcome::NotRunning);

        // The VM's files go, the project stays.
        std::fs::write(f.m.vm_dir("a").join(CONSOLE_LOG), "boot\n").unwrap();
        std::fs::create_dir_all(f.m.vm_dir("a").join("overlay/project/sub")).unwrap();
        std::os::unix::fs::symlink(&f.project, f.m.vm_dir("a").join("link")).unwrap();
        std::fs::write(f.project.join("keep"), "x").unwrap();
        f.m.rm("a", false).unwrap();
        assert!(!f.m.vm_dir("a").exists());
        assert!(f.project.join("keep").exists());
        let names: Vec<_> = f.m.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["b"]);
        assert!(!f
            .entries()
            .iter()
            .any(|e| e.starts_with(".rm-") || e.starts_with(".tmp-")));
    }

    #[test]
    fn broken_definition() {
        let f = Fixture::new();
        f.m.create(&f.opts("x")).unwrap();
        let file = f.m.vm_dir("x").join(VM_TOML);
        std::fs::write(&file, "version = 1\n[boot\nkernel = 1\n").unwrap();
        let listed = f.m.list().unwrap();
        assert_eq!(listed[0].state, VmState::Broken);
        assert!(listed[0].error.is_some());
        let e = f.m.status("x").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(matches!(&e, Error::Config { path, .. } if *path == file));
        let e = f.m.start("x", &mut StartOptions::default()).unwrap_err();
        assert!(matches!(&e, Error::Config { path, .. } if *path == file), "{e}");
        assert!(!f.pid_file("x").exists());
    }

    fn state_of(f: &Fixture, content: &str) -> VmInfo {
        std::fs::write(f.pid_file("s"), content).unwrap();
        f.m.status("s").unwrap()
    }

    #[test]
    fn running_stopped_crashed_from_the_pid_file() {
        let f = Fixture::new();
        f.m.create(&f.opts("s")).unwrap();
        // Never started.
        let i = f.m.status("s").unwrap();
        assert_eq!((i.state, i.pid, i.last_exit.clone()), (VmState::Stopped, None, None));
        std::fs::write(f.m.vm_dir("s").join(CONSOLE_LOG), "line 1\r\nKernel panic\n").unwrap();

        let i = state_of(&f, "exited 0 100 the guest powered off\n");
        assert_eq!(i.state, VmState::Stopped);
        assert_eq!(i.exited_at, Some(100));
        assert!(i.last_exit.unwrap().contains("powered off"));
        assert!(i.console_tail.is_empty());
        assert_eq!(
            state_of(&f, "exited 3 100 the guest rebooted\n").state,
            VmState::Stopped
        );
        assert_eq!(
            state_of(&f, "exited 143 100 stopped by signal 15\n").state,
            VmState::Stopped
        );
        assert_eq!(
            state_of(&f, "exited 137 100 killed with SIGKILL by mvm stop\n").state,
            VmState::Stopped
        );
        let i = state_of(&f, "exited 4 100 the guest crashed: triple fault\n");
        assert_eq!(i.state, VmState::Crashed);
        assert!(i.last_exit.unwrap().contains("triple fault"));
        assert_eq!(i.console_tail, ["line 1", "Kernel panic"]);
        assert_eq!(state_of(&f, "exited 1 100 KVM failed\n").state, VmState::Crashed);
        // "running" but nobody holds the lock: mvm-vmm was killed.
        let i = state_of(&f, "running 12345 100\n");
        assert_eq!((i.state, i.pid), (VmState::Crashed, None));
        assert!(i.last_exit.unwrap().contains("12345"));

        // A holder of the lock: running.
        let held = pidfile::PidFile::acquire(&f.pid_file("s")).unwrap();
        let i = f.m.status("s").unwrap();
        assert_eq!(i.state, VmState::Running);
        assert_eq!(i.pid, Some(std::process::id()));
        assert!(i.started_at.is_some() && i.uptime_s.is_some());
        // Start sees it running and does nothing.
        assert_eq!(
            f.m.start("s", &mut StartOptions::default()).unwrap(),
            StartOutcome::AlreadyRunning {
                pid: std::process::id()
            }
        );
        // rm refuses without force.
        let e = f.m.rm("s", false).unwrap_err();
        assert!(matches!(e, Error::Running { .. }), "{e}");
        assert!(f.m.vm_dir("s").join(VM_TOML).exists());
        // Its holder went away without writing how it ended: crashed.
        drop(held);
        assert_eq!(f.m.status("s").unwrap().state, VmState::Crashed);
    }

    #[test]
    fn rm_force_stops_the_vmm_with_signals() {
        if Command::new("flock").arg("--version").output().is_err() {
            eprintln!("skipped: no flock(1)");
            return;
        }
        let f = Fixture::new();
        f.m.create(&f.opts("busy")).unwrap();
        let pid_file = f.pid_file("busy");
        // A stand-in for mvm-vmm: holds the lock, says "running <its pid>".
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec 9>>\"$1\"; flock 9; echo \"running $$ 1\" > \"$1\"; exec sleep 60")
            .arg("sh")
            .arg(&pid_file)
            .spawn()
            .unwrap();
        let began = Instant::now();
        while f.m.status("busy").unwrap().pid.is_none() {
            assert!(began.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(f.m.status("busy").unwrap().pid, Some(child.id()));
        assert!(matches!(f.m.rm("busy", false), Err(Error::Running { .. })));
        f.m.rm("busy", true).unwrap();
        assert!(!f.m.vm_dir("busy").exists());
        let status = child.wait().unwrap();
        assert!(!status.success());
    }

    #[test]
    fn mount_under_finds_mounts_below_a_directory() {
        assert_eq!(mount_under(Path::new("/proc")).unwrap(), Some(PathBuf::from("/proc")));
        let f = Fixture::new();
        assert_eq!(mount_under(&f.dir).unwrap(), None);
    }

    #[test]
    fn hostname_goes_last_on_the_command_line() {
        assert_eq!(with_hostname("a mvm.hostname=z b", "n"), "a b mvm.hostname=n");
    }

    #[test]
    fn tails() {
        let f = Fixture::new();
        let p = f.dir.join("log");
        let text: String = (0..30).map(|i| format!("l{i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        assert_eq!(tail_lines(&p, 0, 2), ["l28", "l29"]);
        assert_eq!(tail_lines(&p, text.len() as u64 - 4, 5), ["l29"]);
        assert!(tail_lines(&f.dir.join("none"), 0, 5).is_empty());
    }

    #[test]
    fn services_in_the_definition() {
        use microvm_dev::service::ServiceKind;
        let f = Fixture::new();
        // A free port, then one taken on the host.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let free = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut pg = services::parse_service_arg(&format!("postgresql:{free}:app")).unwrap();
        pg.user = Some("dev".into());
        let mut redis = services::parse_service_arg(&format!("redis:{busy}")).unwrap();
        redis.name = "cache".into();
        let image = f.image(
            services::SERVICES_IMAGE,
            &services::services_image_spec(&[pg.clone(), redis.clone()]).id(),
        );
        let mut o = f.opts("svc");
        o.root = RootChoice::DefaultImage;
        o.services = vec![pg.clone(), redis.clone()];
        o.devenv = Some("/src/app/devenv.nix".into());
        let info = f.m.create(&o).unwrap();
        assert_eq!(info.devenv.as_deref(), Some(Path::new("/src/app/devenv.nix")));
        let text = std::fs::read_to_string(f.m.vm_dir("svc").join(VM_TOML)).unwrap();
        assert!(text.contains("\n[devenv]\nfile = \"/src/app/devenv.nix\"\n"), "{text}");
        assert!(
            text.contains(&format!(
                "[[service]]\nkind = \"postgresql\"\nport = {free}\ndatabases = [\"app\"]\nuser = \"dev\"\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("[[volume]]\nname = \"services\"\nsize_mib = 8192\nmount = \"/var/lib/mvm-services\"\n"),
            "{text}"
        );
        let c = VmConfig::from_file(f.m.vm_dir("svc").join(VM_TOML)).unwrap();
        assert_eq!(c.root.as_ref().unwrap().image, image);
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[1].kind, ServiceKind::Redis);
        // No --memory: room for the two servers on top of the default.
        assert_eq!(c.machine.memory_mib, DEFAULT_MEMORY_MIB + 128 + 32);
        // The free port is kept; the busy one moves up.
        assert_eq!(c.forwards[0].host_port, free);
        assert_eq!(c.forwards[0].guest_port, free);
        assert!(c.forwards[1].host_port > busy, "{:?}", c.forwards);
        assert_eq!(c.forwards[1].guest_port, busy);
        assert_eq!(
            info.services[0].host.as_deref(),
            Some(format!("127.0.0.1:{free}").as_str())
        );
        assert_eq!(info.services[0].state, "stopped");
        assert_eq!(info.services[0].user, "dev");
        let specs = services::service_specs(&c);
        assert_eq!(specs[1].data_dir, "/var/lib/mvm-services/cache");
        // The host's variables (`mvm env`, direnv): through the forwards.
        let env = f.m.host_env("svc").unwrap();
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(
            get("DATABASE_URL"),
            Some(format!("postgres://dev@127.0.0.1:{free}/app"))
        );
        assert_eq!(get("PGUSER").as_deref(), Some("dev"));
        assert_eq!(
            get("REDIS_URL"),
            Some(format!("redis://127.0.0.1:{}", c.forwards[1].host_port))
        );
        // Another VM's forward counts as taken too.
        let mut o = f.opts("svc2");
        o.root = RootChoice::DefaultImage;
        o.services = vec![pg.clone(), redis.clone()];
        f.m.create(&o).unwrap();
        let c2 = VmConfig::from_file(f.m.vm_dir("svc2").join(VM_TOML)).unwrap();
        assert!(c2.forwards[0].host_port > free, "{:?}", c2.forwards);
        drop(taken);

        // No image, or no network: refused, with what to do.
        let mut o = f.opts("bad");
        o.services = vec![pg.clone()];
        let e = f.m.create(&o).unwrap_err().to_string();
        assert!(e.contains("drop --no-image"), "{e}");
        let mut o = f.opts("bad");
        o.root = RootChoice::DefaultImage;
        o.network = NetworkChoice::None;
        o.services = vec![pg];
        let e = f.m.create(&o).unwrap_err().to_string();
        assert!(e.contains("drop --no-network"), "{e}");
        assert!(!f.m.vm_dir("bad").exists());
    }
}
