//! Starting and stopping an external `virtiofsd` (the vhost-user virtio-fs
//! backend of the virtio-fs project, version 1.x) for one share.
//!
//! The process lives exactly as long as the [`Virtiofsd`] value: dropping
//! it (or [`Virtiofsd::stop`]) terminates and reaps it and removes its
//! socket. Its stderr is forwarded to this process's log, and the last
//! lines are kept to explain an early exit.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Error;

/// How long virtiofsd may take to create its socket. It takes 2-7 ms
/// here (namespace sandbox included); the margin is for loaded hosts.
/// The file appears at bind(2), a moment before virtiofsd listens: a
/// client retries a refused connection (see `vhost_user::connect`).
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Lines of virtiofsd's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 8;

/// Where virtiofsd is looked for, in order, when no path is given: `PATH`,
/// the invoking user's `~/.cargo/bin` (where `cargo install virtiofsd`
/// and scripts/setup-host.sh put it), then the distributions' location.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(path) = explicit {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(Error::VirtiofsdNotFound {
                searched: format!("{} (given explicitly) is not an executable file", path.display()),
            })
        };
    }
    let candidates = binary_candidates();
    candidates.iter().find(|p| is_executable(p)).cloned().ok_or_else(|| {
        let searched = candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Error::VirtiofsdNotFound { searched }
    })
}

fn binary_candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("virtiofsd")).collect())
        .unwrap_or_default();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        out.push(PathBuf::from(cargo_home).join("bin/virtiofsd"));
    }
    // Under sudo, HOME may be root's: the user who ran sudo installed it.
    if let Some(home) = std::env::var_os("SUDO_USER").and_then(|u| home_of(&u)) {
        out.push(home.join(".cargo/bin/virtiofsd"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        out.push(PathBuf::from(home).join(".cargo/bin/virtiofsd"));
    }
    out.push(PathBuf::from("/usr/libexec/virtiofsd"));
    out.dedup();
    out
}

/// The home directory of user `name` from the password database.
fn home_of(name: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let name = std::ffi::CString::new(name.as_bytes()).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 4096];
    let mut result = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use
    // of the strings `pwd` points into.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_dir.is_null() {
        return None;
    }
    // SAFETY: getpwnam_r succeeded, so pw_dir is a NUL-terminated string in `buf`.
    let dir = unsafe { std::ffi::CStr::from_ptr(pwd.pw_dir) };
    Some(PathBuf::from(std::ffi::OsString::from_vec(dir.to_bytes().to_vec())))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running virtiofsd serving one directory on one socket.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Option<Child>,
    binary: PathBuf,
    socket: PathBuf,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Virtiofsd {
    /// Start `binary` (see [`find_binary`]) serving `shared_dir` on a new
    /// socket at `socket` (an existing socket there is replaced), and wait
    /// up to [`SOCKET_TIMEOUT`] for the socket to appear.
    ///
    /// As root it runs in virtiofsd's namespace sandbox; otherwise without
    /// a sandbox (virtiofsd's unprivileged namespace mode needs subordinate
    /// id ranges most hosts do not set up).
    ///
    /// The thread that logs virtiofsd's stderr runs `thread_start` first.
    pub fn start(
        binary: &Path,
        socket: &Path,
        shared_dir: &Path,
        thread_start: &mvm_devices::ThreadStart,
    ) -> Result<Self, Error> {
        let start_error = |reason: String| Error::VirtiofsdStart {
            binary: binary.to_path_buf(),
            shared_dir: shared_dir.to_path_buf(),
            reason,
        };
        if !shared_dir.is_dir() {
            return Err(start_error(
                "the shared directory does not exist or is not a directory".into(),
            ));
        }
        match std::fs::symlink_metadata(socket) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(socket)
                    .map_err(|e| start_error(format!("cannot remove the old socket {}: {e}", socket.display())))?;
            }
            Ok(_) => {
                return Err(start_error(format!(
                    "{} exists and is not a socket; choose another socket path",
                    socket.display()
                )))
            }
            Err(_) => {}
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared_dir.display()))
            .arg("--cache=auto")
            .arg(if root { "--sandbox=namespace" } else { "--sandbox=none" })
            .arg("--xattr")
            .arg("--log-level=warn");
        // Opening file handles needs CAP_DAC_READ_SEARCH, and overlayfs
        // (without nfs_export) has none: say so rather than have virtiofsd
        // probe, fail and warn on every start.
        if !root || is_overlayfs(shared_dir) {
            cmd.arg("--inode-file-handles=never");
        }
        // virtiofsd keeps a descriptor per inode the guest knows; by default
        // it asks for a million and warns when it may not. Ask for what this
        // process may have.
        if let Some(limit) = nofile_hard_limit() {
            cmd.arg(format!("--rlimit-nofile={limit}"));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        mvm_devices::unblock_signals_in_child(&mut cmd);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| start_error(format!("cannot run it: {e}")))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let reader = child
            .stderr
            .take()
            .map(|pipe| forward_stderr(pipe, Arc::clone(&stderr), thread_start.clone()));
        let mut daemon = Virtiofsd {
            child: Some(child),
            binary: binary.to_path_buf(),
            socket: socket.to_path_buf(),
            stderr,
        };
        loop {
            if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                log::debug!(
                    "virtiofsd for {} listening on {} after {:?}",
                    shared_dir.display(),
                    socket.display(),
                    started.elapsed()
                );
                return Ok(daemon);
            }
            let exited = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                daemon.child = None;
                // It wrote its reason before exiting; let the reader catch up.
                if let Some(reader) = reader {
                    let _ = reader.join();
                }
                return Err(start_error(format!("it exited ({status}){}", daemon.stderr_tail())));
            }
            if started.elapsed() > SOCKET_TIMEOUT {
                daemon.stop();
                return Err(start_error(format!(
                    "no socket at {} after {SOCKET_TIMEOUT:?}{}",
                    socket.display(),
                    daemon.stderr_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The vhost-user socket the VMM connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The binary that runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `; its last words: ...` from the kept stderr lines, or nothing.
    pub fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if lines.is_empty() {
            String::new()
        } else {
            format!("; it said: {}", lines.iter().cloned().collect::<Vec<_>>().join(" | "))
        }
    }

    /// Terminate and reap it and remove its socket; idempotent. In the
    /// namespace sandbox the process we started only waits for the one
    /// that serves, which the kernel terminates when its parent dies.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: `pid` is our unreaped child, so it names no other process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
        if std::fs::symlink_metadata(&self.socket).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.socket);
        }
        let _ = std::fs::remove_file(pid_file(&self.socket));
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn block_all_signals() {
    // SAFETY: fills a local set and changes this thread's mask only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// virtiofsd's lock file beside its socket (`<socket>.pid`).
fn pid_file(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_os_string();
    name.push(".pid");
    PathBuf::from(name)
}

fn is_overlayfs(dir: &Path) -> bool {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let Ok(path) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str())) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0) && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC
}

