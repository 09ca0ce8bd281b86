//! The agent client and `mvm exec`/`mvm shell` against the real guest
//! agent, run on the host (`mvm-agent --listen unix:<path>`) behind a
//! stand-in for the VMM's vsock socket (the `CONNECT <port>` / `OK`
//! handshake, then bytes both ways). Needs the `mvm-agent` binary of the
//! same profile (`cargo build --workspace --bins`); fails without it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mvm::agent::{AgentClient, ExecRequest, ExitStatus, Tty};

fn agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("mvm-agent");
    bin.exists().then_some(bin)
}

struct Rig {
    dir: PathBuf,
    agent: Child,
    /// The socket host programs use, as a VM's vsock.sock.
    vsock: PathBuf,
}

impl Rig {
    /// `vsock` in `dir`: a VMM stand-in forwarding port 1024 to a real agent.
    fn new(dir: &Path, vsock: PathBuf) -> Rig {
        let bin = agent_binary().expect("mvm-agent of this profile: build it first (cargo build --workspace --bins)");
        std::fs::create_dir_all(dir).unwrap();
        let agent_sock = dir.join("agent.sock");
        let agent = Command::new(bin)
            .arg("--listen")
            .arg(format!("unix:{}", agent_sock.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let began = Instant::now();
        while !agent_sock.exists() {
            assert!(began.elapsed() < Duration::from_secs(10), "the agent did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&vsock);
        let listener = UnixListener::bind(&vsock).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let agent_sock = agent_sock.clone();
                std::thread::spawn(move || relay(conn, &agent_sock));
            }
        });
        Rig {
            dir: dir.to_path_buf(),
            agent,
            vsock,
        }
    }

    fn client(&self) -> AgentClient {
        AgentClient::new(&self.vsock)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the VMM does for a host connection: read `CONNECT <port>`, join
/// the guest's listener, answer `OK <host port>`, then copy both ways.
fn relay(conn: UnixStream, agent_sock: &Path) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "CONNECT 1024\n");
    let agent = UnixStream::connect(agent_sock).unwrap();
    let mut conn_w = conn.try_clone().unwrap();
    conn_w.write_all(b"OK 1073741824\n").unwrap();
    let mut agent_r = agent.try_clone().unwrap();
    let mut agent_w = agent;
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut reader, &mut agent_w);
        let _ = agent_w.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut agent_r, &mut conn_w);
    let _ = conn_w.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "mvm-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

#[test]
fn client_against_the_real_agent() {
    let dir = temp_dir("agent");
    let rig = Rig::new(&dir, dir.join("vsock.sock"));
    let agent = rig.client();

    let info = agent.info().unwrap();
    assert!(!info.agent_version.is_empty());
    assert!(info.pid > 1);

    let out = agent
        .exec_output(&["sh", "-c", "echo out; echo err >&2; exit 7"])
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    // Input forwarded until its end, then the program's stdin closes.
    let session = agent
        .exec(ExecRequest {
            argv: vec![b"cat".to_vec()],
            ..Default::default()
        })
        .unwrap();
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let r = session
        .run(Some(std::io::Cursor::new(b"hello\n".repeat(20000))), &mut o, &mut e)
        .unwrap();
    assert_eq!(r.status, ExitStatus::Code(0));
    assert_eq!(o.len(), 6 * 20000);

    // A signal reaches the program.
    let session = agent
        .exec(ExecRequest {
            argv: vec![b"sleep".to_vec(), b"30".to_vec()],
            ..Default::default()
        })
        .unwrap();
    let control = session.control();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        control.signal(libc::SIGTERM).unwrap();
    });
    let r = session
        .run(None::<std::io::Empty>, &mut Vec::new(), &mut Vec::new())
        .unwrap();
    assert_eq!(r.status, ExitStatus::Signal(libc::SIGTERM));
    assert_eq!(r.status.shell_code(), 143);

    // A PTY: the program sees a terminal of the size asked for.
    let session = agent
        .exec(ExecRequest {
            argv: vec![
                b"sh".to_vec(),
                b"-c".to_vec(),
                b"stty size; test -t 0 && echo tty".to_vec(),
            ],
            tty: Some(Tty {
                rows: 33,
                cols: 101,
                term: "xterm".into(),
            }),
            ..Default::default()
        })
        .unwrap();
    let mut o = Vec::new();
    let r = session.run(None::<std::io::Empty>, &mut o, &mut Vec::new()).unwrap();
    assert_eq!(r.status, ExitStatus::Code(0));
    let text = String::from_utf8_lossy(&o);
    assert!(text.contains("33 101") && text.contains("tty"), "{text:?}");

    // A program that does not exist: 127 and the agent's message, as a
    // shell would; one that is not executable: 126.
    let o = agent.exec_output(&["/no/such/program"]).unwrap();
    assert_eq!(o.status, ExitStatus::Code(127));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/program"), "{o:?}");
    assert!(o.stdout.is_empty());
    let o = agent.exec_output(&["/etc/passwd"]).unwrap();
    assert_eq!(o.status, ExitStatus::Code(126), "{o:?}");
}

