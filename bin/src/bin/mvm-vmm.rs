//! `mvm-vmm run vm.toml`: boot the VM a file describes and exit with a
//! status that says how the guest ended.
//!
//! Exit status: 0 the guest powered off, 3 it rebooted, 4 it crashed,
//! 2 the configuration or a file it names is wrong, 1 any other error,
//! 128+N the VMM was stopped by signal N (SIGINT, SIGTERM, SIGHUP), 130 also
//! for Ctrl-A x on an interactive console.

use std::process::ExitCode;

use microvm_dev::privsep::{self, Handoff, VmmUser};
use microvm_dev::seccomp::ThreadKind;
use microvm_dev::{StopReason, Vm, VmConfig, VmExit};
use mvm::pidfile::{self, AcquireError, PidFile, Record};

const USAGE: &str = "usage: mvm-vmm run <vm.toml> [--pid-file <path>] [--restart-on-reboot] [--handoff <toml>]

Boots the VM described by <vm.toml> and runs it until the guest powers off,
reboots or crashes. The guest console is this terminal unless the file says
otherwise; on a terminal, Ctrl-A x stops the VM.

--pid-file <path>: lock <path> (flock) for the whole run and write
`running <pid> <start unix time>` to it, then at exit
`exited <status> <unix time> <reason>`; if another mvm-vmm holds the lock,
exit 1 (\"already running\"). `mvm` uses it to know whether a VM runs.

--restart-on-reboot: when the guest reboots, boot it again (re-reading
<vm.toml>) instead of exiting with status 3, as a machine would.

--handoff <toml>: descriptors and facts a privileged parent prepared
(/dev/kvm, TAPs, virtiofsd sockets, opened files; see microvm_dev::privsep).
Started as root with `[security] user` set, mvm-vmm prepares them itself,
runs the VM as that user with them, and cleans up when it ends.

exit status: 0 powered off, 3 rebooted, 4 crashed, 2 bad configuration,
1 other error, 128+N stopped by signal N.

environment: MVM_LOG=error|warn|info|debug|trace (default warn)";

const EXIT_CONFIG: u8 = 2;
const EXIT_REBOOT: u8 = 3;
const EXIT_CRASH: u8 = 4;
const EXIT_ESCAPE: u8 = 130;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("mvm-vmm: {}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_logging() {
    static LOGGER: StderrLogger = StderrLogger;
    let level = match std::env::var("MVM_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") => log::LevelFilter::Debug,
        Ok("trace") => log::LevelFilter::Trace,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Block the stop signals in every thread (the mask is inherited) and turn
/// them into a clean stop of whichever VM `handle` names, so the terminal
/// is restored and the exit status reported as for any other stop.
fn forward_stop_signals(
    handle: std::sync::Arc<std::sync::Mutex<microvm_dev::VmHandle>>,
    start: microvm_dev::seccomp::ThreadStart,
) -> std::sync::Arc<std::sync::atomic::AtomicI32> {
    let received = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let seen = received.clone();
    let confine = move || {
        if let Some(confine) = start {
            confine();
        }
    };
    let forwarded = mvm::term::forward_signals(&STOP_SIGNALS, confine, move |sig| {
        seen.store(sig, std::sync::atomic::Ordering::SeqCst);
        handle.lock().unwrap_or_else(|p| p.into_inner()).stop();
    });
    if let Err(e) = forwarded {
        log::warn!("cannot start the signal thread ({e}); Ctrl-C will kill the VMM abruptly");
    }
    received
}

/// Leave the VM's teardown to a child process: when this process exits,
/// the child still holds the VM's file descriptors, so KVM destroys the VM
/// (15-25 ms, mostly the in-kernel irqchip) after our exit status is
/// already with the caller. The child waits for our exit on a pipe, then
/// exits itself, which closes the last references.
fn detach_teardown(lock_fds: &[libc::c_int]) {
    let mut pipe = [0; 2];
    // SAFETY: pipe(2) into a two-element array.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return;
    }
    // SAFETY: the child only calls async-signal-safe functions (close,
    // read, _exit) before exiting, as required after fork in a
    // multi-threaded process.
    match unsafe { libc::fork() } {
        0 => unsafe {
            libc::close(pipe[1]);
            // The pid file's and the state directory's locks must end with
            // the VMM, not with the teardown: a start right after this
            // exit would find the VM still "running".
            for &fd in lock_fds {
                libc::close(fd);
            }
            let mut byte = 0u8;
            // Returns at end-of-file: the parent has exited.
            while libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1) > 0 {}
            libc::_exit(0);
        },
        _ => {
            // SAFETY: our copy of the read end is not needed; the write end
            // stays open until this process exits.
            unsafe { libc::close(pipe[0]) };
        }
    }
}

