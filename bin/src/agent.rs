//! Client of the guest agent: one request per connection over the VM's
//! vsock Unix socket (Firecracker's host protocol: `CONNECT <port>\n`,
//! answered `OK <host port>\n`), then the [`mvm_agent::proto`] messages.
//!
//! ```no_run
//! use mvm::agent::AgentClient;
//! # fn main() -> mvm::Result<()> {
//! let agent = AgentClient::new("/var/lib/microvm-dev/web/vsock.sock");
//! let out = agent.exec_output(&["uname", "-r"])?;
//! println!("{} (status {:?})", String::from_utf8_lossy(&out.stdout), out.status);
//! # Ok(())
//! # }
//! ```

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mvm_agent::proto::{self, Message, MAX_CHUNK};
pub use mvm_agent::proto::{ExecRequest, ExitStatus, Info, Mount, PowerAction, Tty, AGENT_PORT};

use crate::{Error, Result};

/// How long a request waits for the agent's answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Exec` waits for `Started`, at least: the agent answers once
/// the program runs, and a busy guest whose caches were dropped may take
/// many seconds to load it (on hosts where its kernel is interpreted).
pub const EXEC_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The software name this side sends in its `Hello`.
fn software() -> String {
    format!("mvm {}", env!("CARGO_PKG_VERSION"))
}

/// Where a VM's agent is: its vsock socket, port and the time limit for
/// connecting and for answers. Each request opens a fresh connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub uds: PathBuf,
    pub port: u32,
    pub timeout: Duration,
}

impl AgentClient {
    /// The agent behind `vsock_uds` on [`AGENT_PORT`], [`DEFAULT_TIMEOUT`].
    pub fn new(vsock_uds: impl Into<PathBuf>) -> Self {
        AgentClient {
            uds: vsock_uds.into(),
            port: AGENT_PORT,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Open one connection: connect, `CONNECT <port>`, `Hello` exchange.
    pub fn connect(vsock_uds: &Path, port: u32, timeout: Duration) -> Result<AgentConnection> {
        match proto::connect_vsock(vsock_uds, port, timeout, &software()) {
            Ok((stream, peer)) => Ok(AgentConnection { stream, peer }),
            Err(proto::Error::Handshake(what)) => Err(Error::Agent { what, source: None }),
            Err(e) => Err(Error::agent("hello")(e)),
        }
    }

    /// Open one connection with this client's settings.
    pub fn open(&self) -> Result<AgentConnection> {
        Self::connect(&self.uds, self.port, self.timeout)
    }

    /// The guest's state.
    pub fn info(&self) -> Result<Info> {
        self.open()?.info()
    }

    /// Power the guest off or reboot it.
    pub fn power(&self, action: PowerAction) -> Result<()> {
        self.open()?.power(action)
    }

    /// Set the guest's wall clock.
    pub fn set_clock(&self, unix_ns: i64) -> Result<()> {
        self.open()?.set_clock(unix_ns)
    }

    /// Set the guest's wall clock to the host's.
    pub fn sync_clock(&self) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        self.set_clock(now)
    }

    /// Start a program; see [`ExecSession`].
    pub fn exec(&self, request: ExecRequest) -> Result<ExecSession> {
        self.open()?.exec(request)
    }

    /// Have the agent run `specs` (those it does not run yet; an empty
    /// list only asks) and report every service's state.
    pub fn services(&self, specs: Vec<proto::ServiceSpec>) -> Result<Vec<proto::ServiceState>> {
        self.open()?.services(specs)
    }

    /// Run a program without input and collect its output.
    pub fn exec_output<S: AsRef<[u8]>>(&self, argv: &[S]) -> Result<Output> {
        let session = self.exec(ExecRequest {
            argv: argv.iter().map(|a| a.as_ref().to_vec()).collect(),
            ..Default::default()
        })?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let result = session.run(None::<std::io::Empty>, &mut stdout, &mut stderr)?;
        Ok(Output {
            status: result.status,
            stdout,
            stderr,
        })
    }
}

/// A program's status and collected output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// How an exec session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecResult {
    pub status: ExitStatus,
    /// Guest-side time from the request to the exit.
    pub elapsed_us: u64,
}

/// One connection to the agent after the `Hello` exchange; it carries one
/// request.
#[derive(Debug)]
pub struct AgentConnection {
    stream: UnixStream,
    peer: String,
}

