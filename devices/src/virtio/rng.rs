//! virtio-rng (entropy device, type 4): fills the guest's device-writable
//! buffers with bytes from the host's `getrandom`.

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{serve_queue, DeviceError, VirtioDevice};

const DEVICE_TYPE_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most: bounds the host work one guest
/// request can cause (Linux asks for at most a page at a time).
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// The entropy device.
pub struct Rng {
    sizes: [u16; 1],
}

impl Rng {
    pub fn new() -> Self {
        Rng { sizes: [QUEUE_SIZE] }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

/// Fill `buf` from the host's `getrandom` (retrying short reads and EINTR).
pub fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes into the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut buf = Vec::new();
        serve_queue(index, queue, mem, |chain| {
            let head = chain.head_index();
            let fail = |reason: String| DeviceError::Chain { head, reason };
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    return Err(fail("entropy requests must be device-writable".into()));
                }
                let want = desc.len().min(MAX_BYTES_PER_REQUEST - written);
                if want == 0 {
                    continue;
                }
                buf.resize(want as usize, 0);
                getrandom(&mut buf).map_err(|e| fail(format!("host getrandom failed: {e}")))?;
                mem.write_slice(&buf, desc.addr()).map_err(|e| {
                    fail(format!(
                        "buffer {:#x}+{want} is not in guest memory: {e}",
                        desc.addr().0
                    ))
                })?;
                written += want;
            }
            Ok(written)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    // Descriptor flags from the virtio specification (2.7.5).
    const W: u16 = 2;
    const N: u16 = 1;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Run one request built from `descs` and return the result and used length.
    fn run(descs: &[RawDescriptor]) -> (Result<bool, DeviceError>, u32) {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let r = Rng::new().process_queue(0, &mut q, &m);
        let len = if vq.used().idx().load() > 0 {
            vq.used().ring().ref_at(0).unwrap().load().len()
        } else {
            0
        };
        (r, len)
    }

    #[test]
    fn fills_writable_buffers_across_descriptors() {
        let (r, len) = run(&[d(0x8000, 100, W | N, 1), d(0x9000, 28, W, 0)]);
        assert_eq!(r, Ok(true));
        assert_eq!(len, 128);
    }

    #[test]
    fn zero_length_buffers_are_fine() {
        let (r, len) = run(&[d(0x8000, 0, W, 0)]);
        assert_eq!(r, Ok(true));
        assert_eq!(len, 0);
    }

    #[test]
    fn caps_huge_requests() {
        let (r, len) = run(&[d(0x8000, 0x8_0000, W, 0)]);
        assert_eq!(r, Ok(true));
        assert_eq!(len, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn hostile_chains_fail_cleanly() {
        // Buffer outside guest memory.
        assert!(matches!(
            run(&[d(0xffff_0000, 16, W, 0)]).0,
            Err(DeviceError::Chain { .. })
        ));
        // Buffer that straddles the end of guest memory.
        assert!(matches!(
            run(&[d(0xf_fff0, 64, W, 0)]).0,
            Err(DeviceError::Chain { .. })
        ));
        // Device-readable buffer (wrong direction).
        assert!(matches!(run(&[d(0x8000, 16, 0, 0)]).0, Err(DeviceError::Chain { .. })));
        // Address arithmetic that would wrap.
        assert!(matches!(
            run(&[d(u64::MAX - 4, 16, W, 0)]).0,
            Err(DeviceError::Chain { .. })
        ));
    }

    #[test]
    fn descriptor_loops_and_bad_next_fail() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
        // Build a chain 0 -> 1 -> 0 by hand: a loop.
        vq.desc_table().store(0, d(0x8000, 8, W | N, 1)).unwrap();
        vq.desc_table().store(1, d(0x8100, 8, W | N, 0)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(matches!(
            Rng::new().process_queue(0, &mut q, &m),
            Err(DeviceError::Chain { head: 0, .. })
        ));

        // `next` pointing past the table.
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
        vq.desc_table().store(0, d(0x8000, 8, W | N, 9)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(Rng::new().process_queue(0, &mut q, &m).is_err());
    }

    #[test]
    fn avail_index_beyond_queue_size_fails() {
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
        vq.avail().idx().store(100); // claims 100 new buffers in a ring of 4
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(matches!(
            Rng::new().process_queue(0, &mut q, &m),
            Err(DeviceError::Queue(0, _))
        ));
    }

    #[test]
    fn full_used_ring_is_bounded() {
        // More chains than the ring holds cannot be produced by a valid
        // avail index; the device processes at most one ring per call.
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
        for i in 0..4u16 {
            vq.desc_table()
                .store(i, d(0x8000 + u64::from(i) * 0x100, 8, W, 0))
                .unwrap();
            vq.avail().ring().ref_at(i as usize).unwrap().store(i);
        }
        vq.avail().idx().store(4);
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(Rng::new().process_queue(0, &mut q, &m), Ok(true));
        assert_eq!(vq.used().idx().load(), 4);
        // Nothing new: nothing to do, no interrupt.
        assert_eq!(Rng::new().process_queue(0, &mut q, &m), Ok(false));
    }
}
