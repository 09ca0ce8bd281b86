//! virtio 1.x devices on the virtio-mmio transport.
//!
//! The transport ([`mmio::MmioTransport`]) owns the register model, the
//! feature negotiation, the queues and the status machine. A device
//! ([`VirtioDevice`]) only describes itself and processes its queues. Every
//! value a guest supplies (register writes, ring addresses, descriptor
//! chains) is checked; a device that meets a malformed request fails with
//! [`DeviceError`], and the transport then sets `NEEDS_RESET` and tells the
//! driver, instead of the VMM panicking.

pub mod mmio;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: modern device (the only kind offered here).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits of the virtio-mmio transport.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Why a device stopped processing a queue: the guest handed it something
/// it must not accept. The transport sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("queue {0} is not usable: {1}")]
    Queue(u16, String),
    #[error("descriptor chain {head}: {reason}")]
    Chain { head: u16, reason: String },
    /// The device's host side (a vhost-user backend process) failed; the
    /// message names it and says why.
    #[error("{0}")]
    Backend(String),
}

/// The device's interrupt line and the transport's interrupt status
/// register, shared between the transport (which the guest acknowledges)
/// and the device (which raises it from the event loop).
pub struct Interrupt {
    status: AtomicU32,
    line: EventFd,
}

impl Interrupt {
    pub fn new(line: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Set `bits` in the interrupt status and pulse the line.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.write(1) {
            log::warn!("virtio: cannot signal interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd to bind to a GSI with `KVM_IRQFD`.
    pub fn line(&self) -> &EventFd {
        &self.line
    }
}

/// Check that a descriptor chain ends properly: at least one readable
/// descriptor, and the last one without `NEXT`. The chain iterator stops
/// silently on a loop, a chain longer than the queue, a `next` index past
/// the table or an unreadable descriptor; this turns those into an error.
pub fn chain_terminates<M>(chain: &virtio_queue::DescriptorChain<M>) -> Result<(), String>
where
    M: Clone + std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut count = 0usize;
    let mut last_has_next = true;
    for desc in chain.clone() {
        count += 1;
        last_has_next = desc.has_next();
    }
    if count == 0 || last_has_next {
        Err("chain is unreadable, loops, or is longer than the queue".into())
    } else {
        Ok(())
    }
}

/// The request loop every device shares: pop each available chain (one
/// ring's worth at most per call), check that it terminates, let `handle`
/// serve it and return the number of bytes it wrote to guest buffers, and
/// complete it. Returns whether the driver wants an interrupt.
pub fn serve_queue<'m>(
    index: usize,
    queue: &mut virtio_queue::Queue,
    mem: &'m GuestMemoryMmap,
    mut handle: impl FnMut(virtio_queue::DescriptorChain<&'m GuestMemoryMmap>) -> Result<u32, DeviceError>,
) -> Result<bool, DeviceError> {
    use virtio_queue::{QueueOwnedT, QueueT};
    let qerr = |e: virtio_queue::Error| DeviceError::Queue(index as u16, e.to_string());
    let mut used_any = false;
    for _ in 0..queue.size() {
        let chain = queue.iter(mem).map_err(qerr)?.next();
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        chain_terminates(&chain).map_err(|reason| DeviceError::Chain { head, reason })?;
        let used = handle(chain)?;
        queue.add_used(mem, head, used).map_err(qerr)?;
        used_any = true;
    }
    Ok(used_any && queue.needs_notification(mem).map_err(qerr)?)
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Device type (4 = entropy, 2 = block, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (the transport adds VERSION_1).
    fn features(&self) -> u64 {
        0
    }
    /// The features the driver accepted (a subset of the offer).
    fn ack_features(&mut self, _features: u64) {}
    /// Read device configuration space at `offset`; out-of-range reads
    /// must leave `data` zeroed.
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    /// Write device configuration space.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Process the available buffers of queue `index`. Returns whether a
    /// used-buffer interrupt is due.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError>;
    /// The guest notified queue `index` (or the device was just activated).
    /// Most devices serve just that queue; one whose requests are answered
    /// on another queue (vsock replies on its receive queue) overrides this.
    fn queue_notified(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        use virtio_queue::QueueT;
        match queues.get_mut(index) {
            Some(queue) if queue.ready() => self.process_queue(index, queue, mem),
            _ => Ok(false),
        }
    }
    /// The driver set DRIVER_OK and every ready queue is valid for `mem`.
    /// `kicks` are the queue-notify eventfds that `KVM_IOEVENTFD` signals,
    /// one per queue; a device that processes its queues elsewhere (a
    /// vhost-user backend) hands them over here. An error fails the device.
    fn activate(&mut self, _mem: &GuestMemoryMmap, _queues: &[Queue], _kicks: &[EventFd]) -> Result<(), DeviceError> {
        Ok(())
    }
    /// True when someone other than the VMM reads the queue-notify
    /// eventfds (see [`Self::activate`]): the event loop then must not
    /// watch them, nor the transport signal them at activation. Such a
    /// device learns of used buffers through its [`Self::event_fds`] and
    /// returns `Ok(true)` from [`Self::process_event`] to interrupt the
    /// guest (through the transport, so the interrupt status says why).
    fn owns_queue_notifications(&self) -> bool {
        false
    }
    /// Forget any per-activation state (the transport resets the queues).
    fn reset(&mut self) {}
    /// The VM stopped: release what host programs can see (sockets,
    /// their files) now rather than when the device is dropped.
    fn stop(&mut self) {}
    /// Host-side descriptors the device waits on besides its queues (a
    /// TAP, a socket); the VMM watches them and calls [`Self::process_event`].
    fn event_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// One of [`Self::event_fds`] is ready. Returns whether a used-buffer
    /// interrupt is due.
    fn process_event(
        &mut self,
        _fd: std::os::fd::RawFd,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceError> {
        Ok(false)
    }
}
