//! The host-agent protocol: framed messages over one vsock stream.
//!
//! Both ends use this module: `mvm` (host) and `mvm-agent` (guest). The
//! wire format is specified in `docs/agent-protocol.md`; in short:
//!
//! ```text
//! frame   = length:u32le kind:u8 body        length counts kind + body
//! integer = little-endian, fixed width
//! bytes   = len:u32le data                    (strings: UTF-8 bytes)
//! option  = 0:u8 | 1:u8 value
//! list    = count:u32le item...
//! ```
//!
//! Every connection starts with a [`Message::Hello`] from each side; a peer
//! that speaks another [`VERSION`] is answered with [`Message::Error`] and
//! closed. One connection carries one request: `Info`, `Power`, `SetClock`
//! (answered by one frame), or `Exec` (answered by `Started`, output
//! frames and `Exited`, while the host sends `Stdin`, `Resize`, `Signal`).
//!
//! The decoder trusts nothing: lengths are bounded ([`MAX_FRAME`]), every
//! field is checked, trailing bytes and unknown kinds are errors. It never
//! panics, whatever the input (fuzzed by `fuzz/fuzz_targets/agent_frames.rs`).

use std::fmt;
use std::io::{self, Read, Write};

/// Protocol version; both ends must speak the same.
pub const VERSION: u16 = 2;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// Largest frame body (kind byte included) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// Largest data chunk a sender puts in one `Stdin`/`Stdout`/`Stderr`
/// frame; larger writes are split.
pub const MAX_CHUNK: usize = 64 << 10;

/// Protocol errors: what was wrong with a frame, for the error reply and
/// the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("empty frame (a frame holds at least its kind byte)")]
    EmptyFrame,
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("message {kind} is truncated: {field} is missing")]
    Truncated { kind: &'static str, field: &'static str },
    #[error("message {1} has {0} unexpected trailing bytes")]
    Trailing(usize, &'static str),
    #[error("message {kind}: {field} has invalid value {value}")]
    BadValue {
        kind: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("message {kind}: {field} is not UTF-8")]
    NotUtf8 { kind: &'static str, field: &'static str },
    #[error("message {kind}: {field} contains a NUL byte")]
    Nul { kind: &'static str, field: &'static str },
    #[error("peer speaks protocol version {0}, this side speaks {VERSION}")]
    Version(u16),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("connection closed in the middle of a frame")]
    ShortFrame,
    #[error("connection closed by the peer")]
    Closed,
    #[error("the peer reported: {0}")]
    Remote(String),
    #[error("{0}")]
    Handshake(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// What to do with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Poweroff,
    Reboot,
}

/// Terminal settings of an `Exec` with a PTY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tty {
    pub rows: u16,
    pub cols: u16,
    /// `TERM` for the program (the host's, usually).
    pub term: String,
}

/// Run a program in the guest. Its `Debug` shows environment names
/// only: values may be secrets passed through from the host.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments, looked up in `PATH`. Empty: the user's
    /// login shell (from /etc/passwd, else /bin/sh), started as a login
    /// shell.
    pub argv: Vec<Vec<u8>>,
    /// Added to (or replacing in) the agent's default environment.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory; `None`: the VM's project mount if it has one,
    /// else the user's home.
    pub cwd: Option<Vec<u8>>,
    /// A PTY for stdin/stdout/stderr (output then comes as `Stdout` only).
    pub tty: Option<Tty>,
    /// Who runs it: a user of the guest's /etc/passwd (ids, supplementary
    /// groups, home, shell); `None`: root. The last field, absent when
    /// `None`, so that agents and hosts that predate it still understand
    /// each other's root requests.
    pub user: Option<String>,
}

impl fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let env: Vec<String> = self.env.iter().map(|(k, _)| format!("{}=…", lossy(k))).collect();
        f.debug_struct("ExecRequest")
            .field("argv", &self.argv.iter().map(|a| lossy(a)).collect::<Vec<_>>())
            .field("env", &env)
            .field("cwd", &self.cwd.as_deref().map(lossy))
            .field("tty", &self.tty)
            .field("user", &self.user)
            .finish()
    }
}

/// How a program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the status, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// A mounted file system in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub target: String,
    pub fstype: String,
}

/// The agent's answer to `Info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// `mvm-agent` package version.
    pub agent_version: String,
    pub hostname: String,
    /// Guest uptime (CLOCK_BOOTTIME) in milliseconds.
    pub uptime_ms: u64,
    /// Guest wall clock (CLOCK_REALTIME), nanoseconds since the epoch.
    pub clock_unix_ns: i64,
    /// The agent's own process id (1 when it is init).
    pub pid: u32,
    pub mounts: Vec<Mount>,
}

/// Marker fsgids of the agent's replays of `FsEvents` (see echo.rs): the
/// VMM's file server answers these from the state the host already made
/// and never changes a layer for them. The same values as
/// `mvm_storage::fs::overlay::ECHO_GID_*` (checked by a test in vmm-core).
pub const ECHO_GID_MODIFY: u32 = 0x6d76_6d00;
pub const ECHO_GID_ENTRY: u32 = 0x6d76_6d01;
pub const ECHO_GID_DIR: u32 = 0x6d76_6d02;

