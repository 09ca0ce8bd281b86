//! Device models of microvm-dev.
//!
//! Every device here is driven by values the guest chooses (port numbers,
//! access widths, register values) and treats them as hostile: an access the
//! device does not understand is ignored (writes) or answered with all-ones
//! (reads), never a panic.
//!
//! - [`bus::Bus`]: dispatches port I/O and MMIO exits to devices by address range.
//! - [`legacy::SerialPort`]: a 16550A UART (vm-superio) with its interrupt line.
//! - [`legacy::ResetController`]: the i8042 controller's CPU reset line.
//! - [`legacy::AcpiSleepControl`]: the ACPI hardware-reduced sleep control
//!   register through which the guest powers off.
//! - [`legacy::Rtc`]: the CMOS real-time clock: the host's date, the guest's
//!   own offset when it sets the clock.

pub mod bus;
pub mod legacy;
pub mod virtio;

/// Work a thread started by a device or host component does first, before
/// anything else: where the VMM confines the thread (its seccomp filter).
/// `None`: nothing to do.
pub type ThreadStart = Option<std::sync::Arc<dyn Fn() + Send + Sync>>;

/// Raise the soft limit on open descriptors to the hard one if it is below
/// `want`; false when even the hard limit is too low. (Tests that hold
/// many descriptors at once use it.)
pub fn fd_limit_at_least(want: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return false;
    }
    if lim.rlim_cur >= want {
        return true;
    }
    if lim.rlim_max < want {
        return false;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
}

/// Have `cmd`'s process start with no signal blocked. A process inherits
/// its creator thread's signal mask across exec, and the VMM's threads
/// block its stop signals (one thread takes them with sigwait): without
/// this, a dnsmasq started from the VMM would never see the SIGHUP that
/// makes it read a new VM's address, nor the SIGTERM that stops it, and a
/// virtiofsd would ignore its SIGTERM.
pub fn unblock_signals_in_child(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only
    // sigemptyset and pthread_sigmask (async-signal-safe) on a local set.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            match libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) {
                0 => Ok(()),
                e => Err(std::io::Error::from_raw_os_error(e)),
            }
        })
    }
}

/// Run `start`, if any, on the calling thread.
pub fn run_thread_start(start: &ThreadStart) {
    if let Some(f) = start {
        f();
    }
}

/// Errors of the device crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two devices were given overlapping address ranges (a VMM bug, not a guest one).
    #[error("address range {base:#x}+{len:#x} of {name} overlaps {other}")]
    AddressOverlap {
        name: &'static str,
        other: &'static str,
        base: u64,
        len: u64,
    },
    /// A zero-length range or one beyond the bus.
    #[error("address range {base:#x}+{len:#x} of {name} is empty or beyond the bus")]
    AddressRange { name: &'static str, base: u64, len: u64 },
    /// A virtio device could not be set up.
    #[error("virtio: {0}")]
    Virtio(String),
    /// The vsock device's host socket could not be set up.
    #[error("vsock socket {path}: {reason}")]
    VsockSocket { path: std::path::PathBuf, reason: String },
    /// Creating an eventfd failed.
    #[error("cannot create eventfd for {what}: {source}")]
    EventFd { what: &'static str, source: std::io::Error },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The `SigBlk` line of a `cat /proc/self/status` run from a thread that
    /// blocks SIGHUP, with or without [`unblock_signals_in_child`].
    fn child_sigblk(unblock: bool) -> String {
        std::thread::spawn(move || {
            // SAFETY: a local set; changes this (test-owned) thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGHUP);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let mut cmd = std::process::Command::new("cat");
            cmd.arg("/proc/self/status");
            if unblock {
                unblock_signals_in_child(&mut cmd);
            }
            let out = cmd.output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.starts_with("SigBlk:"))
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_string()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn children_start_with_no_signal_blocked() {
        // Inherited without it (why it exists): SIGHUP is bit 0.
        assert_eq!(u64::from_str_radix(&child_sigblk(false), 16).unwrap() & 1, 1);
        assert_eq!(u64::from_str_radix(&child_sigblk(true), 16).unwrap(), 0);
    }
}
