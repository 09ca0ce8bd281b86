//! A running VM's part in its managed network, beyond the NIC itself: the
//! port forwards (a userspace proxy in this process), which `mvm port`
//! changes at run time through the control socket ([`crate::control`]),
//! and the watch on the network's dnsmasq (restarted if it dies).
//!
//! Files in the state directory:
//!
//! ```text
//! forwards.toml   [[forward]] tables added at run time (`mvm port`), kept
//!                 across restarts; same keys as vm.toml's [[forward]]
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mvm_net::forward::{ForwardSpec, Forwarder};
use mvm_net::host::network::Network;

use mvm_devices::ThreadStart;

use crate::config::{parse_forwards, FileForward, ForwardConfig, VmConfig};
use crate::seccomp::{thread_start, Filters, ThreadKind};
use crate::{Error, Result};

/// Run-time forwards, in the state directory.
pub const FORWARDS_FILE: &str = "forwards.toml";
pub use crate::control::{request_reload, CONTROL_SOCKET, RELOAD_FORWARDS};
const SUPERVISE_EVERY: Duration = Duration::from_secs(2);

#[derive(serde::Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ForwardsFile {
    #[serde(default)]
    pub forward: Vec<FileForward>,
}

/// Read the run-time forwards of the VM whose state directory is `dir`
/// (none if the file does not exist).
pub fn read_runtime_forwards(dir: &Path) -> Result<Vec<ForwardConfig>> {
    let path = dir.join(FORWARDS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::ConfigRead { path, source: e }),
    };
    let file: ForwardsFile = toml::from_str(&text).map_err(|e| Error::ConfigSyntax {
        location: path.display().to_string(),
        message: e.message().trim().to_string(),
    })?;
    parse_forwards(file.forward)
}

/// The network side of a running VM; dropping it stops the forwards and
/// the threads.
pub(crate) struct Networking {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    reload: ForwardReload,
}

/// What the control socket needs to re-read the run-time forwards.
#[derive(Clone)]
pub(crate) struct ForwardReload {
    forwarder: Arc<Mutex<Forwarder>>,
    declared: Vec<ForwardConfig>,
    dir: PathBuf,
}

impl ForwardReload {
    /// Sets the forwards to vm.toml's and the run-time ones; the errors,
    /// one per forward that could not be set up.
    pub(crate) fn reload(&self) -> Vec<String> {
        match wanted(&self.declared, &self.dir) {
            Ok(specs) => match self.forwarder.lock() {
                Ok(mut f) => f.set(&specs).into_iter().map(|(_, e)| e.to_string()).collect(),
                Err(_) => vec!["the forwarder failed earlier".into()],
            },
            Err(e) => vec![e.to_string()],
        }
    }
}

impl Networking {
    pub(crate) fn reload_handle(&self) -> ForwardReload {
        self.reload.clone()
    }
}

/// Every forward of the VM: vm.toml's, then the run-time ones.
fn wanted(declared: &[ForwardConfig], dir: &Path) -> Result<Vec<ForwardSpec>> {
    let runtime = read_runtime_forwards(dir)?;
    Ok(declared.iter().chain(&runtime).map(ForwardConfig::spec).collect())
}

/// Start the forwards for a VM with managed NICs
/// (`attachments`, in NIC order); the forwards go to the first one's
/// address. Fails if a forward cannot listen.
pub(crate) fn start(
    config: &VmConfig,
    state_dir: &Path,
    nics: &crate::devices::Nics,
    filters: Option<&Filters>,
) -> Result<Option<Networking>> {
    let Some(first_ip) = nics.first_ip else {
        return Ok(None);
    };
    let mut forwarder = Forwarder::new(IpAddr::V4(first_ip));
    forwarder.set_thread_start(thread_start(filters, ThreadKind::Worker));
    // set(), not add(): it refuses one host port forwarded twice.
    if let Some((_, e)) = forwarder.set(&wanted(&config.forwards, state_dir)?).into_iter().next() {
        return Err(e.into());
    }
    let forwarder = Arc::new(Mutex::new(forwarder));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Networks attached by another (privileged) process are kept by it.
    let networks: Vec<Network> = nics.attachments.iter().map(|a| a.network().clone()).collect();
    if !networks.is_empty() {
        let stop = stop.clone();
        // It starts dnsmasq again when it died: the one thread allowed to
        // start a program.
        let confine = thread_start(filters, ThreadKind::Supervisor);
        threads.push(spawn("mvm-net-watch", confine, move || supervise(&networks, &stop))?);
    }
    Ok(Some(Networking {
        stop,
        threads,
        reload: ForwardReload {
            forwarder,
            declared: config.forwards.clone(),
            dir: state_dir.to_path_buf(),
        },
    }))
}

/// Start thread `name`, which runs `confine` before `f`.
pub fn spawn(name: &str, confine: ThreadStart, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            mvm_devices::run_thread_start(&confine);
            f()
        })
        .map_err(Error::host(format!("starting thread {name}")))
}

/// Sleep in short steps, so that a stop is seen at once; false if stopped.
pub(crate) fn pause(stop: &AtomicBool, total: Duration) -> bool {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < total {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(step);
        waited += step;
    }
    !stop.load(Ordering::Relaxed)
}

/// Keep `networks` whole until `stop`: every 2 s, dnsmasq restarted if it
/// died and the nftables rules put back (see [`Network::supervise`]).
pub fn supervise(networks: &[Network], stop: &AtomicBool) {
    while pause(stop, SUPERVISE_EVERY) {
        for net in networks {
            match net.supervise() {
                Ok(true) => log::warn!("network {}: dnsmasq had stopped; restarted it", net.name()),
                Ok(false) => {}
                Err(e) => log::warn!("network {}: cannot restart dnsmasq: {e}", net.name()),
            }
        }
    }
}

impl Drop for Networking {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