/// The type of an entry that arrived in a share's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// FIFO or socket.
    Other,
}

/// A change the host made to a share's source (the overlay's lower layer),
/// for the agent to replay so that the guest's file watchers see it.
/// Paths are relative to the share's root: components separated by `/`,
/// none empty, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsChange {
    /// A new entry (created, or moved in from outside the share).
    Arrive { path: Vec<u8>, kind: EntryKind },
    /// An entry is gone (deleted, or moved out of the share).
    Leave { path: Vec<u8>, dir: bool },
    /// Renamed within the share.
    Move { from: Vec<u8>, to: Vec<u8>, dir: bool },
    /// A file's content changed; `size` is its new size.
    Modify { path: Vec<u8>, size: u64 },
    /// Mode, owner or times changed; `mode` is the new permission bits.
    Attrib { path: Vec<u8>, mode: u32 },
}

/// A server the agent runs from the guest's packages (`Services`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `postgresql`, `redis` or `mariadb`.
    pub kind: String,
    /// Unique among the VM's services.
    pub name: String,
    pub port: u16,
    /// Databases made at the first start.
    pub databases: Vec<String>,
    /// The role the host connects as.
    pub user: String,
    pub password: Option<String>,
    /// SQL run once after the databases are made.
    pub initial_script: Option<String>,
    /// Where its data lives (on a persistent volume).
    pub data_dir: String,
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceRun {
    /// Being set up or started (or waiting to be restarted).
    Starting,
    /// Accepting connections on its port.
    Running,
    /// Gave up, or cannot run at all; `detail` says why.
    Failed,
}

impl ServiceRun {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceRun::Starting => "starting",
            ServiceRun::Running => "running",
            ServiceRun::Failed => "failed",
        }
    }
}

/// One service's state, as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    pub name: String,
    pub kind: String,
    pub port: u16,
    pub run: ServiceRun,
    /// The server's version (`15` for PostgreSQL 15), when known.
    pub version: String,
    /// Why it failed or restarts, or empty.
    pub detail: String,
    /// How often it was restarted after dying.
    pub restarts: u32,
}

/// One frame's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame of each side: protocol version and software name.
    Hello {
        version: u16,
        software: String,
    },
    /// Host: what is the guest's state? Answer: `InfoReply`.
    Info,
    InfoReply(Info),
    /// Host: run a program. Answer: `Started`, or `Error` if it could not
    /// be started at all.
    Exec(ExecRequest),
    /// Agent: the program runs with this guest pid.
    Started {
        pid: u32,
    },
    /// Host: input for the program.
    Stdin(Vec<u8>),
    /// Host: no more input (the program's stdin is closed).
    StdinEof,
    /// Host: the terminal's new size (PTY sessions).
    Resize {
        rows: u16,
        cols: u16,
    },
    /// Host: deliver this signal to the program (its process group).
    Signal(i32),
    /// Agent: output of the program.
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Agent: the program ended; all its output was sent before this.
    /// `elapsed_us` is the guest-side time from `Exec` to the exit.
    Exited {
        status: ExitStatus,
        elapsed_us: u64,
    },
    /// Host: power the guest off or reboot it. Answer: `Ok`, then the
    /// guest goes down.
    Power(PowerAction),
    /// Host: set the guest wall clock. Answer: `Ok`.
    SetClock {
        unix_ns: i64,
    },
    /// Host: changes to the source of share `tag`, in the order they
    /// happened. Answer: `Ok` once they are replayed (one that no longer
    /// applies is skipped); the connection then takes the next `FsEvents`.
    FsEvents {
        tag: String,
        changes: Vec<FsChange>,
    },
    /// Host: run these services (those not running yet; an empty list
    /// only asks). Answer: `ServicesReply`.
    Services(Vec<ServiceSpec>),
    /// Agent: every service's state.
    ServicesReply(Vec<ServiceState>),
    /// Success without data.
    Ok,
    /// The request failed, or a frame could not be understood.
    Error(String),
}

