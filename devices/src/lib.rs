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