impl AgentConnection {
    /// The agent's software name and version from its `Hello`.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn request(mut self, msg: &Message, what: &str) -> Result<Message> {
        proto::write_message(&mut self.stream, msg).map_err(Error::agent(format!("sending {what}")))?;
        match proto::read_message(&mut self.stream)
            .map_err(Error::agent(format!("waiting for the answer to {what}")))?
        {
            Message::Error(e) => Err(Error::Remote(e)),
            m => Ok(m),
        }
    }

    /// Have the agent replay changes to share `tag` (see `FsEvents`), so
    /// that the guest's caches and file watchers follow them.
    pub fn fs_events(self, tag: &str, changes: Vec<proto::FsChange>) -> Result<()> {
        let msg = Message::FsEvents {
            tag: tag.into(),
            changes,
        };
        match self.request(&msg, "FsEvents")? {
            Message::Ok => Ok(()),
            other => Err(Self::unexpected("Ok", &other)),
        }
    }

    fn unexpected(expected: &str, got: &Message) -> Error {
        Error::Agent {
            what: format!("expected {expected}, the agent sent {}", got.name()),
            source: None,
        }
    }

    /// See [`AgentClient::services`].
    pub fn services(self, specs: Vec<proto::ServiceSpec>) -> Result<Vec<proto::ServiceState>> {
        match self.request(&Message::Services(specs), "Services")? {
            Message::ServicesReply(states) => Ok(states),
            m => Err(Self::unexpected("ServicesReply", &m)),
        }
    }

    /// The guest's state.
    pub fn info(self) -> Result<Info> {
        match self.request(&Message::Info, "Info")? {
            Message::InfoReply(info) => Ok(info),
            m => Err(Self::unexpected("InfoReply", &m)),
        }
    }

    /// Power the guest off or reboot it (answered before it goes down).
    pub fn power(self, action: PowerAction) -> Result<()> {
        match self.request(&Message::Power(action), "Power")? {
            Message::Ok => Ok(()),
            m => Err(Self::unexpected("Ok", &m)),
        }
    }

    /// Set the guest wall clock.
    pub fn set_clock(self, unix_ns: i64) -> Result<()> {
        match self.request(&Message::SetClock { unix_ns }, "SetClock")? {
            Message::Ok => Ok(()),
            m => Err(Self::unexpected("Ok", &m)),
        }
    }

    /// Start a program; it runs once the agent answers `Started`. A
    /// program that cannot start (not found: 127, not executable: 126)
    /// still gives a session, whose `run` yields the agent's message on
    /// stderr and that status.
    pub fn exec(self, request: ExecRequest) -> Result<ExecSession> {
        let stream = self.stream.try_clone().map_err(Error::io("cloning the agent socket"))?;
        let current = stream.read_timeout().map_err(Error::io("agent socket timeout"))?;
        if current.is_some_and(|t| t < EXEC_START_TIMEOUT) {
            stream
                .set_read_timeout(Some(EXEC_START_TIMEOUT))
                .map_err(Error::io("agent socket timeout"))?;
        }
        let mut pending = std::collections::VecDeque::new();
        let pid = match self.request(&Message::Exec(request), "Exec")? {
            Message::Started { pid } => pid,
            m @ (Message::Stderr(_) | Message::Stdout(_) | Message::Exited { .. }) => {
                pending.push_back(m);
                0
            }
            m => return Err(Self::unexpected("Started", &m)),
        };
        // The program may run for hours: no time limits from here on.
        let clear = |s: &UnixStream| {
            s.set_read_timeout(None)?;
            s.set_write_timeout(None)
        };
        clear(&stream).map_err(Error::io("agent socket timeout"))?;
        let writer = stream.try_clone().map_err(Error::io("cloning the agent socket"))?;
        Ok(ExecSession {
            reader: stream,
            control: ExecControl {
                writer: Arc::new(Mutex::new(writer)),
            },
            pid,
            pending,
        })
    }
}

/// Sends input, resizes and signals to a running program, from any
/// thread. Each message is written whole under a lock, so frames of
/// different threads never interleave.
#[derive(Debug, Clone)]
pub struct ExecControl {
    writer: Arc<Mutex<UnixStream>>,
}

