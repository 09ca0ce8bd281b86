//! The VMM's control socket, `control.sock` in the state directory of
//! every VM that has one: how `mvm` talks to a running VMM.
//!
//! One connection at a time, one request line each:
//!
//! ```text
//! reload-forwards   re-read forwards.toml (see crate::network); the answer
//!                   is one "error: <message>" line per forward that could
//!                   not be set up, then "ok"
//! freeze-shares     take the lock of every share served in this process
//!                   and answer "ok": no guest request runs until the
//!                   connection closes (or stays idle FREEZE_IDLE). While
//!                   frozen the same connection takes "refresh-shares":
//!                   re-read which layer holds each file the guest knows,
//!                   after the upper layer was changed underneath ("ok")
//! ```
//!
//! Any other line gets "error: unknown request ...". `mvm diff`, `apply`
//! and `reset` freeze the shares for their duration, so they see (and
//! change) the upper layer between two guest requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mvm_storage::fs::overlay::Overlay;

use crate::devices::LiveShare;
use crate::network::{pause, spawn, ForwardReload};
use crate::{Error, Result};
use mvm_devices::ThreadStart;

/// The VMM's control socket, in the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The request that makes the VMM re-read the run-time forwards.
pub const RELOAD_FORWARDS: &str = "reload-forwards";
/// Hold the in-process shares still while the connection stays open.
pub const FREEZE_SHARES: &str = "freeze-shares";
/// While frozen: re-read the layers of the shares' known files.
pub const REFRESH_SHARES: &str = "refresh-shares";
/// A frozen connection silent this long is closed and the shares go on:
/// a stuck client must not stop the guest's file access for good.
const FREEZE_IDLE: Duration = Duration::from_secs(600);
/// How long a client waits for an answer (a freeze waits for the guest
/// request in progress, which may be a large copy-up).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

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
    Err(eof())
}

fn eof() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the VMM closed the control socket without an answer",
    )
}

/// The shares of the VM in `dir`, held still while this lives.
pub struct FrozenShares {
    reader: BufReader<UnixStream>,
}

impl FrozenShares {
    /// Freeze the in-process shares of the running VM in `dir`.
    pub fn freeze(dir: &Path) -> std::io::Result<FrozenShares> {
        let stream = UnixStream::connect(dir.join(CONTROL_SOCKET))?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        let mut frozen = FrozenShares {
            reader: BufReader::new(stream),
        };
        frozen.request(FREEZE_SHARES)?;
        Ok(frozen)
    }

    /// Have the VMM re-read which layer holds the files the guest knows
    /// (after the upper layer was changed).
    pub fn refresh(&mut self) -> std::io::Result<()> {
        self.request(REFRESH_SHARES)
    }

    fn request(&mut self, line: &str) -> std::io::Result<()> {
        self.reader.get_mut().write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(eof());
        }
        match answer.trim_end() {
            "ok" => Ok(()),
            other => Err(std::io::Error::other(
                other.strip_prefix("error: ").unwrap_or(other).to_string(),
            )),
        }
    }
}

/// The control socket's thread; dropping it stops the thread and removes
/// the socket.
pub(crate) struct Control {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
}

struct Served {
    forwards: Option<ForwardReload>,
    shares: Vec<LiveShare>,
}

/// Start the control socket in `state_dir`.
pub(crate) fn start(
    state_dir: &Path,
    forwards: Option<ForwardReload>,
    shares: Vec<LiveShare>,
    confine: ThreadStart,
) -> Result<Control> {
    let socket = state_dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(Error::host(format!("binding {}", socket.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::host(format!("setting up {}", socket.display())))?;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Served { forwards, shares };
    let thread = {
        let stop = stop.clone();
        spawn("mvm-control", confine, move || serve(&listener, &stop, &served))?
    };
    Ok(Control {
        stop,
        thread: Some(thread),
        socket,
    })
}

fn serve(listener: &UnixListener, stop: &AtomicBool, served: &Served) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, stop, served) {
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

/// One request line, at most 256 bytes (more is not ours); None at EOF.
fn read_request(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if reader.by_ref().take(256).read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end().to_string()))
}

fn answer(stream: UnixStream, stop: &AtomicBool, served: &Served) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(&stream);
    let mut out = &stream;
    let Some(request) = read_request(&mut reader)? else {
        return Ok(());
    };
    match request.as_str() {
        RELOAD_FORWARDS => {
            let errors = match &served.forwards {
                Some(f) => f.reload(),
                None => vec!["this VM has no NIC on a managed network, so no forwards".into()],
            };
            for e in errors {
                writeln!(out, "error: {}", e.replace('\n', " "))?;
            }
            writeln!(out, "ok")
        }
        FREEZE_SHARES => {
            let mut held = Vec::new();
            for share in &served.shares {
                match share.fs.lock() {
                    Ok(guard) => held.push(guard),
                    Err(_) => return writeln!(out, "error: share {} failed earlier", share.tag),
                }
            }
            writeln!(out, "ok")?;
            frozen(&mut reader, out, stop, &mut held)
        }
        other => writeln!(out, "error: unknown request {other:?}"),
    }
}

/// Serves a frozen connection until it closes, goes idle or the VMM stops.
fn frozen(
    reader: &mut BufReader<&UnixStream>,
    mut out: &UnixStream,
    stop: &AtomicBool,
    held: &mut [MutexGuard<'_, Overlay>],
) -> std::io::Result<()> {
    reader.get_ref().set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) && last.elapsed() < FREEZE_IDLE {
        match read_request(reader) {
            Ok(None) => return Ok(()),
            Ok(Some(line)) if line == REFRESH_SHARES => {
                held.iter_mut().for_each(|fs| fs.refresh_layers());
                writeln!(out, "ok")?;
                last = Instant::now();
            }
            Ok(Some(line)) => {
                writeln!(out, "error: unknown request {line:?} while frozen")?;
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    log::warn!("control socket: a freeze of the shares ended without its client closing it");
    Ok(())
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_storage::fs::overlay::OverlayOptions;
    use std::sync::Mutex;

    #[test]
    fn freeze_holds_the_shares_until_closed() {
        let dir = std::env::temp_dir().join(format!("mvm-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (lower, upper) = (dir.join("lower"), dir.join("upper"));
        std::fs::create_dir_all(&lower).unwrap();
        std::fs::create_dir_all(&upper).unwrap();
        let fs = Arc::new(Mutex::new(
            Overlay::new(Some(&lower), &upper, OverlayOptions::default()).unwrap(),
        ));
        let share = LiveShare {
            tag: "project".into(),
            fs: fs.clone(),
        };
        let control = start(&dir, None, vec![share], None).unwrap();
        // Without a managed network there are no forwards to reload.
        let errors = request_reload(&dir).unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let mut frozen = FrozenShares::freeze(&dir).unwrap();
        assert!(fs.try_lock().is_err(), "the share is held");
        frozen.refresh().unwrap();
        assert!(fs.try_lock().is_err());
        drop(frozen);
        assert!(
            (0..50).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                fs.try_lock().is_ok()
            }),
            "released on close"
        );
        // Unknown requests are answered, the socket goes with the VMM.
        let mut s = UnixStream::connect(dir.join(CONTROL_SOCKET)).unwrap();
        s.write_all(b"nonsense\n").unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        assert!(answer.starts_with("error: unknown request"), "{answer}");
        drop(control);
        assert!(!dir.join(CONTROL_SOCKET).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
