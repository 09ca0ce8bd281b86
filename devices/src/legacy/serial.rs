//! 16550A UART on COM1, backed by vm-superio, with its interrupt.
//!
//! The interrupt matters: Linux's 8250 driver prints kernel messages by
//! polling, but guest userspace output waits for the THR-empty interrupt,
//! so without it only the kernel log would ever appear.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;

use super::EventLine;
use crate::bus::BusDevice;
use crate::Result;

/// I/O base of COM1.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Number of UART registers.
pub const COM1_PORT_LEN: u16 = 8;
/// ISA IRQ (and IOAPIC GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Signals the input pump when the guest drained the receive FIFO, so host
/// input that did not fit can be delivered without polling.
struct InputSpace(EventLine);

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        log::debug!("serial: console sink failed to take a byte");
    }
    fn in_buffer_empty(&self) {
        // Nothing to do if the eventfd counter is saturated: the pump is
        // already due to run.
        let _ = self.0.eventfd().write(1);
    }
}

/// The guest's serial console.
pub struct SerialPort {
    uart: Serial<EventLine, InputSpace, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// A UART whose transmitted bytes go to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Result<Self> {
        let irq = EventLine::new("serial interrupt")?;
        let space = InputSpace(EventLine::new("serial input space")?);
        Ok(Self {
            uart: Serial::with_events(irq, space, out),
        })
    }

    /// Interrupt line: bind it to [`COM1_IRQ`].
    pub fn irq(&self) -> &EventLine {
        self.uart.interrupt_evt()
    }

    /// Signalled when the receive FIFO empties.
    pub fn input_space(&self) -> &EventLine {
        &self.uart.events().0
    }

    /// Queue host input for the guest. Returns how many bytes fit into the
    /// receive FIFO; the caller keeps the rest until [`Self::input_space`]
    /// fires.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot raise the receive interrupt: {e}");
                0
            }
        }
    }

    /// The output sink.
    pub fn output_mut(&mut self) -> &mut (dyn Write + Send) {
        self.uart.writer_mut().as_mut()
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if offset < u64::from(COM1_PORT_LEN) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if offset < u64::from(COM1_PORT_LEN) {
                if let Err(e) = self.uart.write(off, *value) {
                    log::debug!("serial: write to register {off}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn transmits_and_raises_thr_empty_interrupt() {
        let out = Shared::default();
        let mut port = SerialPort::new(Box::new(out.clone())).unwrap();
        // Enable the THR-empty interrupt, as the 8250 driver does before it
        // hands a userspace write to the UART.
        port.write(IER, &[0x02]);
        port.write(0, b"h");
        port.write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        assert!(port.irq().eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn receives_input_and_reports_data_ready() {
        let mut port = SerialPort::new(Box::new(std::io::sink())).unwrap();
        port.write(IER, &[0x01]);
        assert_eq!(port.enqueue_input(b"ab"), 2);
        let mut lsr = [0u8];
        port.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut d = [0u8];
        port.read(0, &mut d);
        assert_eq!(d, *b"a");
        port.read(0, &mut d);
        assert_eq!(d, *b"b");
        // Draining the FIFO tells the input pump there is room again.
        assert!(port.input_space().eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn full_fifo_takes_what_fits() {
        let mut port = SerialPort::new(Box::new(std::io::sink())).unwrap();
        let big = vec![b'x'; 1000];
        let n = port.enqueue_input(&big);
        assert!(n > 0 && n < 1000);
        assert_eq!(port.enqueue_input(&big), 0);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut port = SerialPort::new(Box::new(std::io::sink())).unwrap();
        let mut wide = [0u8; 4];
        port.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        port.write(0, &[1, 2, 3, 4]);
        port.write(0, &[]);
        port.write(9, &[1]);
        let mut one = [0u8];
        port.read(200, &mut one);
        assert_eq!(one, [0xff]);
    }
}
