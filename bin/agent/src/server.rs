//! The listener and the per-connection protocol: handshake, one request.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::{self, Info, Message, PowerAction, AGENT_PORT, VERSION};
use crate::session::{self, Context};
use crate::{echo, mounts, power, say, sys};

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Vsock(u32),
    /// Host tests: no init duties, no power.
    Unix(PathBuf),
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub listen: Listen,
}

pub const USAGE: &str = "usage: mvm-agent [--listen vsock:<port> | --listen unix:<path>]\n\
    The microvm-dev guest agent: normally the guest's PID 1, serving the host on vsock port 1024.\n\
    --listen unix:<path>  serve on a Unix socket instead (for tests: no init duties, no power off)\n\
    --listen vsock:<port> serve on another vsock port\n";

/// What the command line asks for: run, or print something and exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Args),
    Print(String),
}

pub fn parse_args(args: &[OsString]) -> Result<Command, String> {
    let mut listen = Listen::Vsock(AGENT_PORT);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--help" | "-h") => return Ok(Command::Print(USAGE.into())),
            Some("--version" | "-V") => return Ok(Command::Print(format!("{}\n", software()))),
            Some("--listen") => {
                let value = it.next().ok_or("--listen needs a value")?;
                listen = parse_listen(value.to_str().ok_or("--listen: not UTF-8")?)?;
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Command::Run(Args { listen }))
}

fn parse_listen(value: &str) -> Result<Listen, String> {
    if let Some(port) = value.strip_prefix("vsock:") {
        return port
            .parse()
            .map(Listen::Vsock)
            .map_err(|_| format!("--listen: bad vsock port {port:?}"));
    }
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("--listen unix: needs a path".into());
        }
        return Ok(Listen::Unix(path.into()));
    }
    Err(format!("--listen {value:?}: expected vsock:<port> or unix:<path>"))
}

/// Our `Hello` software string.
pub fn software() -> String {
    format!("mvm-agent {}", env!("CARGO_PKG_VERSION"))
}

pub enum Listener {
    Vsock(OwnedFd),
    Unix(UnixListener),
}

impl Listener {
    pub fn bind(listen: &Listen) -> io::Result<Listener> {
        match listen {
            Listen::Unix(path) => {
                // A socket left by an earlier run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(path);
                }
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
            Listen::Vsock(port) => bind_vsock(*port).map(Listener::Vsock),
        }
    }

    /// The next connection, as a plain fd-backed stream.
    pub fn accept(&self) -> io::Result<File> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
            Listener::Vsock(fd) => {
                // SAFETY: NULL address pointers are allowed.
                let conn = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                let conn = sys::cvt(conn)?;
                // SAFETY: a fresh fd only we own.
                Ok(File::from(unsafe { OwnedFd::from_raw_fd(conn) }))
            }
        }
    }
}

fn bind_vsock(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket call.
    let fd = sys::cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd only we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: the address pointer and length describe `addr`.
    sys::cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: no memory arguments.
    sys::cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
    Ok(fd)
}

/// Accept connections forever, each in its own thread.
pub fn serve(listener: &Listener, ctx: Arc<Context>) -> ! {
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                say!("accept failed: {e}");
                // EMFILE and the like: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let ctx = Arc::clone(&ctx);
        let spawned = std::thread::Builder::new().name("connection".into()).spawn(move || {
            // A bug in one connection ends that connection only.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| connection(&ctx, conn)));
            if result.is_err() {
                say!("a connection thread panicked (the connection was dropped)");
            }
        });
        if let Err(e) = spawned {
            say!("cannot start a connection thread: {e}");
        }
    }
}

/// How long a connection may take to send its `Hello` and request: a
/// peer that connects and says nothing must not hold a thread forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Limit (or with `None`, stop limiting) how long a read on `conn` blocks.
fn set_read_timeout(conn: &File, timeout: Option<Duration>) {
    let t = timeout.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(t.subsec_micros()),
    };
    // SAFETY: setsockopt with a valid timeval of the right size; on a
    // descriptor that is not a socket it fails harmlessly (ENOTSOCK).
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
}

/// Handshake, then one request.
pub fn connection(ctx: &Context, mut conn: File) {
    set_read_timeout(&conn, Some(REQUEST_TIMEOUT));
    if let Some(action) = exchange(ctx, &mut conn) {
        power(ctx, conn, action);
    } else {
        close_gracefully(conn, LINGER);
    }
}

/// How long a closing connection waits for the host to close its side.
const LINGER: Duration = Duration::from_secs(1);

