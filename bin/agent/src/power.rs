//! Poweroff and reboot, as init: stop every process, flush and detach the
//! file systems (so ext4 volumes are clean), then tell the kernel.

use std::time::{Duration, Instant};

use crate::proto::{Mount, PowerAction};
use crate::{mounts, say, sys};

/// How long programs get between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// Pseudo file systems: nothing to flush, and unmounting them only gets in
/// the way (/proc is read below).
const PSEUDO: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "ramfs",
    "rootfs",
    "cgroup",
    "cgroup2",
    "mqueue",
    "securityfs",
    "debugfs",
    "tracefs",
    "configfs",
    "pstore",
    "bpf",
    "hugetlbfs",
    "fusectl",
    "binfmt_misc",
];

/// Signals other programs send init to ask for a shutdown, as busybox
/// and sysvinit read them (`reboot`, `poweroff`, `halt` without `-f`
/// signal PID 1), and the kernel's Ctrl-Alt-Del (SIGINT).
const POWER_SIGNALS: [(libc::c_int, PowerAction); 5] = [
    (libc::SIGTERM, PowerAction::Reboot),
    (libc::SIGINT, PowerAction::Reboot),
    (libc::SIGUSR1, PowerAction::Poweroff),
    (libc::SIGUSR2, PowerAction::Poweroff),
    (libc::SIGPWR, PowerAction::Poweroff),
];

fn power_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to our set.
    unsafe {
        libc::sigemptyset(&mut set);
        for (sig, _) in POWER_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

/// Block the shutdown signals in the calling thread and every thread it
/// starts afterwards (call before any thread exists), so only the thread
/// of [`watch_signals`] takes them.
pub fn block_signals() {
    let set = power_signal_set();
    // SAFETY: valid sigset pointer, NULL old set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// As init: turn `reboot`/`poweroff` from guest programs into a clean
/// shutdown (the same as the host's `Power` request).
pub fn watch_signals() {
    let spawned = std::thread::Builder::new().name("power-signals".into()).spawn(|| {
        let set = power_signal_set();
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on a valid set.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if let Some((_, action)) = POWER_SIGNALS.iter().find(|(s, _)| *s == sig) {
                say!("signal {sig}: {action:?}");
                shut_down(*action);
            }
        }
    });
    if let Err(e) = spawned {
        say!("cannot watch for reboot/poweroff signals: {e}");
    }
}

/// Take the guest down. Returns only if the kernel refused.
pub fn shut_down(action: PowerAction) {
    // Servers first, each with its own clean-stop signal: PostgreSQL's
    // shutdown checkpoint takes 10-20 s in a slow (PVM) guest. Within the
    // 60 s `mvm stop` gives the whole power-off.
    crate::services::registry().stop_all(Duration::from_secs(40));
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    signal_all(libc::SIGTERM);
    if !wait_for_processes(TERM_GRACE) {
        signal_all(libc::SIGKILL);
        wait_for_processes(Duration::from_secs(1));
    }
    // SAFETY: as above.
    unsafe { libc::sync() };
    unmount_all();
    // SAFETY: as above.
    unsafe { libc::sync() };
    let cmd = match action {
        PowerAction::Poweroff => libc::RB_POWER_OFF,
        PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    // SAFETY: reboot takes a command constant.
    if unsafe { libc::reboot(cmd) } != 0 {
        say!("{action:?} failed: {}", std::io::Error::last_os_error());
    }
}

fn signal_all(sig: libc::c_int) {
    // SAFETY: kill(-1) signals every process but init (us) and ourselves.
    unsafe { libc::kill(-1, sig) };
}

/// Wait until no user process is left (the reaper collects them); false on
/// timeout.
fn wait_for_processes(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !user_processes_left() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !user_processes_left()
}

/// Whether a process other than us is alive. Kernel threads (which kill(-1)
/// also "signals", so its result cannot tell) and zombies have no
/// executable in /proc.
fn user_processes_left() -> bool {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter_map(|n| n.to_str().map(str::to_owned))
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()) && *n != me)
        .any(|n| std::fs::read_link(format!("/proc/{n}/exe")).is_ok())
}

/// Unmount real file systems, innermost first; what cannot be unmounted is
/// remounted read-only. Then the root, read-only.
fn unmount_all() {
    let all = mounts::current();
    for name in unmount_order(&all) {
        let Ok(target) = sys::cstring(name) else {
            continue;
        };
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
            remount_read_only(&target, name);
        }
    }
    if let Ok(root) = sys::cstring("/") {
        remount_read_only(&root, "/");
    }
}

/// The mount points to unmount, innermost (latest) first: real file
/// systems only, not the root.
fn unmount_order(all: &[Mount]) -> Vec<&str> {
    all.iter()
        .rev()
        .filter(|m| m.target != "/" && !PSEUDO.contains(&m.fstype.as_str()))
        .map(|m| m.target.as_str())
        .collect()
}

fn remount_read_only(target: &std::ffi::CStr, name: &str) {
    // SAFETY: valid path; NULL source/type/data are allowed for MS_REMOUNT.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // The initramfs root cannot be read-only; nothing to flush there.
        if name != "/" {
            say!("cannot unmount or remount {name} read-only: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmounts_real_file_systems_innermost_first() {
        let m = |target: &str, fstype: &str| Mount {
            source: "x".into(),
            target: target.into(),
            fstype: fstype.into(),
        };
        let all = [
            m("/", "ext4"),
            m("/proc", "proc"),
            m("/dev", "devtmpfs"),
            m("/project", "virtiofs"),
            m("/data", "ext4"),
            m("/data/inner", "ext4"),
            m("/tmp", "tmpfs"),
        ];
        assert_eq!(unmount_order(&all), ["/data/inner", "/data", "/project"]);
    }
}
