//! The manager's latencies with the test guest (agent as PID 1), each with
//! its host-side share:
//!
//! - `mvm start` to agent-ready, and the part of it outside the guest's own
//!   uptime clock when the agent answered: spawning `mvm-vmm`, building the
//!   VM, the guest kernel's early boot before its clock starts, and the
//!   manager's 200 ms polling. (The VMM's own process cycle is in
//!   `trivial_cycle`: milliseconds.)
//! - `mvm exec vm -- true`: the CLI process (median of 100), and the same
//!   round trip through the library; host share = round trip minus the
//!   guest-side time the agent reports (fork, exec, wait in the guest).
//! - `mvm shell` keystroke echo: one byte to the guest's PTY and its echo
//!   back; host share = the same round trip through the same agent on the
//!   host (`mvm-agent --listen unix:`), i.e. everything but the VM.
//!
//! Caveat for PVM development hosts: the guest kernel is interpreted (about
//! 1.5 M instructions/s), so fork/exec and PTY echo cost the guest tens of
//! milliseconds; on VMX/SVM hosts they cost microseconds.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mvm::agent::{ExecRequest, ExitStatus, Tty};
use mvm::{CreateOptions, Manager, StartOptions, StartOutcome};
use mvm_agent::proto::{self, Message, AGENT_PORT};
use mvm_benches::{cli_exec_true, report, Row};
use mvm_tests::{guest_file, mvm_vmm, scratch_dir, workspace_bin};