/// `mvm exec` and `mvm shell` on a VM that looks running: its pid file
/// locked by this test, its vsock.sock the stand-in.
#[test]
fn cli_exec_and_shell() {
    let dir = temp_dir("cli-exec");
    let state = dir.join("state");
    std::fs::create_dir_all(dir.join("proj")).unwrap();
    std::fs::write(dir.join("k"), b"k").unwrap();
    let mvm = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mvm"))
            .args(args)
            .env("MVM_STATE_DIR", &state)
            .env("MVM_KERNEL", dir.join("k"))
            .env("MVM_INITRD", dir.join("k"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    };
    let o = mvm(
        &[
            "create",
            "--no-image",
            "--no-network",
            "vm1",
            "--project",
            dir.join("proj").to_str().unwrap(),
        ],
        b"",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _rig = Rig::new(&dir.join("rig"), state.join("vm1/vsock.sock"));
    let _held = mvm::pidfile::PidFile::acquire(&state.join("vm1/vmm.pid")).unwrap();

    let o = mvm(&["exec", "vm1", "--", "cat"], b"hi\n");
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"hi\n");

    let o = mvm(&["exec", "vm1", "--", "sh", "-c", "echo e >&2; exit 3"], b"");
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(o.stderr, b"e\n");

    // Not on a terminal, shell still runs (24x80), reading commands from stdin.
    let o = mvm(&["shell", "vm1"], b"stty size\nexit 5\n");
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("24 80"));

    // On a terminal (script(1) provides one): raw mode, the terminal's
    // size, and the shell's status; the terminal settings come back.
    if Path::new("/usr/bin/script").exists() {
        let cmd = format!(
            "stty rows 40 cols 120; stty -g > {0}/before; {1} shell vm1; s=$?; stty -g > {0}/after; exit $s",
            dir.display(),
            env!("CARGO_BIN_EXE_mvm")
        );
        let o = mvm_script(&state, &cmd, b"stty size\nexit 6\n");
        assert_eq!(o.status.code(), Some(6), "{}", String::from_utf8_lossy(&o.stdout));
        assert!(String::from_utf8_lossy(&o.stdout).contains("40 120"));
        let before = std::fs::read_to_string(dir.join("before")).unwrap();
        assert_eq!(before, std::fs::read_to_string(dir.join("after")).unwrap());
    }

    let o = mvm(&["exec", "vm1", "-t", "--", "sh", "-c", "test -t 1 && echo tty"], b"");
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("tty"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run `cmd` under script(1), on a pseudo-terminal, with `input` typed.
fn mvm_script(state: &Path, cmd: &str, input: &[u8]) -> std::process::Output {
    let mut child = Command::new("script")
        .args(["-qefc", cmd, "/dev/null"])
        .env("MVM_STATE_DIR", state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Typed after the shell had time to start, like a person would.
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(input).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    drop(stdin);
    child.wait_with_output().unwrap()
}