/// Handshake and request; returns the power action to take, if that was
/// the request.
fn exchange(ctx: &Context, conn: &mut File) -> Option<PowerAction> {
    match proto::read_message(conn) {
        Ok(Message::Hello { version, .. }) if version == VERSION => {}
        Ok(Message::Hello { version, .. }) => return refuse(conn, proto::Error::Version(version)),
        Ok(other) => {
            return refuse(
                conn,
                proto::Error::Unexpected {
                    expected: "Hello",
                    got: other.name(),
                },
            )
        }
        Err(proto::Error::Closed) => return None,
        Err(e) => return refuse(conn, e),
    }
    let hello = Message::Hello {
        version: VERSION,
        software: software(),
    };
    if proto::write_message(conn, &hello).is_err() {
        return None;
    }
    let request = match proto::read_message(conn) {
        Ok(r) => r,
        Err(proto::Error::Closed) => return None,
        Err(e) => return refuse(conn, e),
    };
    // The request is in; an exec session may wait on input for hours.
    set_read_timeout(conn, None);
    let start = Instant::now();
    let reply = match request {
        Message::Info => Message::InfoReply(info()),
        Message::SetClock { unix_ns } => match sys::set_realtime(unix_ns) {
            Ok(()) => Message::Ok,
            Err(e) => Message::Error(format!("cannot set the clock: {}", sys::error_text(&e))),
        },
        Message::Power(action) => return Some(action),
        Message::Services(specs) => {
            let services = crate::services::registry();
            if ctx.init {
                crate::services::save(&specs, std::path::Path::new(crate::services::SAVED));
            }
            services.ensure(&ctx.reaper, specs);
            Message::ServicesReply(services.states())
        }
        Message::FsEvents { tag, changes } => {
            fs_events(ctx, conn, tag, changes);
            return None;
        }
        Message::Exec(req) => {
            if let Err(e) = session::run(ctx, conn, req, start) {
                say!("exec session ended: {e}");
            }
            return None;
        }
        other => Message::Error(format!(
            "expected a request (Info, Exec, Power, SetClock, FsEvents or Services), got {}",
            other.name()
        )),
    };
    let _ = proto::write_message(conn, &reply);
    None
}

/// Answer a protocol error (the connection is then closed).
/// Replays batches of host changes for as long as the host sends them on
/// this connection (one connection per watched VM, kept open).
fn fs_events(ctx: &Context, conn: &mut File, mut tag: String, mut changes: Vec<proto::FsChange>) {
    loop {
        let reply = match echo::replay(&ctx.config, &tag, &changes) {
            Ok(_) => Message::Ok,
            Err(e) => Message::Error(e),
        };
        if proto::write_message(conn, &reply).is_err() {
            return;
        }
        match proto::read_message(conn) {
            Ok(Message::FsEvents { tag: t, changes: c }) => (tag, changes) = (t, c),
            Ok(other) => {
                let _ = proto::write_message(
                    conn,
                    &Message::Error(format!("expected FsEvents, got {}", other.name())),
                );
                return;
            }
            Err(proto::Error::Closed) => return,
            Err(e) => {
                refuse(conn, e);
                return;
            }
        }
    }
}

fn refuse(conn: &mut File, e: proto::Error) -> Option<PowerAction> {
    if !matches!(e, proto::Error::Io(_) | proto::Error::ShortFrame) {
        say!("refusing a connection: {e}");
        let _ = proto::write_message(conn, &Message::Error(e.to_string()));
    }
    None
}

/// Close after our last frame without losing it: closing a socket with
/// unread input resets the connection, and a reset may overtake (and
/// discard) what we sent. So: end our side, then discard what the host
/// still sends until it closes too, for at most `linger`.
pub fn close_gracefully(conn: File, linger: Duration) {
    // SAFETY: no memory arguments.
    unsafe { libc::shutdown(conn.as_raw_fd(), libc::SHUT_WR) };
    let deadline = Instant::now() + linger;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut fds = [sys::pollfd(conn.as_raw_fd(), libc::POLLIN)];
        match sys::poll(&mut fds, Some(left)) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match sys::read(&conn, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

pub fn info() -> Info {
    Info {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname: sys::hostname(),
        uptime_ms: (sys::clock_ns(libc::CLOCK_BOOTTIME) / 1_000_000).max(0) as u64,
        clock_unix_ns: sys::clock_ns(libc::CLOCK_REALTIME),
        pid: std::process::id(),
        mounts: mounts::current(),
    }
}

fn power(ctx: &Context, mut conn: File, action: PowerAction) {
    if !ctx.init {
        let _ = proto::write_message(
            &mut conn,
            &Message::Error("not init: refusing to power off the host".into()),
        );
        return close_gracefully(conn, LINGER);
    }
    let _ = proto::write_message(&mut conn, &Message::Ok);
    // Let the host read the reply (and close) before the guest goes away;
    // a host that keeps the connection open delays the poweroff a little.
    close_gracefully(conn, Duration::from_millis(200));
    power::shut_down(action);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn command_line() {
        assert_eq!(
            parse_args(&[]).unwrap(),
            Command::Run(Args {
                listen: Listen::Vsock(1024)
            })
        );
        assert_eq!(
            parse_args(&args(&["--listen", "vsock:5000"])).unwrap(),
            Command::Run(Args {
                listen: Listen::Vsock(5000)
            })
        );
        assert_eq!(
            parse_args(&args(&["--listen", "unix:/tmp/a.sock"])).unwrap(),
            Command::Run(Args {
                listen: Listen::Unix("/tmp/a.sock".into())
            })
        );
        assert!(matches!(parse_args(&args(&["--help"])).unwrap(), Command::Print(_)));
        for bad in [
            &["--listen"][..],
            &["--listen", "tcp:1"],
            &["--listen", "vsock:x"],
            &["--listen", "unix:"],
            &["-x"],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