impl ExecControl {
    fn send(&self, msg: &Message) -> Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        proto::write_message(&mut *w, msg).map_err(Error::agent(format!("sending {}", msg.name())))
    }

    /// Input for the program (split into frames of at most 64 KiB).
    pub fn stdin(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(MAX_CHUNK) {
            self.send(&Message::Stdin(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Close the program's standard input.
    pub fn stdin_eof(&self) -> Result<()> {
        self.send(&Message::StdinEof)
    }

    /// The terminal's new size (sessions with a PTY).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        self.send(&Message::Resize { rows, cols })
    }

    /// Deliver a signal to the program's process group.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.send(&Message::Signal(signal))
    }
}

/// A running program in the guest.
///
/// [`ExecSession::run`] pumps its output until it exits; meanwhile an
/// [`ExecControl`] (from [`ExecSession::control`], taken before `run`)
/// sends resizes and signals from other threads.
#[derive(Debug)]
pub struct ExecSession {
    reader: UnixStream,
    control: ExecControl,
    /// 0 when the program could not be started.
    pid: u32,
    /// Messages that arrived in place of `Started`.
    pending: std::collections::VecDeque<Message>,
}

impl ExecSession {
    /// The program's pid in the guest (0 when it could not be started).
    pub fn guest_pid(&self) -> u32 {
        self.pid
    }

    /// A handle for input, resizes and signals.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// Run the session to its end: `stdin` (if any) is forwarded by a
    /// thread until its end-of-file, then the program's stdin is closed
    /// (with `None` it is closed at once); output goes to `stdout` and
    /// `stderr` (with a PTY everything comes as stdout) as it arrives.
    /// Returns when the program exited and all its output was written.
    ///
    /// The stdin thread is not joined: a reader that blocks (a terminal)
    /// keeps it alive after the program ended, until its next read returns.
    pub fn run<R: Read + Send + 'static>(
        mut self,
        stdin: Option<R>,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExecResult> {
        match stdin {
            // Nothing to send to a program that never started.
            _ if self.pid == 0 => {}
            None => self.control.stdin_eof()?,
            Some(mut input) => {
                let control = self.control.clone();
                std::thread::Builder::new()
                    .name("exec-stdin".into())
                    .spawn(move || {
                        let mut buf = vec![0u8; MAX_CHUNK];
                        loop {
                            match input.read(&mut buf) {
                                Ok(0) => {
                                    let _ = control.stdin_eof();
                                    return;
                                }
                                Ok(n) => {
                                    if control.stdin(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(_) => {
                                    let _ = control.stdin_eof();
                                    return;
                                }
                            }
                        }
                    })
                    .map_err(Error::io("starting the stdin thread"))?;
            }
        }
        loop {
            if let Some(msg) = self.pending.pop_front() {
                if let Some(result) = self.deliver(msg, stdout, stderr)? {
                    return Ok(result);
                }
                continue;
            }
            let msg = proto::read_message(&mut self.reader).map_err(|e| match e {
                proto::Error::Closed => Error::Agent {
                    what: "the connection closed before the program exited (did the VM stop?)".into(),
                    source: None,
                },
                e => Error::agent("reading the program's output")(e),
            })?;
            if let Some(result) = self.deliver(msg, stdout, stderr)? {
                return Ok(result);
            }
        }
    }

    /// Write out one message of the session; the result once it ends.
    fn deliver(&self, msg: Message, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<Option<ExecResult>> {
        match msg {
            Message::Stdout(d) => stdout
                .write_all(&d)
                .and_then(|()| stdout.flush())
                .map_err(Error::io("writing output"))?,
            Message::Stderr(d) => stderr
                .write_all(&d)
                .and_then(|()| stderr.flush())
                .map_err(Error::io("writing output"))?,
            Message::Exited { status, elapsed_us } => return Ok(Some(ExecResult { status, elapsed_us })),
            Message::Error(e) => return Err(Error::Remote(e)),
            m => return Err(AgentConnection::unexpected("program output or Exited", &m)),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A vsock socket whose VMM answers the handshake with `reply` (or
    /// closes without answering, as when no guest program listens).
    fn vmm_answering(reply: &'static [u8]) -> (PathBuf, std::thread::JoinHandle<Vec<u8>>) {
        let dir = std::env::temp_dir().join(format!("mvm-agent-{}-{}", std::process::id(), reply.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = [0u8; 13];
            s.read_exact(&mut got).unwrap();
            s.write_all(reply).unwrap();
            got.to_vec()
        });
        (path, t)
    }

    #[test]
    fn handshake_failures_are_errors() {
        let missing = std::env::temp_dir().join("mvm-agent-missing.sock");
        let e = AgentClient::connect(&missing, AGENT_PORT, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("is the VM running?"), "{e}");

        let (path, t) = vmm_answering(b"");
        let e = AgentClient::connect(&path, AGENT_PORT, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("no answer on vsock port 1024"), "{e}");
        assert_eq!(t.join().unwrap(), b"CONNECT 1024\n");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());

        let (path, t) = vmm_answering(b"NOPE\n");
        let e = AgentClient::connect(&path, AGENT_PORT, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("instead of `OK <port>`"), "{e}");
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
