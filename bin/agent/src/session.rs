//! One `Exec`: spawn the program, pump its input and output over the
//! connection, report how it ended.
//!
//! One thread per session runs a poll(2) loop over the connection, the
//! program's pipes (or PTY master) and the reaper's notification pipe.
//! Protocol choices:
//! * A program that cannot be started (not found: 127, not executable or
//!   any other exec failure: 126, the shell conventions) gets no `Started`:
//!   the agent sends `Stderr("mvm-agent: <cmd>: <why>\n")` then `Exited`.
//! * A `cwd` that is not a directory is refused with `Error` (nothing ran).
//! * `Signal` goes to the program's process group (it leads its own group,
//!   or its own session with a tty).
//! * The host closing the connection (or breaking the framing) hangs the
//!   program up: SIGHUP (and SIGCONT) to its group, SIGKILL 2 s later.
//! * `StdinEof` closes the stdin pipe; with a tty it only stops input (the
//!   master stays open: writing ^D would be wrong for raw-mode programs).
//! * Stdin is buffered up to [`STDIN_BUFFER`] bytes; beyond that the
//!   connection is not read until the program consumes input.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cmdline::Config;
use crate::passwd::{self, Account};
use crate::proto::{self, ExecRequest, ExitStatus, FrameDecoder, Message, MAX_CHUNK};
use crate::reaper::{Reaper, Watch};
use crate::{pty, sys};

/// Most stdin bytes held for a program that does not read them yet.
pub const STDIN_BUFFER: usize = 1 << 20;

/// From hangup (SIGHUP) to SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// After the exit: how long output may pause before we stop waiting for
/// the rest (a background grandchild may hold the pipes forever), and the
/// most time spent draining in all.
const DRAIN_QUIET: Duration = Duration::from_millis(100);
const DRAIN_MAX: Duration = Duration::from_secs(2);

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What every session needs from the agent.
pub struct Context {
    pub reaper: Arc<Reaper>,
    pub config: Config,
    /// /etc/passwd and /etc/group (a test may point elsewhere).
    pub passwd: PathBuf,
    pub group: PathBuf,
    /// The agent is the guest's init (it may power off).
    pub init: bool,
}

/// Run one `Exec` on `conn`. `start` is when the request arrived.
/// Errors are the connection's (the host went away); the program's own
/// failures are reported to the host.
pub fn run(ctx: &Context, conn: &mut File, req: ExecRequest, start: Instant) -> proto::Result<()> {
    let account = match req.user.as_deref() {
        None => Account::root(&ctx.passwd),
        Some(name) => match passwd::account(&ctx.passwd, &ctx.group, name) {
            Ok(a) => a,
            Err(why) => return proto::write_message(conn, &Message::Error(why)),
        },
    };
    let cwd = match resolve_cwd(req.cwd.as_deref(), ctx.config.project_dir(), &account.home) {
        Ok(c) => c,
        Err(why) => return proto::write_message(conn, &Message::Error(why)),
    };
    let (mut cmd, name) = command(&req, &account);
    cmd.env_clear().envs(environment(&req, &account)).current_dir(&cwd);

    let user = req.user.is_some().then_some(&account);
    let mut streams = match prepare_stdio(&mut cmd, &req, user.map(|a| a.uid)) {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot set up the program's terminal or pipes: {}", sys::error_text(&e));
            return proto::write_message(conn, &Message::Error(why));
        }
    };
    if let Some(account) = user {
        become_user(&mut cmd, account);
    }
    let spawned = ctx.reaper.spawn(&mut cmd);
    // The Command holds our copies of the child's ends (PTY slave, pipe
    // ends); they must close now, or we never see EOF.
    drop(cmd);
    let (child, watch) = match spawned {
        Ok(c) => c,
        Err(e) => return report_spawn_failure(conn, &name, &e, start),
    };
    if let Some(master) = streams.master.as_ref() {
        set_nonblocking_or_log(master);
    }
    let mut child = child;
    streams.take_pipes(&mut child);
    drop(child);

    let pid = watch.pid as u32;
    let mut session = Session {
        ctx,
        conn,
        watch,
        streams,
        pending: Vec::new(),
        stdin_eof: false,
        done: false,
    };
    if let Host::Gone = session.send(&Message::Started { pid }) {
        return session.hang_up();
    }
    session.pump(start)
}