const K_HELLO: u8 = 0x01;
const K_INFO: u8 = 0x02;
const K_INFO_REPLY: u8 = 0x03;
const K_EXEC: u8 = 0x10;
const K_STARTED: u8 = 0x11;
const K_STDIN: u8 = 0x12;
const K_STDIN_EOF: u8 = 0x13;
const K_RESIZE: u8 = 0x14;
const K_SIGNAL: u8 = 0x15;
const K_STDOUT: u8 = 0x16;
const K_STDERR: u8 = 0x17;
const K_EXITED: u8 = 0x18;
const K_POWER: u8 = 0x20;
const K_SET_CLOCK: u8 = 0x21;
const K_FS_EVENTS: u8 = 0x30;
const K_SERVICES: u8 = 0x40;
const K_SERVICES_REPLY: u8 = 0x41;
const K_OK: u8 = 0x7e;
const K_ERROR: u8 = 0x7f;

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Info => "Info",
            Message::InfoReply(_) => "InfoReply",
            Message::Exec(_) => "Exec",
            Message::Started { .. } => "Started",
            Message::Stdin(_) => "Stdin",
            Message::StdinEof => "StdinEof",
            Message::Resize { .. } => "Resize",
            Message::Signal(_) => "Signal",
            Message::Stdout(_) => "Stdout",
            Message::Stderr(_) => "Stderr",
            Message::Exited { .. } => "Exited",
            Message::Power(_) => "Power",
            Message::SetClock { .. } => "SetClock",
            Message::FsEvents { .. } => "FsEvents",
            Message::Services(_) => "Services",
            Message::ServicesReply(_) => "ServicesReply",
            Message::Ok => "Ok",
            Message::Error(_) => "Error",
        }
    }

    /// The whole frame: length, kind, body.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder(vec![0, 0, 0, 0]);
        match self {
            Message::Hello { version, software } => {
                e.u8(K_HELLO);
                e.u16(*version);
                e.bytes(software.as_bytes());
            }
            Message::Info => e.u8(K_INFO),
            Message::InfoReply(info) => {
                e.u8(K_INFO_REPLY);
                e.bytes(info.agent_version.as_bytes());
                e.bytes(info.hostname.as_bytes());
                e.u64(info.uptime_ms);
                e.u64(info.clock_unix_ns as u64);
                e.u32(info.pid);
                e.u32(info.mounts.len() as u32);
                for m in &info.mounts {
                    e.bytes(m.source.as_bytes());
                    e.bytes(m.target.as_bytes());
                    e.bytes(m.fstype.as_bytes());
                }
            }
            Message::Exec(req) => {
                e.u8(K_EXEC);
                e.u32(req.argv.len() as u32);
                for a in &req.argv {
                    e.bytes(a);
                }
                e.u32(req.env.len() as u32);
                for (k, v) in &req.env {
                    e.bytes(k);
                    e.bytes(v);
                }
                match &req.cwd {
                    None => e.u8(0),
                    Some(c) => {
                        e.u8(1);
                        e.bytes(c);
                    }
                }
                match &req.tty {
                    None => e.u8(0),
                    Some(t) => {
                        e.u8(1);
                        e.u16(t.rows);
                        e.u16(t.cols);
                        e.bytes(t.term.as_bytes());
                    }
                }
                if let Some(user) = &req.user {
                    e.u8(1);
                    e.bytes(user.as_bytes());
                }
            }
            Message::Started { pid } => {
                e.u8(K_STARTED);
                e.u32(*pid);
            }
            Message::Stdin(d) => {
                e.u8(K_STDIN);
                e.0.extend_from_slice(d);
            }
            Message::StdinEof => e.u8(K_STDIN_EOF),
            Message::Resize { rows, cols } => {
                e.u8(K_RESIZE);
                e.u16(*rows);
                e.u16(*cols);
            }
            Message::Signal(s) => {
                e.u8(K_SIGNAL);
                e.u32(*s as u32);
            }
            Message::Stdout(d) => {
                e.u8(K_STDOUT);
                e.0.extend_from_slice(d);
            }
            Message::Stderr(d) => {
                e.u8(K_STDERR);
                e.0.extend_from_slice(d);
            }
            Message::Exited { status, elapsed_us } => {
                e.u8(K_EXITED);
                match status {
                    ExitStatus::Code(c) => {
                        e.u8(0);
                        e.u32(*c as u32);
                    }
                    ExitStatus::Signal(s) => {
                        e.u8(1);
                        e.u32(*s as u32);
                    }
                }
                e.u64(*elapsed_us);
            }
            Message::Power(a) => {
                e.u8(K_POWER);
                e.u8(match a {
                    PowerAction::Poweroff => 0,
                    PowerAction::Reboot => 1,
                });
            }
            Message::SetClock { unix_ns } => {
                e.u8(K_SET_CLOCK);
                e.u64(*unix_ns as u64);
            }
            Message::FsEvents { tag, changes } => {
                e.u8(K_FS_EVENTS);
                e.bytes(tag.as_bytes());
                e.u32(changes.len() as u32);
                for c in changes {
                    e.fs_change(c);
                }
            }
            Message::Services(specs) => {
                e.u8(K_SERVICES);
                e.u32(specs.len() as u32);
                for s in specs {
                    e.bytes(s.kind.as_bytes());
                    e.bytes(s.name.as_bytes());
                    e.u16(s.port);
                    e.u32(s.databases.len() as u32);
                    for d in &s.databases {
                        e.bytes(d.as_bytes());
                    }
                    e.bytes(s.user.as_bytes());
                    e.opt_string(s.password.as_deref());
                    e.opt_string(s.initial_script.as_deref());
                    e.bytes(s.data_dir.as_bytes());
                }
            }
            Message::ServicesReply(states) => {
                e.u8(K_SERVICES_REPLY);
                e.u32(states.len() as u32);
                for s in states {
                    e.bytes(s.name.as_bytes());
                    e.bytes(s.kind.as_bytes());
                    e.u16(s.port);
                    e.u8(match s.run {
                        ServiceRun::Starting => 0,
                        ServiceRun::Running => 1,
                        ServiceRun::Failed => 2,
                    });
                    e.bytes(s.version.as_bytes());
                    e.bytes(s.detail.as_bytes());
                    e.u32(s.restarts);
                }
            }
            Message::Ok => e.u8(K_OK),
            Message::Error(m) => {
                e.u8(K_ERROR);
                e.bytes(m.as_bytes());
            }
        }
        let len = (e.0.len() - 4) as u32;
        e.0[..4].copy_from_slice(&len.to_le_bytes());
        e.0
    }

    /// Decode one frame body (kind byte and what follows; the length prefix
    /// already removed).
    pub fn decode(body: &[u8]) -> Result<Message> {
        let (&kind, rest) = body.split_first().ok_or(Error::EmptyFrame)?;
        let name = kind_name(kind).ok_or(Error::UnknownKind(kind))?;
        let mut d = Decoder { buf: rest, kind: name };
        let msg = match kind {
            K_HELLO => Message::Hello {
                version: d.u16("version")?,
                software: d.string("software")?,
            },
            K_INFO => Message::Info,
            K_INFO_REPLY => {
                let agent_version = d.string("agent_version")?;
                let hostname = d.string("hostname")?;
                let uptime_ms = d.u64("uptime_ms")?;
                let clock_unix_ns = d.u64("clock_unix_ns")? as i64;
                let pid = d.u32("pid")?;
                let count = d.count("mounts", 3 * 4)?;
                let mut mounts = Vec::with_capacity(count);
                for _ in 0..count {
                    mounts.push(Mount {
                        source: d.string("mount source")?,
                        target: d.string("mount target")?,
                        fstype: d.string("mount fstype")?,
                    });
                }
                Message::InfoReply(Info {
                    agent_version,
                    hostname,
                    uptime_ms,
                    clock_unix_ns,
                    pid,
                    mounts,
                })
            }
            K_EXEC => {
                let argc = d.count("argv", 4)?;
                let mut argv = Vec::with_capacity(argc);
                for _ in 0..argc {
                    argv.push(d.c_bytes("argv")?);
                }
                let envc = d.count("env", 8)?;
                let mut env = Vec::with_capacity(envc);
                for _ in 0..envc {
                    let key = d.c_bytes("env name")?;
                    if key.is_empty() || key.contains(&b'=') {
                        return Err(Error::BadValue {
                            kind: "Exec",
                            field: "env name (empty or contains '=')",
                            value: key.len() as u64,
                        });
                    }
                    env.push((key, d.c_bytes("env value")?));
                }
                let cwd = if d.flag("cwd")? { Some(d.c_bytes("cwd")?) } else { None };
                let tty = if d.flag("tty")? {
                    Some(Tty {
                        rows: d.u16("tty rows")?,
                        cols: d.u16("tty cols")?,
                        term: d.string("tty term")?,
                    })
                } else {
                    None
                };
                // Absent (an older host) means root, like an explicit 0.
                let user = if !d.buf.is_empty() && d.flag("user")? {
                    let name = d.string("user")?;
                    if name.is_empty() || name.contains(['\0', ':', '\n']) {
                        return Err(Error::BadValue {
                            kind: "Exec",
                            field: "user (empty, or holds NUL, ':' or a newline)",
                            value: name.len() as u64,
                        });
                    }
                    Some(name)
                } else {
                    None
                };
                Message::Exec(ExecRequest {
                    argv,
                    env,
                    cwd,
                    tty,
                    user,
                })
            }
            K_STARTED => Message::Started { pid: d.u32("pid")? },
            K_STDIN => Message::Stdin(d.rest()),
            K_STDIN_EOF => Message::StdinEof,
            K_RESIZE => Message::Resize {
                rows: d.u16("rows")?,
                cols: d.u16("cols")?,
            },
            K_SIGNAL => Message::Signal(d.signal("signal")?),
            K_STDOUT => Message::Stdout(d.rest()),
            K_STDERR => Message::Stderr(d.rest()),
            K_EXITED => {
                let status = match d.u8("status kind")? {
                    0 => ExitStatus::Code(d.u32("exit code")? as i32),
                    1 => ExitStatus::Signal(d.signal("exit signal")?),
                    other => {
                        return Err(Error::BadValue {
                            kind: "Exited",
                            field: "status kind",
                            value: other.into(),
                        })
                    }
                };
                Message::Exited {
                    status,
                    elapsed_us: d.u64("elapsed_us")?,
                }
            }
            K_POWER => Message::Power(match d.u8("action")? {
                0 => PowerAction::Poweroff,
                1 => PowerAction::Reboot,
                other => {
                    return Err(Error::BadValue {
                        kind: "Power",
                        field: "action",
                        value: other.into(),
                    })
                }
            }),
            K_SET_CLOCK => Message::SetClock {
                unix_ns: d.u64("unix_ns")? as i64,
            },
            K_FS_EVENTS => {
                let tag = d.string("tag")?;
                // The smallest change: a code byte and an empty path.
                let count = d.count("changes", 5)?;
                let mut changes = Vec::with_capacity(count);
                for _ in 0..count {
                    changes.push(d.fs_change()?);
                }
                Message::FsEvents { tag, changes }
            }
            K_SERVICES => {
                // The smallest spec: five empty strings, a port, two counts/flags.
                let count = d.count("services", 4 * 5 + 2 + 4 + 2)?;
                let mut specs = Vec::with_capacity(count);
                for _ in 0..count {
                    let kind = d.string("kind")?;
                    let name = d.string("name")?;
                    let port = d.u16("port")?;
                    let n = d.count("databases", 4)?;
                    let mut databases = Vec::with_capacity(n);
                    for _ in 0..n {
                        databases.push(d.string("database")?);
                    }
                    specs.push(ServiceSpec {
                        kind,
                        name,
                        port,
                        databases,
                        user: d.string("user")?,
                        password: d.opt_string("password")?,
                        initial_script: d.opt_string("initial_script")?,
                        data_dir: d.string("data_dir")?,
                    });
                }
                Message::Services(specs)
            }
            K_SERVICES_REPLY => {
                let count = d.count("services", 4 * 4 + 2 + 1 + 4)?;
                let mut states = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = d.string("name")?;
                    let kind = d.string("kind")?;
                    let port = d.u16("port")?;
                    let run = match d.u8("run")? {
                        0 => ServiceRun::Starting,
                        1 => ServiceRun::Running,
                        2 => ServiceRun::Failed,
                        other => {
                            return Err(Error::BadValue {
                                kind: "ServicesReply",
                                field: "run",
                                value: other.into(),
                            })
                        }
                    };
                    states.push(ServiceState {
                        name,
                        kind,
                        port,
                        run,
                        version: d.string("version")?,
                        detail: d.string("detail")?,
                        restarts: d.u32("restarts")?,
                    });
                }
                Message::ServicesReply(states)
            }
            K_OK => Message::Ok,
            K_ERROR => Message::Error(d.string("message")?),
            _ => return Err(Error::UnknownKind(kind)),
        };
        if !d.buf.is_empty() {
            return Err(Error::Trailing(d.buf.len(), name));
        }
        Ok(msg)
    }
}

fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        K_HELLO => "Hello",
        K_INFO => "Info",
        K_INFO_REPLY => "InfoReply",
        K_EXEC => "Exec",
        K_STARTED => "Started",
        K_STDIN => "Stdin",
        K_STDIN_EOF => "StdinEof",
        K_RESIZE => "Resize",
        K_SIGNAL => "Signal",
        K_STDOUT => "Stdout",
        K_STDERR => "Stderr",
        K_EXITED => "Exited",
        K_POWER => "Power",
        K_SET_CLOCK => "SetClock",
        K_FS_EVENTS => "FsEvents",
        K_SERVICES => "Services",
        K_SERVICES_REPLY => "ServicesReply",
        K_OK => "Ok",
        K_ERROR => "Error",
        _ => return None,
    })
}

struct Encoder(Vec<u8>);

impl Encoder {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn opt_string(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.bytes(v.as_bytes());
            }
        }
    }
    fn fs_change(&mut self, c: &FsChange) {
        match c {
            FsChange::Arrive { path, kind } => {
                self.u8(0);
                self.bytes(path);
                self.u8(match kind {
                    EntryKind::File => 0,
                    EntryKind::Dir => 1,
                    EntryKind::Symlink => 2,
                    EntryKind::Other => 3,
                });
            }
            FsChange::Leave { path, dir } => {
                self.u8(1);
                self.bytes(path);
                self.u8(u8::from(*dir));
            }
            FsChange::Move { from, to, dir } => {
                self.u8(2);
                self.bytes(from);
                self.bytes(to);
                self.u8(u8::from(*dir));
            }
            FsChange::Modify { path, size } => {
                self.u8(3);
                self.bytes(path);
                self.u64(*size);
            }
            FsChange::Attrib { path, mode } => {
                self.u8(4);
                self.bytes(path);
                self.u32(*mode);
            }
        }
    }
}

