//! The virtio-mmio transport, version 2 (modern) only.
//!
//! Register accesses below 0x100 must be 32 bits wide; anything else reads
//! as zero and is ignored on write. Queue configuration is accepted only
//! between FEATURES_OK and DRIVER_OK, and only for a queue that is not
//! ready, as the specification requires of drivers.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, DeviceError, Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::{Error, Result};

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue-notify register, for `KVM_IOEVENTFD`.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x444d_564d; // "MVMD"
const CONFIG_SPACE: u64 = 0x100;

/// One virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wrap `device`; `mem` is the guest memory its queues live in.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self> {
        let evt = |what| EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd { what, source });
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            let queue = Queue::new(max).map_err(|e| Error::Virtio(format!("queue of size {max}: {e}")))?;
            queues.push(queue);
            queue_events.push(evt("virtio queue notification")?);
        }
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_events,
            interrupt: Arc::new(Interrupt::new(evt("virtio interrupt")?)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// One eventfd per queue: register each with `KVM_IOEVENTFD` at
    /// `base + NOTIFY_OFFSET` with the queue index as datamatch, and call
    /// [`Self::process_queue`] when it fires.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Whether the device's backend, not the VMM, reads
    /// [`Self::queue_events`] (see [`VirtioDevice::owns_queue_notifications`]).
    pub fn owns_queue_notifications(&self) -> bool {
        self.device.owns_queue_notifications()
    }

    /// The interrupt line (bind it to the device's GSI with `KVM_IRQFD`).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Work on queue `index` after the guest notified it.
    pub fn process_queue(&mut self, index: usize) {
        self.run_device(|device, queues, mem| device.queue_notified(index, queues, mem));
    }

    /// Host-side descriptors of the device (see [`VirtioDevice::event_fds`]).
    pub fn device_event_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.device.event_fds()
    }

    /// One of the device's host-side descriptors is ready.
    pub fn process_device_event(&mut self, fd: std::os::fd::RawFd) {
        self.run_device(|device, queues, mem| device.process_event(fd, queues, mem));
    }

    /// Let an active, healthy device work, then raise its interrupt or
    /// fail it as the outcome says.
    fn run_device(
        &mut self,
        work: impl FnOnce(&mut dyn VirtioDevice, &mut [Queue], &GuestMemoryMmap) -> std::result::Result<bool, DeviceError>,
    ) {
        if !self.activated || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        match work(self.device.as_mut(), &mut self.queues, &self.mem) {
            Ok(true) => self.interrupt.raise(INT_USED_RING),
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    /// The VM stopped (see [`VirtioDevice::stop`]).
    pub fn stop(&mut self) {
        self.device.stop();
    }

    /// The device met a request it must not accept: tell the driver the
    /// device needs a reset and stop processing until it gets one.
    fn fail(&mut self, e: DeviceError) {
        log::warn!(
            "virtio device type {}: {e}; device needs reset",
            self.device.device_type()
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.raise(INT_CONFIG);
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.activated = false;
        self.interrupt.clear();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (FAILED aside); anything else is
        // a driver bug that must not move the device backwards.
        let kept = self.status & !status::DEVICE_NEEDS_RESET;
        if value & kept != kept && value & status::FAILED == 0 {
            log::debug!(
                "virtio: ignoring status {value:#x} that clears bits of {:#x}",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut new =
            value & (status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED);
        if added & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            let ok = self.status & status::DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if ok {
                self.device.ack_features(self.driver_features);
            } else {
                // Not setting FEATURES_OK tells the driver its choice failed.
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 && !self.activated {
            if self.status & status::FEATURES_OK == 0 && new & status::FEATURES_OK == 0 {
                log::debug!("virtio: DRIVER_OK without FEATURES_OK");
                return;
            }
            self.status = new | (self.status & status::DEVICE_NEEDS_RESET);
            let bad = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem));
            if let Some(i) = bad {
                self.fail(DeviceError::Queue(
                    i as u16,
                    "ring addresses or size invalid for guest memory".into(),
                ));
                return;
            }
            if let Err(e) = self.device.activate(&self.mem, &self.queues, &self.queue_events) {
                self.fail(e);
                return;
            }
            self.activated = true;
            // Buffers made available before DRIVER_OK are not lost: hand
            // every queue to the event loop (this runs on a vCPU thread,
            // which must not do device work). A device whose backend reads
            // the notifications itself sees those buffers when it starts.
            if !self.device.owns_queue_notifications() {
                for evt in &self.queue_events {
                    let _ = evt.write(1);
                }
            }
            return;
        }
        self.status = new | (self.status & status::DEVICE_NEEDS_RESET);
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 => {
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
                        _ => {}
                    }
                }
            }
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            NOTIFY_OFFSET => {
                // Normally caught by KVM_IOEVENTFD and never seen here.
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                if !self.queue_config_allowed() {
                    return;
                }
                let Some(q) = self.selected_queue() else { return };
                if offset == 0x44 {
                    q.set_ready(value == 1);
                    return;
                }
                if q.ready() {
                    return;
                }
                let (lo, hi) = (Some(value), None);
                match offset {
                    // Invalid sizes (0, above the maximum, not a power of
                    // two) are refused by the queue and show at DRIVER_OK.
                    0x38 => q.set_size(u16::try_from(value).unwrap_or(0)),
                    0x80 => q.set_desc_table_address(lo, hi),
                    0x84 => q.set_desc_table_address(hi, lo),
                    0x90 => q.set_avail_ring_address(lo, hi),
                    0x94 => q.set_avail_ring_address(hi, lo),
                    0xa0 => q.set_used_ring_address(lo, hi),
                    _ => q.set_used_ring_address(hi, lo),
                }
            }
            _ => log::debug!("virtio-mmio: write to register {offset:#x} ignored"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
        } else if let (true, Ok(bytes)) = (offset % 4 == 0, <[u8; 4]>::try_from(data)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::rng::Rng;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Walk the Linux driver's sequence up to FEATURES_OK.
    fn negotiate(t: &mut MmioTransport) {
        wr(t, 0x70, status::ACKNOWLEDGE);
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, 0x24, 1);
        wr(t, 0x20, 1); // VERSION_1 (bit 32)
        wr(t, 0x24, 0);
        wr(t, 0x20, 0);
        wr(t, 0x70, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(rd(t, 0x70) & status::FEATURES_OK, 0);
    }

    fn setup_queue(t: &mut MmioTransport, q: &MockSplitQueue<GuestMemoryMmap>, size: u32) {
        wr(t, 0x30, 0);
        wr(t, 0x38, size);
        for (off, addr) in [
            (0x80, q.desc_table_addr()),
            (0x90, q.avail_addr()),
            (0xa0, q.used_addr()),
        ] {
            wr(t, off, addr.0 as u32);
            wr(t, off + 4, (addr.0 >> 32) as u32);
        }
        wr(t, 0x44, 1);
    }

    fn rng_transport(m: &GuestMemoryMmap) -> MmioTransport {
        MmioTransport::new(Box::new(Rng::new()), m.clone()).unwrap()
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let m = mem();
        let mut t = rng_transport(&m);
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 4);
        assert_eq!(rd(&mut t, 0x34), 256, "queue 0 max size");
        wr(&mut t, 0x30, 7);
        assert_eq!(rd(&mut t, 0x34), 0, "no queue 7");
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 in the high word");
        // Narrow and unaligned accesses read zero and change nothing.
        let mut two = [0xaau8; 2];
        t.read(0, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(0x70, &[1]);
        t.write(0x71, &[1, 0, 0, 0]);
        assert_eq!(rd(&mut t, 0x70), 0);
    }

    #[test]
    fn feature_negotiation_refuses_unoffered_or_legacy_features() {
        let m = mem();
        let mut t = rng_transport(&m);
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1 << 5); // not offered
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        // Legacy driver (no VERSION_1).
        wr(&mut t, 0x70, 0);
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
    }

    #[test]
    fn serves_entropy_and_interrupts() {
        let m = mem();
        let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let mut t = rng_transport(&m);
        negotiate(&mut t);
        setup_queue(&mut t, &q, 16);
        wr(&mut t, 0x70, ALL);
        assert_eq!(rd(&mut t, 0x70), ALL);
        // Activation hands the queue to the event loop instead of working
        // on the (vCPU) thread that wrote DRIVER_OK.
        assert_eq!(t.queue_events()[0].read().unwrap(), 1);
        let desc = virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
            0x8000, 64, 2, // VRING_DESC_F_WRITE
            0,
        ));
        q.add_desc_chains(&[desc], 0).unwrap();
        wr(&mut t, NOTIFY_OFFSET, 0);
        assert_eq!(
            t.queue_events()[0].read().unwrap(),
            1,
            "notify forwarded to the queue event"
        );
        t.process_queue(0);
        assert_eq!(q.used().idx().load(), 1);
        let used = q.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 64);
        assert_eq!(rd(&mut t, 0x60), INT_USED_RING);
        assert!(t.interrupt().line().read().is_ok());
        wr(&mut t, 0x64, INT_USED_RING);
        assert_eq!(rd(&mut t, 0x60), 0);
        let mut bytes = [0u8; 64];
        vm_memory::Bytes::read_slice(&m, &mut bytes, GuestAddress(0x8000)).unwrap();
        assert_ne!(bytes, [0u8; 64], "random bytes were written");
    }

    #[test]
    fn invalid_rings_at_driver_ok_need_reset() {
        let m = mem();
        let mut t = rng_transport(&m);
        negotiate(&mut t);
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x80, 0xffff_f000); // descriptor table outside guest memory
        wr(&mut t, 0x90, 0x2000);
        wr(&mut t, 0xa0, 0x3000);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, ALL);
        assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, 0x60) & INT_CONFIG, INT_CONFIG);
        // A reset brings the device back.
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x60), 0);
    }

    #[test]
    fn bad_queue_sizes_are_refused() {
        let m = mem();
        for size in [0u32, 3, 512, 0x1_0000] {
            let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
            let mut t = rng_transport(&m);
            negotiate(&mut t);
            setup_queue(&mut t, &q, size);
            wr(&mut t, 0x70, ALL);
            let st = rd(&mut t, 0x70);
            // Either the queue took no invalid size (and kept its maximum,
            // which the mock rings cannot hold) or activation refused it.
            assert!(
                st & status::DEVICE_NEEDS_RESET != 0 || st == ALL,
                "size {size}: status {st:#x}"
            );
        }
    }

    #[test]
    fn queue_config_outside_the_window_is_ignored() {
        let m = mem();
        let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let mut t = rng_transport(&m);
        // Before FEATURES_OK: ignored.
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
        negotiate(&mut t);
        setup_queue(&mut t, &q, 16);
        wr(&mut t, 0x70, ALL);
        // After DRIVER_OK: ignored, the device keeps working.
        wr(&mut t, 0x80, 0xdead_0000);
        wr(&mut t, 0x44, 0);
        assert_eq!(rd(&mut t, 0x44), 1);
        // Status may not go backwards (except to 0).
        wr(&mut t, 0x70, status::ACKNOWLEDGE);
        assert_eq!(rd(&mut t, 0x70), ALL);
    }

    /// A device whose queues a backend serves: it records activation and
    /// reports used buffers through its own "call" eventfd.
    type DevResult<T> = std::result::Result<T, DeviceError>;
    /// What activation received: the number of kick eventfds and the queue sizes.
    type Seen = std::sync::Arc<std::sync::Mutex<Option<(usize, Vec<u16>)>>>;

    struct Offloaded {
        call: EventFd,
        activated_with: Seen,
        refuse: bool,
    }

    impl VirtioDevice for Offloaded {
        fn device_type(&self) -> u32 {
            26
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> DevResult<bool> {
            panic!("the backend serves the queues");
        }
        fn activate(&mut self, _: &GuestMemoryMmap, queues: &[Queue], kicks: &[EventFd]) -> DevResult<()> {
            if self.refuse {
                return Err(DeviceError::Backend("backend gone".into()));
            }
            let sizes = queues.iter().map(|q| q.size()).collect();
            *self.activated_with.lock().unwrap() = Some((kicks.len(), sizes));
            Ok(())
        }
        fn owns_queue_notifications(&self) -> bool {
            true
        }
        fn event_fds(&self) -> Vec<std::os::fd::RawFd> {
            vec![std::os::fd::AsRawFd::as_raw_fd(&self.call)]
        }
        fn process_event(&mut self, _: std::os::fd::RawFd, _: &mut [Queue], _: &GuestMemoryMmap) -> DevResult<bool> {
            Ok(self.call.read().is_ok())
        }
    }

    fn offloaded(m: &GuestMemoryMmap, refuse: bool) -> (MmioTransport, Seen) {
        let seen = std::sync::Arc::default();
        let dev = Offloaded {
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            activated_with: std::sync::Arc::clone(&seen),
            refuse,
        };
        (MmioTransport::new(Box::new(dev), m.clone()).unwrap(), seen)
    }

    #[test]
    fn a_device_that_owns_its_queue_notifications_gets_them_at_activation() {
        let m = mem();
        let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 8);
        let (mut t, seen) = offloaded(&m, false);
        assert!(t.owns_queue_notifications());
        negotiate(&mut t);
        setup_queue(&mut t, &q, 8);
        wr(&mut t, 0x70, ALL);
        assert_eq!(rd(&mut t, 0x70), ALL);
        assert_eq!(*seen.lock().unwrap(), Some((1, vec![8])));
        // The backend reads the kick eventfd: the transport left it alone.
        assert!(t.queue_events()[0].read().is_err(), "not signalled at activation");
        // A used-buffer notification from the backend becomes an interrupt
        // with INT_USED_RING set, as the Linux driver requires.
        let call = t.device_event_fds()[0];
        // SAFETY: writes 8 bytes to an eventfd the device owns.
        assert_eq!(unsafe { libc::write(call, 1u64.to_ne_bytes().as_ptr().cast(), 8) }, 8);
        t.process_device_event(call);
        assert_eq!(rd(&mut t, 0x60), INT_USED_RING);
        assert!(t.interrupt().line().read().is_ok());
    }

    #[test]
    fn a_failed_activation_needs_reset() {
        let m = mem();
        let q = MockSplitQueue::create(&m, GuestAddress(0x1000), 8);
        let (mut t, seen) = offloaded(&m, true);
        negotiate(&mut t);
        setup_queue(&mut t, &q, 8);
        wr(&mut t, 0x70, ALL);
        assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, 0x60) & INT_CONFIG, INT_CONFIG);
        assert!(seen.lock().unwrap().is_none());
        // Not active: backend events do nothing.
        let call = t.device_event_fds()[0];
        t.process_device_event(call);
        assert_eq!(rd(&mut t, 0x60) & INT_USED_RING, 0);
    }
}
