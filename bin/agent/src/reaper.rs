//! Child reaping: one thread waits for SIGCHLD and reaps every child
//! (as PID 1 that includes orphans re-parented to the agent); sessions
//! learn their own child's exit through a registry.
//!
//! SIGCHLD is blocked in every thread ([`block_sigchld`] runs in `main`
//! before any thread exists, and threads inherit the mask), so only the
//! reaper's `sigtimedwait` consumes it. A session spawns its child while
//! holding the registry lock ([`Reaper::spawn`]) and registers the pid
//! before releasing it; the reaper takes the same lock before calling
//! `waitpid`, so an exit is never reaped before its pid is known. Exits of
//! unregistered pids (orphans) are discarded.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::proto::ExitStatus;
use crate::sys;

/// A registered child's exit: its status and when it was reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: ExitStatus,
    pub at: Instant,
}

struct Entry {
    /// Written (one byte) when the child is reaped; the session polls the
    /// read end.
    notify: OwnedFd,
    exit: Option<Exit>,
}

#[derive(Default)]
pub struct Reaper {
    children: Mutex<HashMap<libc::pid_t, Entry>>,
}

/// A session's handle on its registered child.
pub struct Watch {
    pub pid: libc::pid_t,
    /// Readable once the child was reaped.
    notify: OwnedFd,
}

impl Watch {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.notify.as_fd()
    }
}

/// Block SIGCHLD in the calling thread (and so in every thread it spawns
/// afterwards). Call first thing in `main`.
pub fn block_sigchld() -> io::Result<()> {
    let set = sigchld_set();
    // SAFETY: valid sigset pointer, NULL old set.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to our set.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    set
}

impl Reaper {
    pub fn new() -> Arc<Reaper> {
        Arc::new(Reaper::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<libc::pid_t, Entry>> {
        // A panicking session must not disable reaping for everyone.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start the reaper thread.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let me = Arc::clone(self);
        std::thread::Builder::new().name("reaper".into()).spawn(move || loop {
            // Init without a reaper fills up with zombies: keep going.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.run()));
            crate::say!("the reaper panicked; restarting it");
        })?;
        Ok(())
    }

    fn run(&self) {
        let set = sigchld_set();
        // Wake up now and then even without a signal, so an exit can never
        // be missed for long whatever happens to the signal.
        let timeout = libc::timespec { tv_sec: 1, tv_nsec: 0 };
        loop {
            // SAFETY: a zeroed siginfo_t is a valid out-buffer.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointers to the set, info and timeout.
            unsafe { libc::sigtimedwait(&set, &mut info, &timeout) };
            self.reap_all();
        }
    }

    /// Reap every exited child; record the registered ones.
    pub fn reap_all(&self) {
        let mut children = self.lock();
        loop {
            let mut status = 0;
            // SAFETY: valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(entry) = children.get_mut(&pid) {
                entry.exit = Some(Exit {
                    status: sys::exit_status(status),
                    at: Instant::now(),
                });
                // The pipe holds the byte; a full pipe is impossible (one
                // byte per child).
                let _ = sys::write(&entry.notify, b"x");
            }
        }
    }

    /// Spawn `cmd` and register the child, atomically with respect to the
    /// reaper. (std's `spawn` itself waits for a child whose `exec` failed;
    /// holding the lock also keeps the reaper from stealing that one.)
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Watch)> {
        let (notify_r, notify_w) = sys::pipe(true)?;
        let mut children = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        children.insert(
            pid,
            Entry {
                notify: notify_w,
                exit: None,
            },
        );
        Ok((child, Watch { pid, notify: notify_r }))
    }

    /// The child's exit if it was reaped (the registration then ends).
    pub fn take(&self, watch: &Watch) -> Option<Exit> {
        let mut children = self.lock();
        let exit = children.get(&watch.pid)?.exit?;
        children.remove(&watch.pid);
        Some(exit)
    }

    /// Wait up to `timeout` for the child's exit.
    pub fn wait_timeout(&self, watch: &Watch, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.take(watch) {
                return Some(exit);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut fds = [sys::pollfd(
                std::os::fd::AsRawFd::as_raw_fd(&watch.notify),
                libc::POLLIN,
            )];
            let _ = sys::poll(&mut fds, Some(left.min(Duration::from_millis(100))));
        }
    }

    /// Stop tracking the child; its exit, when it comes, is discarded.
    pub fn forget(&self, watch: &Watch) {
        self.lock().remove(&watch.pid);
    }
}
