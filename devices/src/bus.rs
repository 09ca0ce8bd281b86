//! Port I/O bus: maps guest port accesses to the device that owns the port.

use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// A device reachable through x86 port I/O.
///
/// `offset` is relative to the start of the device's range; `data` is the
/// access as the guest made it (1, 2 or 4 bytes, unchecked: devices must
/// accept any length).
pub trait PioDevice: Send {
    /// Guest `in`: fill `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest `out` of `data`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    name: &'static str,
    device: Arc<Mutex<dyn PioDevice>>,
}

impl Range {
    fn end(&self) -> u32 {
        u32::from(self.base) + u32::from(self.len)
    }
}

/// The set of port ranges with their devices, sorted by base port.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attach `device` at ports `base..base + len`.
    pub fn insert(&mut self, name: &'static str, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) -> Result<()> {
        if len == 0 || u32::from(base) + u32::from(len) > 0x1_0000 {
            return Err(Error::PortRange { name, base, len });
        }
        let new_end = u32::from(base) + u32::from(len);
        if let Some(other) = self
            .ranges
            .iter()
            .find(|r| u32::from(base) < r.end() && u32::from(r.base) < new_end)
        {
            return Err(Error::PortOverlap {
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

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        let idx = self.ranges.partition_point(|r| r.base <= port).checked_sub(1)?;
        let range = &self.ranges[idx];
        (u32::from(port) < range.end()).then(|| (range, port - range.base))
    }

    /// Dispatch a guest `in`. Ports nobody owns read as all-ones, as on a
    /// real ISA bus. Returns whether a device owned the port.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
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

    /// Dispatch a guest `out`. Writes to unowned ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
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
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
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
        let mut bus = PioBus::new();
        bus.insert("a", 0x60, 5, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert("b", 0x64, 2, dev.clone()),
            Err(Error::PortOverlap { other: "a", .. })
        ));
        assert!(matches!(
            bus.insert("c", 0x5c, 5, dev.clone()),
            Err(Error::PortOverlap { .. })
        ));
        assert!(bus.insert("d", 0x5b, 5, dev.clone()).is_ok());
        assert!(matches!(
            bus.insert("e", 0, 0, dev.clone()),
            Err(Error::PortRange { .. })
        ));
        assert!(matches!(
            bus.insert("f", 0xffff, 2, dev.clone()),
            Err(Error::PortRange { .. })
        ));
        assert!(bus.insert("g", 0xffff, 1, dev).is_ok());
        assert!(bus.write(0xffff, &[0]));
    }
}