/// In the child, after the terminal is set up: the user's groups, group
/// and user id, in that order (each needs root's rights until the last).
fn become_user(cmd: &mut Command, account: &Account) {
    let groups: Vec<libc::gid_t> = account.groups.clone();
    let (uid, gid) = (account.uid, account.gid);
    // SAFETY: the closure only makes async-signal-safe system calls on
    // memory it owns.
    unsafe {
        cmd.pre_exec(move || {
            sys::cvt(libc::setgroups(groups.len(), groups.as_ptr()))?;
            sys::cvt(libc::setgid(gid))?;
            sys::cvt(libc::setuid(uid))?;
            Ok(())
        })
    };
}

/// The program and its argv: the request's, or the user's login shell.
fn command(req: &ExecRequest, account: &Account) -> (Command, String) {
    match req.argv.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(OsStr::from_bytes(program));
            cmd.args(args.iter().map(|a| OsStr::from_bytes(a)));
            (cmd, String::from_utf8_lossy(program).into_owned())
        }
        None => {
            let mut cmd = Command::new(&account.shell);
            let base = Path::new(&account.shell)
                .file_name()
                .map_or_else(|| "sh".into(), |b| b.to_string_lossy().into_owned());
            cmd.arg0(format!("-{base}"));
            (cmd, account.shell.clone())
        }
    }
}

/// The default environment, then the request's entries (which win).
/// What the kernel gave init besides its own `HOME` and `TERM`: the
/// `NAME=value` arguments of the kernel command line, such as the settings
/// that keep user space to SSE on PVM hosts (vmm-core's `host.rs`). Every
/// program the agent starts gets them, below its request's variables.
pub fn boot_env() -> &'static [(OsString, OsString)] {
    static ENV: std::sync::OnceLock<Vec<(OsString, OsString)>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| boot_env_from(std::env::vars_os()))
}

fn boot_env_from(vars: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    vars.filter(|(k, _)| !matches!(k.to_str(), Some("HOME" | "TERM" | "PATH" | "PWD")))
        .collect()
}

pub fn environment(req: &ExecRequest, account: &Account) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = boot_env().to_vec();
    env.extend([
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOME".into(), account.home.clone().into()),
        ("USER".into(), account.name.clone().into()),
        ("LOGNAME".into(), account.name.clone().into()),
        ("SHELL".into(), account.shell.clone().into()),
        // Built into glibc (no locales package needed): UTF-8 text in
        // git, editors and compilers' messages.
        ("LANG".into(), "C.UTF-8".into()),
    ]);
    if let Some(tty) = &req.tty {
        env.push(("TERM".into(), tty.term.clone().into()));
    }
    for (k, v) in &req.env {
        let k = OsString::from_vec(k.clone());
        env.retain(|(old, _)| *old != k);
        env.push((k, OsString::from_vec(v.clone())));
    }
    env
}

/// The request's directory (which must exist), else the project, else
/// the user's home, else `/`.
pub fn resolve_cwd(requested: Option<&[u8]>, project: Option<&str>, home: &str) -> Result<PathBuf, String> {
    if let Some(dir) = requested {
        let path = PathBuf::from(OsStr::from_bytes(dir));
        return match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Ok(path),
            Ok(_) => Err(format!("cwd {}: Not a directory", path.display())),
            Err(e) => Err(format!("cwd {}: {}", path.display(), sys::error_text(&e))),
        };
    }
    let candidates = project.into_iter().chain(std::iter::once(home));
    Ok(candidates
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/")))
}

/// The child's side of the program's I/O, and ours.
struct Streams {
    /// Where stdin goes: the stdin pipe, or a dup of the PTY master.
    input: Option<OwnedFd>,
    /// Output fds and whether each is stderr.
    outputs: Vec<(Option<OwnedFd>, bool)>,
    /// PTY sessions: the master, for `Resize`.
    master: Option<OwnedFd>,
}

impl Streams {
    fn take_pipes(&mut self, child: &mut std::process::Child) {
        if self.master.is_some() {
            return;
        }
        self.input = child.stdin.take().map(OwnedFd::from);
        let out = child.stdout.take().map(OwnedFd::from);
        let err = child.stderr.take().map(OwnedFd::from);
        for fd in out.iter().chain(err.iter()) {
            set_nonblocking_or_log(fd);
        }
        if let Some(fd) = &self.input {
            set_nonblocking_or_log(fd);
        }
        self.outputs = vec![(out, false), (err, true)];
    }
}

fn set_nonblocking_or_log(fd: &impl AsRawFd) {
    if let Err(e) = sys::set_nonblocking(fd) {
        crate::say!("cannot make a session fd non-blocking: {e}");
    }
}