/// This process's hard limit on open files, when finite.
fn nofile_hard_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid struct.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    (ok && lim.rlim_max != libc::RLIM_INFINITY).then_some(lim.rlim_max)
}

/// Log each line virtiofsd writes (it logs warnings and errors only) and
/// keep the last few. The thread ends when every virtiofsd process has
/// closed the pipe.
fn forward_stderr(
    pipe: std::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
    thread_start: mvm_devices::ThreadStart,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        mvm_devices::run_thread_start(&thread_start);
        // Signals sent to the VMM are for the threads that handle them (it
        // may be created before the VMM blocks them in every thread, and a
        // stop signal landing here would kill the process without cleanup).
        block_all_signals();
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            log::warn!("virtiofsd: {line}");
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mvm-virtiofsd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("share")).unwrap();
        dir
    }

    fn alive(pid: u32) -> bool {
        // A zombie still has a /proc entry; a reaped process has none.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
    }

    #[test]
    fn an_explicit_path_must_be_an_executable() {
        let err = find_binary(Some(Path::new("/nonexistent/virtiofsd"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/virtiofsd"), "{err}");
        assert_eq!(
            find_binary(Some(Path::new("/bin/true"))).unwrap(),
            Path::new("/bin/true")
        );
    }

    #[test]
    fn candidates_include_cargo_bin_and_libexec() {
        let c = binary_candidates();
        assert!(c.iter().any(|p| p.ends_with(".cargo/bin/virtiofsd")), "{c:?}");
        assert_eq!(c.last().unwrap(), Path::new("/usr/libexec/virtiofsd"));
    }

    #[test]
    fn a_missing_shared_directory_is_reported_before_starting() {
        let dir = temp_dir("missing");
        let err = Virtiofsd::start(Path::new("/bin/true"), &dir.join("sock"), &dir.join("nope"), &None).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_early_exit_is_reported_with_its_output() {
        let dir = temp_dir("exit");
        let script = dir.join("fake-virtiofsd");
        std::fs::write(&script, "#!/bin/sh\necho 'cannot open shared dir' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = Virtiofsd::start(&script, &dir.join("sock"), &dir.join("share"), &None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("exit status: 3") && msg.contains("cannot open shared dir"),
            "{msg}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Processes whose command line names `socket`.
    fn serving_processes(socket: &Path) -> Vec<u32> {
        let needle = format!("--socket-path={}", socket.display());
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == needle.as_bytes()))
            })
            .collect()
    }

    fn connect(socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Err(e) = std::os::unix::net::UnixStream::connect(socket) {
            assert!(Instant::now() < deadline, "{e}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Against the real binary (scripts/setup-host.sh installs it).
    #[test]
    fn starts_listens_and_dies_with_its_owner() {
        let Ok(binary) = find_binary(None) else {
            eprintln!("virtiofsd not installed (scripts/setup-host.sh); skipped");
            return;
        };
        let dir = temp_dir("real");
        let socket = dir.join("sock");
        let started = Instant::now();
        let mut daemon = Virtiofsd::start(&binary, &socket, &dir.join("share"), &None).unwrap();
        eprintln!("virtiofsd socket after {:?}", started.elapsed());
        assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
        let pid = daemon.pid().unwrap();
        assert!(alive(pid));
        // It listens (shortly after the socket file appears: bind comes
        // before listen, which is why the frontend retries refused connects).
        connect(&socket);
        let serving = serving_processes(&socket);
        assert!(!serving.is_empty());
        daemon.stop();
        assert!(!alive(pid), "terminated and reaped");
        // In the namespace sandbox, the process that serves is its child:
        // it goes too.
        let deadline = Instant::now() + Duration::from_secs(2);
        while serving.iter().any(|p| alive(*p)) {
            assert!(Instant::now() < deadline, "virtiofsd processes {serving:?} outlived it");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!socket.exists(), "socket removed");
        assert!(!pid_file(&socket).exists(), "its lock file too");
        assert!(daemon.pid().is_none());

        // Dropping does the same; a stale socket is replaced on start.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let daemon = Virtiofsd::start(&binary, &socket, &dir.join("share"), &None).unwrap();
        connect(&socket);
        let pid = daemon.pid().unwrap();
        let daemon2 = Virtiofsd::start(&binary, &dir.join("sock2"), &dir.join("share"), &None).unwrap();
        drop(daemon);
        assert!(!alive(pid));
        drop(daemon2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
