//! ACPI hardware-reduced sleep control register (FADT `SLEEP_CONTROL_REG`).
//!
//! The guest powers off by writing `SLP_EN | SLP_TYP << 2` where `SLP_TYP`
//! is the value of the DSDT's `\_S5` package. Only S5 is implemented: a VM
//! that "sleeps" has nothing to wake it.

use super::EventLine;
use crate::bus::BusDevice;
use crate::Result;

/// I/O port of the sleep control (and status) register.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// `SLP_TYP` value that the DSDT's `\_S5` object announces.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The sleep control register.
pub struct AcpiSleepControl {
    poweroff: EventLine,
}

impl AcpiSleepControl {
    /// A register whose S5 requests signal a fresh eventfd.
    pub fn new() -> Result<Self> {
        Ok(Self {
            poweroff: EventLine::new("ACPI power off")?,
        })
    }

    /// Signalled when the guest enters S5 (soft off).
    pub fn poweroff_requested(&self) -> &EventLine {
        &self.poweroff
    }
}

impl BusDevice for AcpiSleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: no wake events ever pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [value]) = (offset, data) else { return };
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE {
            if let Err(e) = self.poweroff.eventfd().write(1) {
                log::warn!("acpi: cannot signal the power-off request: {e}");
            }
        } else {
            log::debug!("acpi: ignoring sleep control value {value:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let mut dev = AcpiSleepControl::new().unwrap();
        dev.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN
        dev.write(0, &[SLP_EN | (3 << SLP_TYP_SHIFT)]); // S3
        dev.write(0, &[SLP_EN | (S5_SLEEP_TYPE << SLP_TYP_SHIFT), 0]); // 2 bytes
        dev.write(1, &[SLP_EN | (S5_SLEEP_TYPE << SLP_TYP_SHIFT)]);
        assert!(dev.poweroff_requested().eventfd().read().is_err());
        dev.write(0, &[SLP_EN | (S5_SLEEP_TYPE << SLP_TYP_SHIFT)]);
        assert_eq!(dev.poweroff_requested().eventfd().read().unwrap(), 1);
    }
}
