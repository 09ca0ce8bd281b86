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