struct Decoder<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Truncated { kind: self.kind, field });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn flag(&mut self, field: &'static str) -> Result<bool> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(Error::BadValue {
                kind: self.kind,
                field,
                value: other.into(),
            }),
        }
    }
    /// A signal number Linux can deliver (1..=64).
    fn signal(&mut self, field: &'static str) -> Result<i32> {
        let v = self.u32(field)?;
        if !(1..=64).contains(&v) {
            return Err(Error::BadValue {
                kind: self.kind,
                field,
                value: v.into(),
            });
        }
        Ok(v as i32)
    }
    /// A list count, checked against what the rest of the frame can hold
    /// (each item needs at least `min_item` bytes), so a hostile count
    /// cannot make the receiver allocate more than the frame's size.
    fn count(&mut self, field: &'static str, min_item: usize) -> Result<usize> {
        let n = self.u32(field)? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(Error::Truncated { kind: self.kind, field });
        }
        Ok(n)
    }
    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8]> {
        let n = self.u32(field)? as usize;
        self.take(n, field)
    }
    fn string(&mut self, field: &'static str) -> Result<String> {
        let b = self.bytes(field)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| Error::NotUtf8 { kind: self.kind, field })
    }
    fn opt_string(&mut self, field: &'static str) -> Result<Option<String>> {
        Ok(if self.flag(field)? {
            Some(self.string(field)?)
        } else {
            None
        })
    }
    /// Bytes that become a C string in the guest (argv, env, paths).
    fn c_bytes(&mut self, field: &'static str) -> Result<Vec<u8>> {
        let b = self.bytes(field)?;
        if b.contains(&0) {
            return Err(Error::Nul { kind: self.kind, field });
        }
        Ok(b.to_vec())
    }
    /// A relative path inside a share: no empty, `.` or `..` component,
    /// no leading `/`, no NUL.
    fn share_path(&mut self, field: &'static str) -> Result<Vec<u8>> {
        let p = self.c_bytes(field)?;
        if p.is_empty() || p.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b"..") {
            return Err(Error::BadValue {
                kind: self.kind,
                field,
                value: p.len() as u64,
            });
        }
        Ok(p)
    }
    fn fs_change(&mut self) -> Result<FsChange> {
        Ok(match self.u8("change")? {
            0 => FsChange::Arrive {
                path: self.share_path("path")?,
                kind: match self.u8("entry kind")? {
                    0 => EntryKind::File,
                    1 => EntryKind::Dir,
                    2 => EntryKind::Symlink,
                    3 => EntryKind::Other,
                    other => {
                        return Err(Error::BadValue {
                            kind: self.kind,
                            field: "entry kind",
                            value: other.into(),
                        })
                    }
                },
            },
            1 => FsChange::Leave {
                path: self.share_path("path")?,
                dir: self.flag("dir")?,
            },
            2 => FsChange::Move {
                from: self.share_path("from")?,
                to: self.share_path("to")?,
                dir: self.flag("dir")?,
            },
            3 => FsChange::Modify {
                path: self.share_path("path")?,
                size: self.u64("size")?,
            },
            4 => FsChange::Attrib {
                path: self.share_path("path")?,
                mode: self.u32("mode")?,
            },
            other => {
                return Err(Error::BadValue {
                    kind: self.kind,
                    field: "change",
                    value: other.into(),
                })
            }
        })
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf).to_vec()
    }
}

