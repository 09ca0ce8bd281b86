//! Legacy PC devices: the UART, the i8042 reset line, ACPI sleep control and
//! the CMOS real-time clock.

mod acpi_sleep;
mod i8042;
mod rtc;
mod serial;

pub use acpi_sleep::{AcpiSleepControl, S5_SLEEP_TYPE as SLEEP_CONTROL_S5_TYPE, SLEEP_CONTROL_PORT};
pub use i8042::{ResetController, I8042_PORT_BASE, I8042_PORT_LEN};
pub use rtc::{Clock as RtcClock, Rtc, RTC_CENTURY_REGISTER, RTC_PORT_BASE, RTC_PORT_LEN};
pub use serial::{SerialPort, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Result};

/// An eventfd that a device signals: an interrupt line (bound to a GSI with
/// `KVM_IRQFD`) or a request to the VMM (reset, power off).
#[derive(Debug)]
pub struct EventLine(EventFd);

impl EventLine {
    /// A new, unsignalled line.
    pub fn new(what: &'static str) -> Result<Self> {
        EventFd::new(EFD_NONBLOCK)
            .map(Self)
            .map_err(|source| Error::EventFd { what, source })
    }

    /// The eventfd, to register with KVM or an epoll loop.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
