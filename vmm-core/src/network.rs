//! A running VM's part in its managed network, beyond the NIC itself: the
//! port forwards (a userspace proxy in this process), the control socket
//! through which `mvm port` changes them at run time, and the watch on the
//! network's dnsmasq (restarted if it dies).
//!
//! Files in the state directory:
//!
//! ```text
//! forwards.toml   [[forward]] tables added at run time (`mvm port`), kept
//!                 across restarts; same keys as vm.toml's [[forward]]
//! control.sock    one request per connection: the line "reload-forwards";
//!                 the answer is "ok" or one "error: <message>" line per
//!                 forward that could not be set up
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mvm_net::forward::{ForwardSpec, Forwarder};
use mvm_net::host::network::{Attachment, Network};

use crate::config::{parse_forwards, FileForward, ForwardConfig, VmConfig};
use crate::{Error, Result};

/// Run-time forwards, in the state directory.
pub const FORWARDS_FILE: &str = "forwards.toml";
/// The VMM's control socket, in the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The request that makes the VMM re-read [`FORWARDS_FILE`].
pub const RELOAD_FORWARDS: &str = "reload-forwards";
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

/// Ask the VMM of the VM in `dir` to re-read its run-time forwards; the
/// errors it reports, one per forward it could not set up.
pub fn request_reload(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut stream = UnixStream::connect(dir.join(CONTROL_SOCKET))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{RELOAD_FORWARDS}\n").as_bytes())?;
    let mut errors = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line == "ok" {
            return Ok(errors);
        }
        errors.push(line.strip_prefix("error: ").unwrap_or(&line).to_string());
    }
    // No "ok": the VMM went away mid-request; nothing says it applied them.
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the VMM closed the control socket without an answer",
    ))
}

/// The network side of a running VM; dropping it stops the forwards and
/// the threads.
pub(crate) struct Networking {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    _forwarder: Arc<Mutex<Forwarder>>,
    socket: PathBuf,
}

/// Every forward of the VM: vm.toml's, then the run-time ones.
fn wanted(declared: &[ForwardConfig], dir: &Path) -> Result<Vec<ForwardSpec>> {
    let runtime = read_runtime_forwards(dir)?;
    Ok(declared.iter().chain(&runtime).map(ForwardConfig::spec).collect())
}

/// Start the forwards and the control socket for a VM with managed NICs
/// (`attachments`, in NIC order); the forwards go to the first one's
/// address. Fails if a forward cannot listen.
pub(crate) fn start(config: &VmConfig, state_dir: &Path, attachments: &[Attachment]) -> Result<Option<Networking>> {
    let Some(first) = attachments.first() else {
        return Ok(None);
    };
    let mut forwarder = Forwarder::new(IpAddr::V4(first.ip()));
    // set(), not add(): it refuses one host port forwarded twice.
    if let Some((_, e)) = forwarder.set(&wanted(&config.forwards, state_dir)?).into_iter().next() {
        return Err(e.into());
    }
    let forwarder = Arc::new(Mutex::new(forwarder));
    let stop = Arc::new(AtomicBool::new(false));
    let socket = state_dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(Error::host(format!("binding {}", socket.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::host(format!("setting up {}", socket.display())))?;
    let mut threads = Vec::new();
    {
        let (stop, forwarder) = (stop.clone(), forwarder.clone());
        let declared = config.forwards.clone();
        let dir = state_dir.to_path_buf();
        threads.push(spawn("mvm-control", move || {
            serve_control(&listener, &stop, &forwarder, &declared, &dir)
        })?);
    }
    let networks: Vec<Network> = attachments.iter().map(|a| a.network().clone()).collect();
    {
        let stop = stop.clone();
        threads.push(spawn("mvm-net-watch", move || supervise(&networks, &stop))?);
    }
    Ok(Some(Networking {
        stop,
        threads,
        _forwarder: forwarder,
        socket,
    }))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(Error::host(format!("starting thread {name}")))
}

/// Sleep in short steps, so that a stop is seen at once; false if stopped.
fn pause(stop: &AtomicBool, total: Duration) -> bool {
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

fn serve_control(
    listener: &UnixListener,
    stop: &AtomicBool,
    forwarder: &Mutex<Forwarder>,
    declared: &[ForwardConfig],
    dir: &Path,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, forwarder, declared, dir) {
                    log::warn!("control socket: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                pause(stop, Duration::from_millis(100));
            }
            Err(e) => {
                log::warn!("control socket: {e}");
                pause(stop, Duration::from_millis(100));
            }
        }
    }
}

fn answer(
    stream: UnixStream,
    forwarder: &Mutex<Forwarder>,
    declared: &[ForwardConfig],
    dir: &Path,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    // A request is one short line; more is not ours.
    BufReader::new(std::io::Read::take(&stream, 256)).read_line(&mut line)?;
    let mut out = &stream;
    if line.trim_end() != RELOAD_FORWARDS {
        return writeln!(out, "error: unknown request {:?}", line.trim_end());
    }
    let errors: Vec<String> = match wanted(declared, dir) {
        Ok(specs) => match forwarder.lock() {
            Ok(mut f) => f.set(&specs).into_iter().map(|(_, e)| e.to_string()).collect(),
            Err(_) => vec!["the forwarder failed earlier".into()],
        },
        Err(e) => vec![e.to_string()],
    };
    for e in errors {
        writeln!(out, "error: {}", e.replace('\n', " "))?;
    }
    writeln!(out, "ok")
}

fn supervise(networks: &[Network], stop: &AtomicBool) {
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
        let _ = std::fs::remove_file(&self.socket);
    }
}