/// Incremental frame decoder for non-blocking readers: feed bytes with
/// [`FrameDecoder::push`], take messages with [`FrameDecoder::next`].
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether a partial frame is buffered (EOF now would cut a frame).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next complete message, if one is buffered. An error leaves the
    /// stream unusable (framing is lost); the caller answers and closes.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>> {
        let Some(header) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*header) as usize;
        if len > MAX_FRAME {
            return Err(Error::FrameTooLarge(len));
        }
        if len == 0 {
            return Err(Error::EmptyFrame);
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let result = Message::decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        result.map(Some)
    }
}

/// Write one message (the whole frame in one `write_all`).
pub fn write_message(w: &mut impl Write, msg: &Message) -> Result<()> {
    w.write_all(&msg.encode())?;
    Ok(())
}

/// Read one message from a blocking reader. `Err(Closed)` when the peer
/// closed the stream at a frame boundary.
pub fn read_message(r: &mut impl Read) -> Result<Message> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(Error::Closed),
            Ok(0) => return Err(Error::ShortFrame),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(len));
    }
    if len == 0 {
        return Err(Error::EmptyFrame);
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::ShortFrame,
        _ => e.into(),
    })?;
    Message::decode(&body)
}

/// The first exchange on a connection, from the side that opened it: send
/// our `Hello`, read the peer's, check its version. Returns the peer's
/// software name.
pub fn hello<S: Read + Write>(stream: &mut S, software: &str) -> Result<String> {
    write_message(
        stream,
        &Message::Hello {
            version: VERSION,
            software: software.into(),
        },
    )?;
    match read_message(stream)? {
        Message::Hello { version, software } if version == VERSION => Ok(software),
        Message::Hello { version, .. } => Err(Error::Version(version)),
        Message::Error(e) => Err(Error::Remote(e)),
        other => Err(Error::Unexpected {
            expected: "Hello",
            got: other.name(),
        }),
    }
}