/// `owner`: the uid the PTY is given to (a user's session), like a login
/// does, so that the user's programs may change its settings.
fn prepare_stdio(cmd: &mut Command, req: &ExecRequest, owner: Option<u32>) -> io::Result<Streams> {
    match &req.tty {
        None => {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.process_group(0);
            // SAFETY: the closure only makes async-signal-safe calls.
            unsafe { cmd.pre_exec(reset_signals) };
            Ok(Streams {
                input: None,
                outputs: Vec::new(),
                master: None,
            })
        }
        Some(tty) => {
            let (master, slave) = pty::open()?;
            if let Some(uid) = owner {
                // SAFETY: a valid fd; -1 keeps the group (tty).
                sys::cvt(unsafe { libc::fchown(slave.as_raw_fd(), uid, u32::MAX) })?;
            }
            pty::set_size(&master, tty.rows, tty.cols)?;
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            // SAFETY: the closure only makes async-signal-safe calls.
            unsafe {
                cmd.pre_exec(|| {
                    reset_signals()?;
                    // A new session whose controlling terminal is the PTY
                    // (stdin is the slave by now).
                    sys::cvt(libc::setsid())?;
                    sys::cvt(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
                    Ok(())
                })
            };
            let input = master.try_clone()?;
            let output = master.try_clone()?;
            Ok(Streams {
                input: Some(input),
                outputs: vec![(Some(output), false)],
                master: Some(master),
            })
        }
    }
}

/// In the child before exec: the agent blocks SIGCHLD and ignores SIGPIPE;
/// programs expect neither.
fn reset_signals() -> io::Result<()> {
    // SAFETY: sigemptyset/sigprocmask/signal are async-signal-safe and get
    // valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        sys::cvt(libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()))?;
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    Ok(())
}

fn report_spawn_failure(conn: &mut File, name: &str, e: &io::Error, start: Instant) -> proto::Result<()> {
    let (code, why) = match e.kind() {
        io::ErrorKind::NotFound => (127, "command not found".to_owned()),
        _ => (126, sys::error_text(e)),
    };
    proto::write_message(
        conn,
        &Message::Stderr(format!("mvm-agent: {name}: {why}\n").into_bytes()),
    )?;
    proto::write_message(
        conn,
        &Message::Exited {
            status: ExitStatus::Code(code),
            elapsed_us: start.elapsed().as_micros() as u64,
        },
    )
}

struct Session<'a> {
    ctx: &'a Context,
    conn: &'a mut File,
    watch: Watch,
    streams: Streams,
    /// Stdin received but not yet taken by the program.
    pending: Vec<u8>,
    /// The host sent `StdinEof`.
    stdin_eof: bool,
    /// The program was reaped or hung up (else dropping the session, on a
    /// panic, kills it).
    done: bool,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if !self.done && self.ctx.reaper.take(&self.watch).is_none() {
            sys::kill_group(self.watch.pid, libc::SIGKILL);
        }
        self.ctx.reaper.forget(&self.watch);
    }
}

/// What the connection said.
enum Host {
    Continue,
    /// Closed, broken, or unwritable: hang the program up.
    Gone,
}

