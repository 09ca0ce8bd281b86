//! Address buses: map a guest access (x86 port I/O or MMIO) to the device
//! that owns the address, with the offset inside the device's range.

use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// A device on a bus.
///
/// `offset` is relative to the start of the device's range; `data` is the
/// access as the guest made it (any length: devices must check it).
pub trait BusDevice: Send {
    /// Guest read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
}

impl Range {
    fn end(&self) -> u128 {
        u128::from(self.base) + u128::from(self.len)
    }
}

/// The set of address ranges with their devices, sorted by base address.
/// One bus serves port I/O (addresses up to 0xffff), another MMIO.
pub struct Bus {
    ranges: Vec<Range>,
    limit: u128,
}

/// The x86 port I/O bus (64 Ki ports).
pub fn pio_bus() -> Bus {
    Bus::with_limit(0x1_0000)
}

/// A bus for the whole 64-bit physical address space.
pub fn mmio_bus() -> Bus {
    Bus::with_limit(1 << 64)
}

impl Bus {
    fn with_limit(limit: u128) -> Self {
        Bus {
            ranges: Vec::new(),
            limit,
        }
    }

    /// Attach `device` at addresses `base..base + len`.
    pub fn insert(&mut self, name: &'static str, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<()> {
        let new_end = u128::from(base) + u128::from(len);
        if len == 0 || new_end > self.limit {
            return Err(Error::AddressRange { name, base, len });
        }
        if let Some(other) = self
            .ranges
            .iter()
            .find(|r| u128::from(base) < r.end() && u128::from(r.base) < new_end)
        {
            return Err(Error::AddressOverlap {
                name,
                other: other.name,
                base,
                len,
            });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(
            at,
            Range {
                base,
                len,
                name,
                device,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let idx = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let range = &self.ranges[idx];
        (u128::from(addr) < range.end()).then(|| (range, addr - range.base))
    }

    /// Dispatch a guest read. Addresses nobody owns read as all-ones, as
    /// on a real ISA bus. Returns whether a device owned the address.
    pub fn read(&self, port: u64, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                // A poisoned lock means another vCPU thread died mid-access;
                // the device state is still plain data, so keep serving.
                let mut dev = range.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a guest write. Writes to unowned addresses are dropped.
    pub fn write(&self, port: u64, data: &[u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                let mut dev = range.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = pio_bus();
        bus.insert("b", 0x3f8, 8, b.clone()).unwrap();
        bus.insert("a", 0x60, 5, a.clone()).unwrap();
        assert!(bus.write(0x64, &[0xfe]));
        assert!(bus.write(0x3f8, b"x"));
        assert!(!bus.write(0x65, &[1]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(!bus.read(0x400, &mut d));
        assert_eq!(d, [0xff]);
        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = pio_bus();
        bus.insert("a", 0x60, 5, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert("b", 0x64, 2, dev.clone()),
            Err(Error::AddressOverlap { other: "a", .. })
        ));
        assert!(matches!(
            bus.insert("c", 0x5c, 5, dev.clone()),
            Err(Error::AddressOverlap { .. })
        ));
        assert!(bus.insert("d", 0x5b, 5, dev.clone()).is_ok());
        assert!(matches!(
            bus.insert("e", 0, 0, dev.clone()),
            Err(Error::AddressRange { .. })
        ));
        assert!(matches!(
            bus.insert("f", 0xffff, 2, dev.clone()),
            Err(Error::AddressRange { .. })
        ));
        assert!(bus.insert("g", 0xffff, 1, dev).is_ok());
        assert!(bus.write(0xffff, &[0]));
    }
}

#[cfg(test)]
mod mmio_tests {
    use super::*;

    struct Echo;
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn mmio_bus_covers_high_addresses() {
        let mut bus = mmio_bus();
        bus.insert("top", u64::MAX - 0xfff, 0x1000, Arc::new(Mutex::new(Echo)))
            .unwrap();
        bus.insert("dev", 0xd000_0000, 0x1000, Arc::new(Mutex::new(Echo)))
            .unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0xd000_0010, &mut d));
        assert_eq!(d, [0x10; 4]);
        assert!(bus.read(u64::MAX, &mut d));
        assert!(!bus.read(0xd000_1000, &mut d));
        assert!(matches!(
            bus.insert("x", 0xd000_0800, 0x1000, Arc::new(Mutex::new(Echo))),
            Err(Error::AddressOverlap { .. })
        ));
    }
}
