//! The agent binary on the host: `--listen unix:<path>`, driven through the
//! protocol like the host's `mvm` drives it over vsock.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mvm_agent::proto::{self, ExecRequest, ExitStatus, Message, Tty, VERSION};

struct Agent {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Agent {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mvm-agent-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        // MVM_AGENT_BIN: test another build (the static guest binary).
        let bin = std::env::var_os("MVM_AGENT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_mvm-agent").into());
        let child = Command::new(bin)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "agent did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent { child, dir, sock }
    }

    /// A connection without the handshake.
    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// A connection after the handshake.
    fn connect(&self) -> UnixStream {
        let mut s = self.raw();
        let software = proto::hello(&mut s, "agent-test").unwrap();
        assert!(software.starts_with("mvm-agent "), "{software}");
        s
    }

    fn request(&self, msg: Message) -> Message {
        let mut s = self.connect();
        proto::write_message(&mut s, &msg).unwrap();
        proto::read_message(&mut s).unwrap()
    }

    fn exec(&self, req: ExecRequest) -> UnixStream {
        let mut s = self.connect();
        proto::write_message(&mut s, &Message::Exec(req)).unwrap();
        s
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn argv(args: &[&str]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}

fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv(args),
        ..Default::default()
    }
}

fn tty_cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv(args),
        tty: Some(Tty {
            rows: 24,
            cols: 80,
            term: "xterm".into(),
        }),
        ..Default::default()
    }
}

#[derive(Debug, Default)]
struct Outcome {
    started: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<ExitStatus>,
}