fn run(args: RunArgs<'_>) -> ExitCode {
    let RunArgs {
        path,
        pid_file: pid_path,
        restart_on_reboot,
        handoff,
    } = args;
    let config = match VmConfig::from_file(path) {
        Ok(c) => c,
        Err(e) => {
            mvm::report("mvm-vmm", &e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut handoff = match handoff.map(Handoff::from_arg).transpose() {
        Ok(h) => h,
        Err(e) => {
            mvm::report("mvm-vmm", &e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let switch_to = match handoff {
        Some(_) => None,
        None => match privsep::user_to_switch_to(&config) {
            Ok(user) => user,
            Err(e) => {
                mvm::report("mvm-vmm", &e);
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let mut pid_file = match pid_path.map(|p| PidFile::acquire(std::path::Path::new(p))) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(AcquireError::Locked(pid))) => {
            let pid = pid.map_or("unknown".to_string(), |p| p.to_string());
            eprintln!("mvm-vmm: error: VM {} is already running (pid {pid})", config.name);
            return ExitCode::from(1);
        }
        Some(Err(AcquireError::Io(e))) => {
            eprintln!(
                "mvm-vmm: error: cannot use the pid file {}: {e}",
                pid_path.unwrap_or_default()
            );
            return ExitCode::from(1);
        }
    };
    if let Some(user) = switch_to {
        return keep(path, pid_file, restart_on_reboot, &user, config);
    }
    let mut config = Some(config);
    let mut signals: Option<(std::sync::Arc<std::sync::Mutex<microvm_dev::VmHandle>>, _)> = None;
    loop {
        // After a reboot the file is read again, as a machine re-reads its
        // settings when it restarts.
        let rebooted = config.is_none() || handoff.as_ref().is_some_and(|h| h.rebooted);
        let mut config = match config.take().map_or_else(|| VmConfig::from_file(path), Ok) {
            Ok(c) => c,
            Err(e) => {
                mvm::report("mvm-vmm", &e);
                record_exit(&mut pid_file, EXIT_CONFIG, &e.to_string());
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        // A console file holds the whole run: after a reboot it is appended
        // to, not truncated, so the shutdown before the reboot stays there.
        if let (true, microvm_dev::ConsoleOutput::File(file)) = (rebooted, &config.console.output) {
            match std::fs::OpenOptions::new().append(true).open(file) {
                Ok(f) => config.console.output = microvm_dev::ConsoleOutput::Writer(Box::new(f)),
                Err(e) => log::warn!("cannot reopen {} to append: {e}; it starts over", file.display()),
            }
        }
        let mut vm = match Vm::with_handoff(config, handoff.take().unwrap_or_default()) {
            Ok(vm) => vm,
            Err(e) => {
                mvm::report("mvm-vmm", &e);
                let code = if e.is_config_error() { EXIT_CONFIG } else { 1 };
                record_exit(&mut pid_file, code, &e.to_string());
                return ExitCode::from(code);
            }
        };
        let signal = match &signals {
            None => {
                let slot = std::sync::Arc::new(std::sync::Mutex::new(vm.handle()));
                let signal = forward_stop_signals(slot.clone(), vm.thread_start(ThreadKind::Worker));
                signals = Some((slot, signal.clone()));
                signal
            }
            Some((slot, signal)) => {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = vm.handle();
                // A stop signal that came while no VM ran.
                if signal.load(std::sync::atomic::Ordering::SeqCst) != 0 {
                    vm.handle().stop();
                }
                signal.clone()
            }
        };
        let result = vm.run_once();
        if restart_on_reboot
            && matches!(result, Ok(VmExit::Reboot))
            && signal.load(std::sync::atomic::Ordering::SeqCst) == 0
        {
            eprintln!("mvm-vmm: the guest rebooted; booting it again");
            drop(vm);
            continue;
        }
        let lock_fds: Vec<libc::c_int> = pid_file
            .as_ref()
            .map(PidFile::raw_fd)
            .into_iter()
            .chain(vm.state_lock_fd())
            .collect();
        detach_teardown(&lock_fds);
        let (code, reason) = exit_code(result, &signal);
        record_exit(&mut pid_file, code, &reason);
        // Exit without dropping `vm`: the child finishes the teardown.
        std::process::exit(i32::from(code));
    }
}

/// Run the VM as `user`: prepare what needs root ([`privsep::prepare`]),
/// start this program as `user` with the handoff, pass stop signals on to
/// it, keep the managed networks whole while it runs, undo the
/// preparation when it ends, and boot again after a guest reboot when
/// asked to. This process reads no guest input.
fn keep(
    path: &str,
    mut pid_file: Option<PidFile>,
    restart_on_reboot: bool,
    user: &VmmUser,
    first: VmConfig,
) -> ExitCode {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::Arc;
    let child_pid = Arc::new(AtomicI32::new(0));
    let signal = Arc::new(AtomicI32::new(0));
    {
        let (child_pid, signal) = (child_pid.clone(), signal.clone());
        let forwarded = mvm::term::forward_signals(
            &STOP_SIGNALS,
            || {},
            move |sig| {
                signal.store(sig, Ordering::SeqCst);
                let pid = child_pid.load(Ordering::SeqCst);
                if pid > 0 {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid, sig) };
                }
            },
        );
        if let Err(e) = forwarded {
            log::warn!("cannot start the signal thread ({e}); a stop signal ends the VMM abruptly");
        }
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let mut next = Some(first);
    let mut rebooted = false;
    loop {
        let config = match next.take().map_or_else(|| VmConfig::from_file(path), Ok) {
            Ok(c) => c,
            Err(e) => return fail(&mut pid_file, &e),
        };
        let mut prepared = match privsep::prepare(&config, user) {
            Ok(p) => p,
            Err(e) => return fail(&mut pid_file, &e),
        };
        prepared.handoff.rebooted = rebooted;
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("run").arg(path).arg("--handoff").arg(prepared.handoff.to_arg());
        let mut child = match privsep::spawn(cmd, &prepared.handoff, user) {
            Ok(c) => c,
            Err(e) => return fail(&mut pid_file, &e),
        };
        child_pid.store(child.id() as i32, Ordering::SeqCst);
        // A stop signal that came while no VMM ran.
        let early = signal.load(Ordering::SeqCst);
        if early != 0 {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, early) };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let networks = prepared.networks.clone();
        let watcher = match networks.is_empty() {
            true => None,
            false => {
                let stop = stop.clone();
                microvm_dev::network::spawn("mvm-net-watch", None, move || {
                    microvm_dev::network::supervise(&networks, &stop)
                })
                .ok()
            }
        };
        // The keeper's copies: the VMM holds the TAPs, /dev/kvm and the
        // ready pipe's write end (so that its end shows at the VMM's exit).
        prepared.handoff = Handoff::default();
        let status = child.wait();
        child_pid.store(0, Ordering::SeqCst);
        prepared.settle();
        stop.store(true, Ordering::SeqCst);
        if let Some(w) = watcher {
            let _ = w.join();
        }
        drop(prepared);
        let code = match status {
            Ok(s) => privsep::exit_status(s),
            Err(e) => {
                eprintln!("mvm-vmm: error: waiting for the VMM: {e}");
                1
            }
        };
        if restart_on_reboot && code == i32::from(EXIT_REBOOT) && signal.load(Ordering::SeqCst) == 0 {
            eprintln!("mvm-vmm: the guest rebooted; booting it again");
            rebooted = true;
            continue;
        }
        let code = u8::try_from(code).unwrap_or(1);
        record_exit(&mut pid_file, code, &mvm::manager::exit_meaning(i32::from(code)).1);
        return ExitCode::from(code);
    }
}

/// Report `e`, record it in the pid file and exit as it says.
fn fail(pid_file: &mut Option<PidFile>, e: &microvm_dev::Error) -> ExitCode {
    mvm::report("mvm-vmm", e);
    let code = if e.is_config_error() { EXIT_CONFIG } else { 1 };
    record_exit(pid_file, code, &e.to_string());
    ExitCode::from(code)
}

/// Write how the run ended to the pid file (if there is one).
fn record_exit(pid_file: &mut Option<PidFile>, status: u8, reason: &str) {
    if let Some(f) = pid_file.as_mut() {
        let record = Record::Exited {
            status: i32::from(status),
            at: pidfile::unix_now(),
            reason: reason.to_string(),
        };
        if let Err(e) = f.write(&record) {
            eprintln!("mvm-vmm: warning: cannot update the pid file: {e}");
        }
    }
}

/// The exit status and its reason, for the pid file.
fn exit_code(result: microvm_dev::Result<VmExit>, signal: &std::sync::atomic::AtomicI32) -> (u8, String) {
    match result {
        Ok(VmExit::PowerOff) => (0, "the guest powered off".into()),
        Ok(VmExit::Reboot) => {
            log::info!("guest rebooted");
            (EXIT_REBOOT, "the guest rebooted".into())
        }
        Ok(VmExit::Crash(report)) => {
            eprintln!("mvm-vmm: guest crashed: {report}");
            (EXIT_CRASH, format!("the guest crashed: {report}"))
        }
        Ok(VmExit::Stopped(StopReason::ConsoleEscape)) => (EXIT_ESCAPE, "stopped with Ctrl-A x".into()),
        Ok(VmExit::Stopped(StopReason::Requested)) => match signal.load(std::sync::atomic::Ordering::SeqCst) {
            0 => (1, "stopped".into()),
            sig => {
                eprintln!("mvm-vmm: stopped by signal {sig}");
                (128u8.saturating_add(sig as u8), format!("stopped by signal {sig}"))
            }
        },
        Err(e) => {
            mvm::report("mvm-vmm", &e);
            let code = if e.is_config_error() { EXIT_CONFIG } else { 1 };
            (code, e.to_string())
        }
    }
}

/// `run`'s arguments: the file, `--pid-file <path>`, `--restart-on-reboot`,
/// in any order.
struct RunArgs<'a> {
    path: &'a str,
    pid_file: Option<&'a str>,
    restart_on_reboot: bool,
    handoff: Option<&'a str>,
}

fn parse_run<'a>(args: &[&'a str]) -> Option<RunArgs<'a>> {
    let (mut path, mut pid_file, mut restart_on_reboot, mut handoff) = (None, None, false, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match *arg {
            "--pid-file" if pid_file.is_none() => pid_file = Some(*it.next()?),
            "--restart-on-reboot" => restart_on_reboot = true,
            "--handoff" if handoff.is_none() => handoff = Some(*it.next()?),
            a if !a.starts_with("--") && path.is_none() => path = Some(a),
            _ => return None,
        }
    }
    Some(RunArgs {
        path: path?,
        pid_file,
        restart_on_reboot,
        handoff,
    })
}

fn main() -> ExitCode {
    init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["run", rest @ ..] if !rest.is_empty() => match parse_run(rest) {
            Some(args) => run(args),
            None => {
                eprintln!("{USAGE}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["-V" | "--version"] => {
            println!("mvm-vmm {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