fn env_count(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A PTY session to `stream` (already past any vsock handshake): start
/// `sh`, then time single keystrokes until each one's echo comes back.
fn keystroke_echo<S: Read + Write>(mut stream: S, keys: usize) -> Vec<f64> {
    proto::hello(&mut stream, "mvm-bench").expect("hello");
    let exec = Message::Exec(ExecRequest {
        argv: vec![b"/bin/sh".to_vec()],
        tty: Some(Tty {
            rows: 24,
            cols: 200,
            term: "dumb".into(),
        }),
        ..Default::default()
    });
    proto::write_message(&mut stream, &exec).expect("exec");
    match proto::read_message(&mut stream).expect("answer") {
        Message::Started { .. } => {}
        other => panic!("shell did not start: {other:?}"),
    }
    // Wait until the shell has printed its prompt (and so set up its line
    // editing): ask it to print a marker and wait for it.
    proto::write_message(&mut stream, &Message::Stdin(b"echo READY-$((40+2))\n".to_vec())).unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("READY-42") {
        match proto::read_message(&mut stream).expect("shell output") {
            Message::Stdout(d) => seen.extend(d),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Let the prompt arrive too.
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::new();
    for i in 0..keys {
        let key = b'a' + (i % 26) as u8;
        let t = Instant::now();
        proto::write_message(&mut stream, &Message::Stdin(vec![key])).unwrap();
        loop {
            match proto::read_message(&mut stream).expect("echo") {
                Message::Stdout(d) if d.contains(&key) => break,
                Message::Stdout(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        times.push(ms(t.elapsed()));
    }
    // Ctrl-U drops the typed line, then leave.
    proto::write_message(&mut stream, &Message::Stdin(b"\x15exit 0\n".to_vec())).unwrap();
    loop {
        match proto::read_message(&mut stream) {
            Ok(Message::Exited { .. }) | Err(_) => break,
            Ok(_) => {}
        }
    }
    times
}

/// Connect to a VM's agent through its vsock socket.
fn vsock_stream(uds: &Path) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect vsock.sock");
    s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte).expect("OK line");
        line.push(byte[0]);
    }
    assert!(line.starts_with(b"OK "), "{}", String::from_utf8_lossy(&line));
    s
}

/// `true` through the library `runs` times: (round trip ms, guest ms).
fn exec_true(client: &mvm::agent::AgentClient, runs: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut total, mut guest) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let session = client
            .exec(ExecRequest {
                argv: vec![b"true".to_vec()],
                ..Default::default()
            })
            .expect("exec true");
        let r = session
            .run(None::<std::io::Empty>, &mut std::io::sink(), &mut std::io::sink())
            .expect("run true");
        total.push(ms(t.elapsed()));
        assert_eq!(r.status, ExitStatus::Code(0));
        guest.push(r.elapsed_us as f64 / 1000.0);
    }
    (total, guest)
}

fn main() {
    let boots = env_count("MVM_BENCH_BOOT_RUNS", 3);
    let execs = env_count("MVM_BENCH_RUNS", 100);
    let keys = env_count("MVM_BENCH_KEYS", 50);
    let dir = scratch_dir("bench-manager");
    std::env::set_var("MVM_VMM", mvm_vmm());
    let manager = Manager::new(dir.join("state"));
    let project = dir.join("project");
    std::fs::create_dir_all(&project).unwrap();
    manager
        .create(&CreateOptions {
            name: "bench".into(),
            project: Some(project.clone()),
            cpus: Some(1),
            memory_mib: Some(128),
            kernel: Some(guest_file("vmlinux")),
            initrd: Some(guest_file("initramfs.cpio")),
            root: mvm::manager::RootChoice::Initramfs,
            network: mvm::manager::NetworkChoice::None,
            ..Default::default()
        })
        .expect("create");

    // Start to agent-ready, `boots` times.
    let (mut ready, mut host_share) = (Vec::new(), Vec::new());
    for i in 0..boots {
        let outcome = manager
            .start(
                "bench",
                &mut StartOptions {
                    timeout: Duration::from_secs(900),
                    progress: None,
                },
            )
            .expect("start");
        let StartOutcome::Started { ready_after, info } = outcome else {
            panic!("bench VM was already running")
        };
        ready.push(ready_after.as_secs_f64());
        host_share.push(ready_after.as_secs_f64() - info.uptime_ms as f64 / 1000.0);
        if i + 1 < boots {
            manager.stop("bench", Duration::from_secs(120)).expect("stop");
        }
    }

    // exec true: the CLI, then the library.
    let cli = cli_exec_true(&workspace_bin("mvm"), manager.root(), "bench", execs);
    let client = manager.agent("bench").expect("agent client");
    let (lib_total, lib_guest) = exec_true(&client, execs);
    let lib_host: Vec<f64> = lib_total.iter().zip(&lib_guest).map(|(t, g)| t - g).collect();

    // Keystroke echo in the VM.
    let vm_keys = keystroke_echo(vsock_stream(&manager.vm_dir("bench").join("vsock.sock")), keys);
    manager.stop("bench", Duration::from_secs(120)).expect("stop");

    // The same agent on the host, no VM: the host-side share.
    let sock = dir.join("host-agent.sock");
    let mut agent = Command::new(workspace_bin("mvm-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("host agent");
    let began = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(began.elapsed() < Duration::from_secs(10), "host agent did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let host_keys = keystroke_echo(UnixStream::connect(&sock).unwrap(), keys);
    let _ = agent.kill();
    let _ = agent.wait();

    let row = Row::plain;
    report(
        "manager",
        "mvm start to agent-ready, exec round trip, PTY keystroke echo; 1 vCPU, 128 MiB test guest; PVM hosts interpret the guest kernel",
        &[
            row("start to agent-ready", "s", &ready),
            row("  outside guest uptime", "s", &host_share),
            row("mvm exec -- true (CLI)", "ms", &cli),
            row("exec true (library)", "ms", &lib_total),
            row("  guest share (fork/exec/wait)", "ms", &lib_guest),
            row("  host + transport share", "ms", &lib_host),
            row("keystroke echo (VM)", "ms", &vm_keys),
            row("  host share (agent on host)", "ms", &host_keys),
        ],
    );
    let _ = manager.rm("bench", true);
    let _ = std::fs::remove_dir_all(&dir);
}