impl Outcome {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Read frames until `Exited` (then check the connection closes).
fn collect(s: &mut UnixStream) -> Outcome {
    let mut o = Outcome::default();
    loop {
        match proto::read_message(s).unwrap() {
            Message::Started { pid } => {
                assert!(o.started.is_none() && o.stdout.is_empty());
                o.started = Some(pid);
            }
            Message::Stdout(d) => {
                assert!(d.len() <= proto::MAX_CHUNK);
                o.stdout.extend(d)
            }
            Message::Stderr(d) => o.stderr.extend(d),
            Message::Exited { status, .. } => {
                o.status = Some(status);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(proto::read_message(s), Err(proto::Error::Closed)));
    o
}

fn run(agent: &Agent, req: ExecRequest) -> Outcome {
    collect(&mut agent.exec(req))
}

/// Read frames until the output so far contains `want`; returns it.
fn expect_output(s: &mut UnixStream, want: &str) -> String {
    let mut out = Vec::new();
    loop {
        match proto::read_message(s).unwrap() {
            Message::Started { .. } => {}
            Message::Stdout(d) | Message::Stderr(d) => {
                out.extend(d);
                if String::from_utf8_lossy(&out).contains(want) {
                    return String::from_utf8_lossy(&out).into_owned();
                }
            }
            other => panic!(
                "waiting for {want:?} in {:?}: got {other:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

fn started(s: &mut UnixStream) -> u32 {
    match proto::read_message(s).unwrap() {
        Message::Started { pid } => pid,
        other => panic!("expected Started, got {other:?}"),
    }
}

#[test]
fn info_reports_pid_and_mounts() {
    let agent = Agent::start();
    let Message::InfoReply(info) = agent.request(Message::Info) else {
        panic!("no InfoReply");
    };
    assert_eq!(info.pid, agent.child.id());
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(info.mounts.iter().any(|m| m.target == "/"), "{:?}", info.mounts);
    assert!(info.uptime_ms > 0);
    assert!(info.clock_unix_ns > 1_600_000_000_000_000_000);
    assert!(!info.hostname.is_empty());
}

#[test]
fn power_and_odd_requests_are_refused_off_init() {
    let agent = Agent::start();
    let Message::Error(e) = agent.request(Message::Power(proto::PowerAction::Poweroff)) else {
        panic!("power accepted");
    };
    assert!(e.contains("not init"), "{e}");
    assert!(matches!(agent.request(Message::Ok), Message::Error(_)));
    // The kernel refuses times before the epoch (a valid time would set
    // the host's clock when the tests run as root).
    let Message::Error(e) = agent.request(Message::SetClock {
        unix_ns: -5_000_000_000,
    }) else {
        panic!("clock set before the epoch");
    };
    assert!(e.starts_with("cannot set the clock: "), "{e}");
    assert!(matches!(agent.request(Message::StdinEof), Message::Error(_)));
}

#[test]
fn exec_echo() {
    let agent = Agent::start();
    let o = run(&agent, cmd(&["echo", "hi"]));
    assert!(o.started.is_some_and(|p| p > 1));
    assert_eq!(o.out(), "hi\n");
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
}

#[test]
fn exec_separates_stdout_and_stderr() {
    let agent = Agent::start();
    let o = run(&agent, cmd(&["sh", "-c", "echo out; echo err >&2; exit 3"]));
    assert_eq!(o.out(), "out\n");
    assert_eq!(o.err(), "err\n");
    assert_eq!(o.status, Some(ExitStatus::Code(3)));
}

#[test]
fn exec_pipes_stdin() {
    let agent = Agent::start();
    let mut s = agent.exec(cmd(&["cat"]));
    proto::write_message(&mut s, &Message::Stdin(b"hello".to_vec())).unwrap();
    proto::write_message(&mut s, &Message::StdinEof).unwrap();
    let o = collect(&mut s);
    assert_eq!(o.out(), "hello");
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
}

#[test]
fn exec_large_stdin_is_flow_controlled() {
    let agent = Agent::start();
    let mut s = agent.exec(cmd(&["wc", "-c"]));
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; proto::MAX_CHUNK];
        for _ in 0..(4 << 20) / proto::MAX_CHUNK {
            proto::write_message(&mut w, &Message::Stdin(chunk.clone())).unwrap();
        }
        proto::write_message(&mut w, &Message::StdinEof).unwrap();
    });
    let o = collect(&mut s);
    writer.join().unwrap();
    assert_eq!(o.out().trim(), "4194304");
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
}

#[test]
fn large_output_is_chunked() {
    let agent = Agent::start();
    let o = run(&agent, cmd(&["head", "-c", "1000000", "/dev/zero"]));
    assert_eq!(o.stdout.len(), 1_000_000);
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
}

#[test]
fn command_not_found_is_127() {
    let agent = Agent::start();
    let o = run(&agent, cmd(&["no-such-command-xyz", "arg"]));
    assert_eq!(o.started, None);
    assert!(
        o.err().contains("no-such-command-xyz: command not found"),
        "{}",
        o.err()
    );
    assert_eq!(o.status, Some(ExitStatus::Code(127)));
}

#[test]
fn not_executable_is_126() {
    let agent = Agent::start();
    let file = agent.dir.join("not-executable");
    std::fs::write(&file, "echo hi\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&agent, cmd(&[file.to_str().unwrap()]));
    assert_eq!(o.started, None);
    assert!(o.err().contains("mvm-agent: "), "{}", o.err());
    assert_eq!(o.status, Some(ExitStatus::Code(126)));
}

#[test]
fn signal_reaches_the_program() {
    let agent = Agent::start();
    let mut s = agent.exec(cmd(&["sleep", "100"]));
    started(&mut s);
    proto::write_message(&mut s, &Message::Signal(libc::SIGTERM)).unwrap();
    let o = collect(&mut s);
    assert_eq!(o.status, Some(ExitStatus::Signal(libc::SIGTERM)));
}

#[test]
fn env_and_cwd_from_the_request() {
    let agent = Agent::start();
    let o = run(
        &agent,
        ExecRequest {
            argv: argv(&[
                "sh",
                "-c",
                "pwd; printenv FOO; printenv USER; printenv TERM || echo no-term",
            ]),
            env: vec![(b"FOO".to_vec(), b"bar baz".to_vec())],
            cwd: Some(agent.dir.to_str().unwrap().as_bytes().to_vec()),
            tty: None,
            user: None,
        },
    );
    let dir = agent.dir.canonicalize().unwrap();
    assert_eq!(o.out(), format!("{}\nbar baz\nroot\nno-term\n", dir.display()));
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
}

#[test]
fn runs_as_the_named_user() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing users needs root");
        return;
    }
    let agent = Agent::start();
    // The host's own /etc/passwd: `nobody` is in every distribution.
    let o = run(
        &agent,
        ExecRequest {
            argv: argv(&["sh", "-c", "id -un; id -u; id -G; echo $USER $LOGNAME $HOME"]),
            cwd: Some(b"/".to_vec()),
            user: Some("nobody".into()),
            ..Default::default()
        },
    );
    assert_eq!(o.status, Some(ExitStatus::Code(0)), "{}", o.out());
    let out = o.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["nobody", "65534"], "{out}");
    assert!(!lines[2].split(' ').any(|g| g == "0"), "root's group kept: {out}");
    assert!(lines[3].starts_with("nobody nobody /"), "{out}");
    // With a terminal too (the PTY is handed to the user).
    let o = run(
        &agent,
        ExecRequest {
            argv: argv(&["sh", "-c", "id -u; stat -c %u $(tty)"]),
            cwd: Some(b"/".to_vec()),
            user: Some("nobody".into()),
            ..tty_cmd(&[])
        },
    );
    assert_eq!(o.out().replace('\r', ""), "65534\n65534\n");
    let mut s = agent.exec(ExecRequest {
        argv: argv(&["true"]),
        user: Some("no-such-user-mvm".into()),
        ..Default::default()
    });
    let Message::Error(e) = proto::read_message(&mut s).unwrap() else {
        panic!("no error");
    };
    assert!(e.contains("no user \"no-such-user-mvm\""), "{e}");
}

#[test]
fn missing_cwd_is_an_error() {
    let agent = Agent::start();
    let mut s = agent.exec(ExecRequest {
        argv: argv(&["true"]),
        cwd: Some(b"/no/such/dir".to_vec()),
        ..Default::default()
    });
    let Message::Error(e) = proto::read_message(&mut s).unwrap() else {
        panic!("no error");
    };
    assert_eq!(e, "cwd /no/such/dir: No such file or directory");
}

#[test]
fn background_child_does_not_hold_the_exit() {
    let agent = Agent::start();
    let t = Instant::now();
    let o = run(&agent, cmd(&["sh", "-c", "sleep 30 & echo done"]));
    assert_eq!(o.out(), "done\n");
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn unread_stdin_does_not_block_the_exit() {
    let agent = Agent::start();
    let mut s = agent.exec(cmd(&["true"]));
    let chunk = vec![0u8; 1000];
    for _ in 0..100 {
        if proto::write_message(&mut s, &Message::Stdin(chunk.clone())).is_err() {
            break;
        }
    }
    let o = collect(&mut s);
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
}

fn process_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        // The agent reaps it; until then it is a zombie (state Z).
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) if stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')) => {}
            Ok(_) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn host_hangup_kills_the_program() {
    let agent = Agent::start();
    let mut s = agent.exec(cmd(&["sleep", "100"]));
    let pid = started(&mut s);
    drop(s);
    assert!(process_gone(pid, Duration::from_secs(5)));
    // One that ignores SIGHUP is killed after the grace time.
    let mut s = agent.exec(cmd(&["sh", "-c", "trap '' HUP; sleep 100; sleep 100"]));
    let pid = started(&mut s);
    std::thread::sleep(Duration::from_millis(200));
    drop(s);
    assert!(process_gone(pid, Duration::from_secs(6)));
    assert!(matches!(agent.request(Message::Info), Message::InfoReply(_)));
}

#[test]
fn tty_size_and_input() {
    let agent = Agent::start();
    let mut s = agent.exec(tty_cmd(&["sh", "-c", "stty size; read x; echo got:$x; exit 4"]));
    expect_output(&mut s, "24 80");
    proto::write_message(&mut s, &Message::Stdin(b"hello\n".to_vec())).unwrap();
    let o = collect(&mut s);
    assert!(o.out().contains("got:hello"), "{}", o.out());
    assert!(o.stderr.is_empty());
    assert_eq!(o.status, Some(ExitStatus::Code(4)));
}

#[test]
fn tty_resize_and_ctrl_c() {
    let agent = Agent::start();
    let mut s = agent.exec(tty_cmd(&["sh"]));
    proto::write_message(&mut s, &Message::Stdin(b"stty size\n".to_vec())).unwrap();
    expect_output(&mut s, "24 80");
    proto::write_message(&mut s, &Message::Resize { rows: 50, cols: 132 }).unwrap();
    proto::write_message(&mut s, &Message::Stdin(b"stty size\n".to_vec())).unwrap();
    expect_output(&mut s, "50 132");
    // Ctrl-C interrupts a foreground sleep; the shell carries on.
    proto::write_message(&mut s, &Message::Stdin(b"sleep 100; echo slept\n".to_vec())).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    proto::write_message(&mut s, &Message::Stdin(vec![0x03])).unwrap();
    proto::write_message(&mut s, &Message::Stdin(b"echo back:$((40+2))\n".to_vec())).unwrap();
    let out = expect_output(&mut s, "back:42");
    // (The terminal echoes the command line; the program's line is alone.)
    assert!(!out.lines().any(|l| l.trim() == "slept"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(10));
    proto::write_message(&mut s, &Message::Stdin(b"exit 3\n".to_vec())).unwrap();
    let o = collect(&mut s);
    assert_eq!(o.status, Some(ExitStatus::Code(3)));
}

#[test]
fn login_shell_when_argv_is_empty() {
    let agent = Agent::start();
    let mut s = agent.exec(ExecRequest {
        tty: Some(Tty {
            rows: 10,
            cols: 40,
            term: "dumb".into(),
        }),
        ..Default::default()
    });
    proto::write_message(&mut s, &Message::Stdin(b"echo $0 $TERM $HOME; exit 0\n".to_vec())).unwrap();
    let o = collect(&mut s);
    assert!(o.out().contains(" dumb "), "{}", o.out());
    assert!(o.out().lines().any(|l| l.starts_with('-')), "{}", o.out());
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
}

#[test]
fn hostile_frames_get_an_error_and_a_close() {
    let agent = Agent::start();
    let frames: Vec<Vec<u8>> = vec![
        vec![0xff, 0xff, 0xff, 0xff, 1],
        vec![1, 0, 0, 0, 0x55],
        vec![0, 0, 0, 0],
        vec![3, 0, 0, 0, 1, 1, 0],
    ];
    for frame in &frames {
        let mut s = agent.raw();
        s.write_all(frame).unwrap();
        let reply = proto::read_message(&mut s).unwrap();
        assert!(matches!(reply, Message::Error(_)), "{reply:?}");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    // After the handshake, as the request and inside an exec session.
    for frame in &frames {
        let mut s = agent.connect();
        s.write_all(frame).unwrap();
        assert!(matches!(proto::read_message(&mut s).unwrap(), Message::Error(_)));
        let mut s = agent.exec(cmd(&["sleep", "100"]));
        let pid = started(&mut s);
        s.write_all(frame).unwrap();
        assert!(matches!(proto::read_message(&mut s).unwrap(), Message::Error(_)));
        assert!(matches!(proto::read_message(&mut s), Err(proto::Error::Closed)));
        assert!(process_gone(pid, Duration::from_secs(5)));
    }
    // A half frame then a close.
    let mut s = agent.raw();
    s.write_all(&[10, 0, 0, 0, 1]).unwrap();
    drop(s);
    // An unexpected message inside a session is answered and ignored.
    let mut s = agent.exec(cmd(&["cat"]));
    started(&mut s);
    proto::write_message(&mut s, &Message::Info).unwrap();
    assert!(matches!(proto::read_message(&mut s).unwrap(), Message::Error(_)));
    proto::write_message(&mut s, &Message::Stdin(b"still here".to_vec())).unwrap();
    proto::write_message(&mut s, &Message::StdinEof).unwrap();
    assert_eq!(collect(&mut s).out(), "still here");
    // The agent still serves.
    assert!(matches!(agent.request(Message::Info), Message::InfoReply(_)));
}

#[test]
fn other_protocol_versions_are_refused() {
    let agent = Agent::start();
    let mut s = agent.raw();
    proto::write_message(
        &mut s,
        &Message::Hello {
            version: VERSION + 1,
            software: "future".into(),
        },
    )
    .unwrap();
    let Message::Error(e) = proto::read_message(&mut s).unwrap() else {
        panic!("no error");
    };
    assert!(e.contains(&format!("version {}", VERSION + 1)), "{e}");
    assert!(matches!(proto::read_message(&mut s), Err(proto::Error::Closed)));
    let mut s = agent.raw();
    proto::write_message(&mut s, &Message::Info).unwrap();
    assert!(matches!(proto::read_message(&mut s).unwrap(), Message::Error(_)));
}

#[test]
fn concurrent_sessions() {
    let agent = Agent::start();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let agent = &agent;
                scope.spawn(move || {
                    let o = run(agent, cmd(&["sh", "-c", &format!("sleep 0.{i}; echo {i}; exit {i}")]));
                    assert_eq!(o.out(), format!("{i}\n"));
                    assert_eq!(o.status, Some(ExitStatus::Code(i)));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

/// The agent's CPU time so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    // utime and stime: fields 14 and 15, counted after "pid (comm)" as 12 and 13.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn closed_stdin_and_output_do_not_spin() {
    let agent = Agent::start();
    let before = cpu_ticks(agent.child.id());
    let o = run(&agent, cmd(&["sh", "-c", "exec 0<&- 1>&- 2>&-; sleep 1"]));
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
    let tty = run(&agent, tty_cmd(&["sh", "-c", "exec 0<&- 1>&- 2>&-; sleep 1"]));
    assert_eq!(tty.status, Some(ExitStatus::Code(0)));
    let used = cpu_ticks(agent.child.id()) - before;
    assert!(used < 50, "the agent used {used} ticks over 2 s");
}

#[test]
fn tty_hangup_and_background_jobs() {
    let agent = Agent::start();
    let mut s = agent.exec(tty_cmd(&["sh"]));
    let pid = started(&mut s);
    proto::write_message(&mut s, &Message::Stdin(b"echo ready\n".to_vec())).unwrap();
    expect_output(&mut s, "ready\r\n");
    drop(s);
    assert!(process_gone(pid, Duration::from_secs(5)));
    // A background job keeping the terminal open does not hold the exit.
    let t = Instant::now();
    let o = run(&agent, tty_cmd(&["sh", "-c", "sleep 30 & echo done"]));
    assert!(o.out().contains("done"), "{}", o.out());
    assert_eq!(o.status, Some(ExitStatus::Code(0)));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