/// Opens a connection to guest port `port` through a VMM's vsock Unix
/// socket (`CONNECT <port>\n`, answered `OK <host port>\n`, the host side
/// of Firecracker's hybrid vsock), then exchanges `Hello`. Returns the
/// stream, with `timeout` on reads and writes, and the peer's software.
pub fn connect_vsock(
    uds: &std::path::Path,
    port: u32,
    timeout: std::time::Duration,
    software: &str,
) -> Result<(std::os::unix::net::UnixStream, String)> {
    let mut stream = std::os::unix::net::UnixStream::connect(uds)
        .map_err(|e| Error::Handshake(format!("cannot connect to {}: {e} (is the VM running?)", uds.display())))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the newline is the agent's.
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b) {
            Ok(0) => {
                return Err(Error::Handshake(format!(
                    "no answer on vsock port {port} (the guest agent is not listening, or the guest is still booting)"
                )))
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 32 => line.push(b[0]),
            Ok(_) => {
                return Err(Error::Handshake(
                    "the vsock socket answered something other than `OK <port>`".into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Handshake(format!(
                    "waiting for the vsock handshake on port {port}: {e}"
                )))
            }
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(Error::Handshake(format!(
            "the vsock socket answered {:?} instead of `OK <port>`",
            String::from_utf8_lossy(&line)
        )));
    }
    let peer = hello(&mut stream, software)?;
    Ok((stream, peer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                version: VERSION,
                software: "mvm 0.1.0".into(),
            },
            Message::Info,
            Message::InfoReply(Info {
                agent_version: "0.1.0".into(),
                hostname: "myapp".into(),
                uptime_ms: 12_345,
                clock_unix_ns: 1_800_000_000_000_000_000,
                pid: 1,
                mounts: vec![Mount {
                    source: "project".into(),
                    target: "/project".into(),
                    fstype: "virtiofs".into(),
                }],
            }),
            Message::Exec(ExecRequest {
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \xff".to_vec()],
                env: vec![(b"A".to_vec(), b"1=2".to_vec())],
                cwd: Some(b"/project".to_vec()),
                tty: Some(Tty {
                    rows: 24,
                    cols: 80,
                    term: "xterm-256color".into(),
                }),
                user: None,
            }),
            Message::Exec(ExecRequest {
                argv: vec![b"id".to_vec()],
                user: Some("dev.user".into()),
                ..Default::default()
            }),
            Message::Exec(ExecRequest::default()),
            Message::Started { pid: 42 },
            Message::Stdin(b"hi\n".to_vec()),
            Message::Stdin(Vec::new()),
            Message::StdinEof,
            Message::Resize { rows: 50, cols: 132 },
            Message::Signal(libc::SIGINT),
            Message::Stdout(vec![0, 1, 2, 255]),
            Message::Stderr(b"oops".to_vec()),
            Message::Exited {
                status: ExitStatus::Code(-1),
                elapsed_us: 7,
            },
            Message::Exited {
                status: ExitStatus::Signal(9),
                elapsed_us: 0,
            },
            Message::Power(PowerAction::Poweroff),
            Message::Power(PowerAction::Reboot),
            Message::SetClock { unix_ns: -5 },
            Message::FsEvents {
                tag: "project".into(),
                changes: vec![
                    FsChange::Arrive {
                        path: b"src/new.rs".to_vec(),
                        kind: EntryKind::File,
                    },
                    FsChange::Arrive {
                        path: b"d".to_vec(),
                        kind: EntryKind::Dir,
                    },
                    FsChange::Leave {
                        path: b"old\xff".to_vec(),
                        dir: true,
                    },
                    FsChange::Move {
                        from: b"a/b".to_vec(),
                        to: b"c".to_vec(),
                        dir: false,
                    },
                    FsChange::Modify {
                        path: b"README".to_vec(),
                        size: 1 << 40,
                    },
                    FsChange::Attrib {
                        path: b"run.sh".to_vec(),
                        mode: 0o755,
                    },
                ],
            },
            Message::FsEvents {
                tag: "t".into(),
                changes: Vec::new(),
            },
            Message::Services(Vec::new()),
            Message::Services(vec![ServiceSpec {
                kind: "postgresql".into(),
                name: "db".into(),
                port: 5432,
                databases: vec!["app".into(), "test".into()],
                user: "dev".into(),
                password: Some("pw".into()),
                initial_script: Some("create table t (x int);".into()),
                data_dir: "/var/lib/mvm-services/db".into(),
            }]),
            Message::ServicesReply(vec![ServiceState {
                name: "db".into(),
                kind: "postgresql".into(),
                port: 5432,
                run: ServiceRun::Failed,
                version: "15".into(),
                detail: "initdb failed".into(),
                restarts: 3,
            }]),
            Message::Ok,
            Message::Error("no such file".into()),
        ]
    }

    #[test]
    fn exec_request_debug_hides_environment_values() {
        let req = ExecRequest {
            argv: vec![b"env".to_vec()],
            env: vec![(b"TOKEN".to_vec(), b"s3cret".to_vec())],
            ..Default::default()
        };
        let shown = format!("{:?}", Message::Exec(req));
        assert!(shown.contains("TOKEN") && !shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let frame = m.encode();
            assert_eq!(
                u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
                frame.len() - 4
            );
            assert_eq!(Message::decode(&frame[4..]).unwrap(), m, "{}", m.name());
            assert_eq!(read_message(&mut &frame[..]).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for m in samples() {
            let frame = m.encode();
            for cut in 4..frame.len() {
                let body = &frame[4..cut];
                // Data frames accept any length; an Exec cut just before
                // its optional user is a root Exec (what an older host
                // sends); everything else must fail.
                if let Ok(d) = Message::decode(body) {
                    let rootless = match (&m, &d) {
                        (Message::Exec(full), Message::Exec(cut)) => {
                            cut.user.is_none()
                                && *cut
                                    == ExecRequest {
                                        user: None,
                                        ..full.clone()
                                    }
                        }
                        _ => false,
                    };
                    assert!(
                        matches!(d, Message::Stdin(_) | Message::Stdout(_) | Message::Stderr(_))
                            || rootless
                            || body.len() == frame.len() - 4,
                        "{} cut at {cut} decoded as {d:?}",
                        m.name()
                    );
                }
            }
            // Trailing garbage is refused.
            if !matches!(m, Message::Stdin(_) | Message::Stdout(_) | Message::Stderr(_)) {
                let mut long = frame[4..].to_vec();
                // (After an Exec without a user, a 0 is its "no user" flag.)
                if matches!(&m, Message::Exec(r) if r.user.is_none()) {
                    long.push(0);
                }
                long.push(0);
                assert!(
                    matches!(Message::decode(&long), Err(Error::Trailing(1, _))),
                    "{}",
                    m.name()
                );
            }
        }
    }

    #[test]
    fn share_paths_stay_inside_the_share() {
        for bad in [
            &b""[..],
            b"/etc/passwd",
            b"../x",
            b"a/../../x",
            b"a//b",
            b"a/./b",
            b"a/",
            b"a\0b",
        ] {
            let m = Message::FsEvents {
                tag: "p".into(),
                changes: vec![FsChange::Modify {
                    path: bad.to_vec(),
                    size: 0,
                }],
            };
            assert!(
                Message::decode(&m.encode()[4..]).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn hostile_values_are_refused() {
        assert!(matches!(Message::decode(&[0x55]), Err(Error::UnknownKind(0x55))));
        assert!(matches!(Message::decode(&[]), Err(Error::EmptyFrame)));
        // A list count far beyond the frame.
        let mut exec = vec![K_EXEC];
        exec.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Message::decode(&exec), Err(Error::Truncated { .. })));
        // A string length beyond the frame.
        let mut err = vec![K_ERROR];
        err.extend_from_slice(&1000u32.to_le_bytes());
        err.extend_from_slice(b"short");
        assert!(matches!(Message::decode(&err), Err(Error::Truncated { .. })));
        // Signal 0 and 65 do not exist.
        for bad in [0u32, 65, u32::MAX] {
            let mut sig = vec![K_SIGNAL];
            sig.extend_from_slice(&bad.to_le_bytes());
            assert!(matches!(Message::decode(&sig), Err(Error::BadValue { .. })));
        }
        // NUL inside an argument.
        let m = Message::Exec(ExecRequest {
            argv: vec![b"a\0b".to_vec()],
            ..Default::default()
        });
        assert!(matches!(Message::decode(&m.encode()[4..]), Err(Error::Nul { .. })));
        // '=' in an environment name.
        let m = Message::Exec(ExecRequest {
            argv: vec![b"env".to_vec()],
            env: vec![(b"A=B".to_vec(), b"c".to_vec())],
            ..Default::default()
        });
        assert!(matches!(Message::decode(&m.encode()[4..]), Err(Error::BadValue { .. })));
        // Invalid UTF-8 in a string field.
        let mut e = vec![K_ERROR];
        e.extend_from_slice(&2u32.to_le_bytes());
        e.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(Message::decode(&e), Err(Error::NotUtf8 { .. })));
        // Bad flag byte.
        let mut x = Message::Exec(ExecRequest::default()).encode()[4..].to_vec();
        let last = x.len() - 1;
        x[last] = 2;
        assert!(matches!(Message::decode(&x), Err(Error::BadValue { .. })));
        // A user flag of 0 is root; a user name that cannot be a passwd
        // name is refused.
        let mut x = Message::Exec(ExecRequest::default()).encode()[4..].to_vec();
        x.push(0);
        assert_eq!(Message::decode(&x).unwrap(), Message::Exec(ExecRequest::default()));
        for bad in ["", "a:b", "a\0b", "a\nb"] {
            let m = Message::Exec(ExecRequest {
                user: Some(bad.into()),
                ..Default::default()
            });
            assert!(
                matches!(Message::decode(&m.encode()[4..]), Err(Error::BadValue { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn frame_decoder_handles_split_and_oversized_frames() {
        let mut all = Vec::new();
        for m in samples() {
            all.extend_from_slice(&m.encode());
        }
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        // One byte at a time: the worst split.
        for b in &all {
            d.push(std::slice::from_ref(b));
            while let Some(m) = d.next().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, samples());
        assert!(!d.has_partial());

        let mut d = FrameDecoder::new();
        d.push(&((MAX_FRAME + 1) as u32).to_le_bytes());
        assert!(matches!(d.next(), Err(Error::FrameTooLarge(_))));
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 0, 0]);
        assert!(matches!(d.next(), Err(Error::EmptyFrame)));

        assert!(matches!(read_message(&mut &[][..]), Err(Error::Closed)));
        assert!(matches!(read_message(&mut &[5, 0][..]), Err(Error::ShortFrame)));
        assert!(matches!(
            read_message(&mut &[5, 0, 0, 0, K_OK][..]),
            Err(Error::ShortFrame)
        ));
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(read_message(&mut &huge[..]), Err(Error::FrameTooLarge(_))));
    }

    #[test]
    fn hello_checks_the_peer_version() {
        struct Duplex {
            input: io::Cursor<Vec<u8>>,
            output: Vec<u8>,
        }
        impl Read for Duplex {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.input.read(b)
            }
        }
        impl Write for Duplex {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.output.write(b)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let reply = |m: Message| Duplex {
            input: io::Cursor::new(m.encode()),
            output: Vec::new(),
        };
        let mut ok = reply(Message::Hello {
            version: VERSION,
            software: "mvm-agent 0.1.0".into(),
        });
        assert_eq!(hello(&mut ok, "test").unwrap(), "mvm-agent 0.1.0");
        assert!(matches!(
            read_message(&mut &ok.output[..]).unwrap(),
            Message::Hello { version: VERSION, .. }
        ));
        let mut old = reply(Message::Hello {
            version: VERSION + 1,
            software: "x".into(),
        });
        assert!(matches!(hello(&mut old, "test"), Err(Error::Version(v)) if v == VERSION + 1));
        let mut err = reply(Message::Error("go away".into()));
        assert!(matches!(hello(&mut err, "test"), Err(Error::Remote(_))));
        let mut odd = reply(Message::Ok);
        assert!(matches!(hello(&mut odd, "test"), Err(Error::Unexpected { .. })));
    }
}