impl Session<'_> {
    fn pump(&mut self, start: Instant) -> proto::Result<()> {
        let mut decoder = FrameDecoder::new();
        let mut buf = vec![0u8; MAX_CHUNK];
        let exit = loop {
            let input_fd = self.streams.input.as_ref().map_or(-1, |f| f.as_raw_fd());
            let mut fds = vec![
                sys::pollfd(self.watch.fd().as_raw_fd(), libc::POLLIN),
                sys::pollfd(
                    self.conn.as_raw_fd(),
                    if self.pending.len() < STDIN_BUFFER {
                        libc::POLLIN
                    } else {
                        0
                    },
                ),
                sys::pollfd(input_fd, if self.pending.is_empty() { 0 } else { libc::POLLOUT }),
            ];
            for (fd, _) in &self.streams.outputs {
                fds.push(sys::pollfd(fd.as_ref().map_or(-1, |f| f.as_raw_fd()), libc::POLLIN));
            }
            if let Err(e) = sys::poll(&mut fds, None) {
                crate::say!("session poll failed: {e}");
                return self.hang_up();
            }
            // Output before the exit check, so nothing read is lost.
            for (i, pfd) in fds.iter().enumerate().skip(3) {
                if pfd.revents != 0 {
                    if let Host::Gone = self.read_output(i - 3, &mut buf) {
                        return self.hang_up();
                    }
                }
            }
            if fds[2].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // The program closed its stdin (or terminal): poll would
                // report this forever, and input has nowhere to go.
                self.streams.input = None;
                self.pending.clear();
            } else if fds[2].revents != 0 {
                self.write_input();
            }
            if fds[1].revents != 0 {
                if let Host::Gone = self.read_conn(&mut decoder, &mut buf) {
                    return self.hang_up();
                }
            }
            if fds[0].revents != 0 {
                let mut byte = [0u8; 8];
                let _ = sys::read(&self.watch.fd(), &mut byte);
                if let Some(exit) = self.ctx.reaper.take(&self.watch) {
                    self.done = true;
                    break exit;
                }
            }
        };
        self.streams.input = None;
        if let Host::Gone = self.drain(&mut buf) {
            return Ok(());
        }
        self.send(&Message::Exited {
            status: exit.status,
            elapsed_us: exit.at.saturating_duration_since(start).as_micros() as u64,
        });
        Ok(())
    }

    fn send(&mut self, msg: &Message) -> Host {
        match proto::write_message(self.conn, msg) {
            Ok(()) => Host::Continue,
            Err(_) => Host::Gone,
        }
    }

    /// Read one chunk from output `i` and forward it.
    fn read_output(&mut self, i: usize, buf: &mut [u8]) -> Host {
        let Some((Some(fd), is_stderr)) = self.streams.outputs.get(i) else {
            return Host::Continue;
        };
        let is_stderr = *is_stderr;
        match sys::read(fd, buf) {
            Ok(0) => {}
            Ok(n) => {
                let data = buf.get(..n).unwrap_or_default().to_vec();
                let msg = if is_stderr {
                    Message::Stderr(data)
                } else {
                    Message::Stdout(data)
                };
                return self.send(&msg);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Host::Continue,
            // EIO: the PTY's last slave fd closed (that is its EOF).
            Err(_) => {}
        }
        if let Some(slot) = self.streams.outputs.get_mut(i) {
            slot.0 = None;
        }
        Host::Continue
    }

    /// Give the program as much pending stdin as it takes.
    fn write_input(&mut self) {
        let Some(fd) = &self.streams.input else {
            self.pending.clear();
            return;
        };
        if !self.pending.is_empty() {
            match sys::write(fd, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n.min(self.pending.len()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The program closed its stdin (EPIPE) or the PTY is gone:
                // further input has nowhere to go.
                Err(_) => {
                    self.pending.clear();
                    self.streams.input = None;
                }
            }
        }
        if self.stdin_eof && self.pending.is_empty() {
            self.streams.input = None;
        }
    }

    fn read_conn(&mut self, decoder: &mut FrameDecoder, buf: &mut [u8]) -> Host {
        let n = match sys::read(&*self.conn, buf) {
            Ok(0) | Err(_) => return Host::Gone,
            Ok(n) => n,
        };
        decoder.push(buf.get(..n).unwrap_or_default());
        loop {
            match decoder.next() {
                Ok(None) => return Host::Continue,
                Ok(Some(msg)) => {
                    if let Host::Gone = self.handle(msg) {
                        return Host::Gone;
                    }
                }
                Err(e) => {
                    crate::say!("exec session: bad frame from the host: {e}");
                    self.send(&Message::Error(e.to_string()));
                    return Host::Gone;
                }
            }
        }
    }

    fn handle(&mut self, msg: Message) -> Host {
        match msg {
            Message::Stdin(data) => {
                if self.streams.input.is_some() && !self.stdin_eof {
                    self.pending.extend_from_slice(&data);
                    // Try right away: usually the program is waiting.
                    self.write_input();
                }
            }
            Message::StdinEof => {
                self.stdin_eof = true;
                self.write_input();
            }
            Message::Resize { rows, cols } => {
                if let Some(master) = &self.streams.master {
                    if let Err(e) = pty::set_size(master, rows, cols) {
                        crate::say!("resize failed: {e}");
                    }
                }
            }
            Message::Signal(sig) => sys::kill_group(self.watch.pid, sig),
            other => {
                let why = format!("unexpected {} during Exec", other.name());
                return self.send(&Message::Error(why));
            }
        }
        Host::Continue
    }

    /// After the exit: forward what output is left, without waiting on a
    /// background process that keeps the pipes open.
    fn drain(&mut self, buf: &mut [u8]) -> Host {
        let deadline = Instant::now() + DRAIN_MAX;
        while Instant::now() < deadline {
            let mut fds: Vec<libc::pollfd> = Vec::new();
            let mut which = Vec::new();
            for (i, (fd, _)) in self.streams.outputs.iter().enumerate() {
                if let Some(fd) = fd {
                    fds.push(sys::pollfd(fd.as_raw_fd(), libc::POLLIN));
                    which.push(i);
                }
            }
            if fds.is_empty() {
                break;
            }
            match sys::poll(&mut fds, Some(DRAIN_QUIET)) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            for (pfd, &i) in fds.iter().zip(&which) {
                if pfd.revents != 0 {
                    if let Host::Gone = self.read_output(i, buf) {
                        return Host::Gone;
                    }
                }
            }
        }
        Host::Continue
    }

    /// The host is gone: hang the program up like a terminal would, kill
    /// it if it does not go, and stop tracking it.
    fn hang_up(&mut self) -> proto::Result<()> {
        let _ = self.conn.flush();
        let pid = self.watch.pid;
        let reaper = &self.ctx.reaper;
        if reaper.take(&self.watch).is_none() {
            sys::kill_group(pid, libc::SIGHUP);
            sys::kill_group(pid, libc::SIGCONT);
            if reaper.wait_timeout(&self.watch, HANGUP_GRACE).is_none() {
                sys::kill_group(pid, libc::SIGKILL);
                let _ = reaper.wait_timeout(&self.watch, HANGUP_GRACE);
            }
        }
        reaper.forget(&self.watch);
        self.done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Tty;

    fn account() -> Account {
        Account {
            name: "root".into(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: "/root".into(),
            shell: "/bin/bash".into(),
        }
    }

    #[test]
    fn boot_env_keeps_command_line_variables_only() {
        let vars = [
            ("HOME", "/"),
            ("TERM", "linux"),
            ("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX"),
            ("GODEBUG", "cpu.avx=off"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = boot_env_from(vars.into_iter());
        let names: Vec<_> = env.iter().map(|(k, _)| k.to_str().unwrap()).collect();
        assert_eq!(names, ["GLIBC_TUNABLES", "GODEBUG"]);
    }

    #[test]
    fn environment_defaults_and_overrides() {
        let req = ExecRequest {
            env: vec![(b"PATH".to_vec(), b"/x".to_vec()), (b"FOO".to_vec(), b"bar".to_vec())],
            tty: Some(Tty {
                rows: 1,
                cols: 1,
                term: "xterm".into(),
            }),
            ..Default::default()
        };
        let env = environment(&req, &account());
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
        };
        assert_eq!(get("PATH").as_deref(), Some("/x"));
        assert_eq!(get("FOO").as_deref(), Some("bar"));
        assert_eq!(get("TERM").as_deref(), Some("xterm"));
        assert_eq!(get("SHELL").as_deref(), Some("/bin/bash"));
        assert_eq!(get("USER").as_deref(), Some("root"));
        let dev = Account {
            name: "dev".into(),
            uid: 1234,
            gid: 1234,
            groups: vec![1234],
            home: "/home/dev".into(),
            shell: "/bin/sh".into(),
        };
        let env = environment(&ExecRequest::default(), &dev);
        let has = |k: &str, v: &str| env.iter().any(|(n, x)| n == k && x == v);
        assert!(has("USER", "dev") && has("LOGNAME", "dev") && has("HOME", "/home/dev") && has("SHELL", "/bin/sh"));
        assert_eq!(env.iter().filter(|(n, _)| n == "PATH").count(), 1);
        let plain = environment(&ExecRequest::default(), &account());
        assert!(!plain.iter().any(|(n, _)| n == "TERM"));
    }

    #[test]
    fn cwd_choice() {
        assert_eq!(
            resolve_cwd(Some(b"/tmp"), None, "/root").unwrap(),
            PathBuf::from("/tmp")
        );
        assert_eq!(
            resolve_cwd(Some(b"/no/such/dir"), None, "/").unwrap_err(),
            "cwd /no/such/dir: No such file or directory"
        );
        assert_eq!(resolve_cwd(None, Some("/tmp"), "/root").unwrap(), PathBuf::from("/tmp"));
        assert_eq!(
            resolve_cwd(None, Some("/no/such"), "/tmp").unwrap(),
            PathBuf::from("/tmp")
        );
        assert_eq!(resolve_cwd(None, None, "/no/such").unwrap(), PathBuf::from("/"));
    }

    #[test]
    fn login_shell_argv0() {
        let (cmd, name) = command(&ExecRequest::default(), &account());
        assert_eq!(cmd.get_program(), "/bin/bash");
        assert_eq!(name, "/bin/bash");
    }
}
