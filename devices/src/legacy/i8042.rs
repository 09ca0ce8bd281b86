//! The i8042 keyboard controller, reduced to what a VMM needs: its CPU
//! reset line (command 0xFE on port 0x64), which Linux uses to reboot.

use vm_superio::I8042Device;

use super::EventLine;
use crate::bus::BusDevice;
use crate::Result;

/// First i8042 port (data, 0x60); the command/status port is 0x64.
pub const I8042_PORT_BASE: u16 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u16 = 5;

/// The i8042 as a reset controller.
pub struct ResetController {
    dev: I8042Device<EventLine>,
}

impl ResetController {
    /// A controller whose reset requests signal a fresh eventfd.
    pub fn new() -> Result<Self> {
        Ok(Self {
            dev: I8042Device::new(EventLine::new("i8042 reset")?),
        })
    }

    /// Signalled when the guest asks for a CPU reset.
    pub fn reset_requested(&self) -> &EventLine {
        self.dev.reset_evt()
    }
}

impl BusDevice for ResetController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.dev.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.dev.write(off, *value) {
                log::warn!("i8042: cannot signal the reset request: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_only_on_command_port() {
        let mut dev = ResetController::new().unwrap();
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfe, 0]);
        assert!(dev.reset_requested().eventfd().read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(dev.reset_requested().eventfd().read().unwrap(), 1);
    }
}
