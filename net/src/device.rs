//! virtio-net (device type 1): frames between the guest's receive and
//! transmit queues and a [`FrameIo`] (a TAP), each carrying the 12-byte
//! virtio-net header, with checksum/TSO/UFO offloads passed through and
//! mergeable receive buffers.

use std::io;
use std::os::fd::RawFd;

use mvm_devices::virtio::{serve_queue, DeviceError, VirtioDevice};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// virtio 1.x net header: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with its header: 64 KiB of GSO payload plus headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const DEVICE_TYPE_NET: u32 = 1;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_UFO: u64 = 1 << 10;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_UFO: u64 = 1 << 14;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const STATUS_LINK_UP: u16 = 1;

const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_UFO: u32 = 0x10;

/// Where frames come from and go to.
pub trait FrameIo: Send {
    /// Read one frame (header included); `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one frame (header included).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The descriptor to wait on for received frames.
    fn raw_fd(&self) -> RawFd;
    /// Which offloads the guest can receive (TUN_F_* flags).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// The virtio-net device.
pub struct Net<T: FrameIo> {
    io: T,
    mac: [u8; 6],
    acked: u64,
    sizes: [u16; 2],
    /// Length of a received frame (in `rx_buf`) the guest had no room for yet.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
}

impl<T: FrameIo> Net<T> {
    pub fn new(io: T, mac: [u8; 6]) -> Self {
        Net {
            io,
            mac,
            acked: 0,
            sizes: [QUEUE_SIZE; 2],
            pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::new(),
        }
    }

    /// Move waiting frames into the receive queue until either runs out.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let qerr = |e: virtio_queue::Error| DeviceError::Queue(RX as u16, e.to_string());
        let mut used_any = false;
        let mergeable = self.acked & F_MRG_RXBUF != 0;
        loop {
            // The frame lives in rx_buf (no copy per frame); `pending` holds
            // its length while the guest has no room for it.
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.io.read_frame(&mut self.rx_buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("virtio-net: receive: {e}");
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                continue; // not a frame the TAP can produce; drop it
            }
            match deliver(&mut self.rx_buf[..len], mergeable, queue, mem)? {
                true => used_any = true,
                false => {
                    self.pending = Some(len);
                    break;
                }
            }
        }
        Ok(used_any && queue.needs_notification(mem).map_err(qerr)?)
    }
}

/// Place one frame into as many receive chains as it needs (one unless
/// mergeable buffers were negotiated), setting its header's num_buffers in
/// place. `false`: not enough buffers yet.
fn deliver(frame: &mut [u8], mergeable: bool, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
    let qerr = |e: virtio_queue::Error| DeviceError::Queue(RX as u16, e.to_string());
    let mut chains: Vec<(DescriptorChain<&GuestMemoryMmap>, usize)> = Vec::new();
    let mut room = 0usize;
    while room < frame.len() && (mergeable || chains.is_empty()) {
        let Some(chain) = queue.iter(mem).map_err(qerr)?.next() else {
            break;
        };
        let head = chain.head_index();
        mvm_devices::virtio::chain_terminates(&chain).map_err(|reason| DeviceError::Chain { head, reason })?;
        let writer = chain.clone().writer(mem).map_err(|e| DeviceError::Chain {
            head,
            reason: e.to_string(),
        })?;
        let cap = writer.available_bytes();
        if cap < VNET_HDR_LEN {
            return Err(DeviceError::Chain {
                head,
                reason: "receive buffer smaller than the net header".into(),
            });
        }
        room += cap;
        chains.push((chain, cap));
    }
    if room < frame.len() {
        if !mergeable && !chains.is_empty() {
            // A single buffer too small for this frame: the driver
            // chose small buffers without mergeable ones; drop it.
            log::debug!("virtio-net: dropping a {}-byte frame that fits no buffer", frame.len());
            let (chain, _) = &chains[0];
            queue.add_used(mem, chain.head_index(), 0).map_err(qerr)?;
            return Ok(true);
        }
        for _ in 0..chains.len() {
            queue.go_to_previous_position();
        }
        return Ok(false);
    }
    let data = frame;
    let count = if mergeable { chains.len() as u16 } else { 1 };
    data[10..12].copy_from_slice(&count.to_le_bytes());
    let mut offset = 0;
    for (chain, cap) in chains {
        let head = chain.head_index();
        let n = cap.min(data.len() - offset);
        let mut writer = chain.writer(mem).map_err(|e| DeviceError::Chain {
            head,
            reason: e.to_string(),
        })?;
        io::Write::write_all(&mut writer, &data[offset..offset + n]).map_err(|e| DeviceError::Chain {
            head,
            reason: e.to_string(),
        })?;
        queue.add_used(mem, head, n as u32).map_err(qerr)?;
        offset += n;
    }
    Ok(true)
}

impl<T: FrameIo> Net<T> {
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let (io, buf) = (&mut self.io, &mut self.tx_buf);
        serve_queue(TX, queue, mem, |chain| {
            let head = chain.head_index();
            let fail = |reason: String| DeviceError::Chain { head, reason };
            let mut reader = chain.reader(mem).map_err(|e| fail(e.to_string()))?;
            let len = reader.available_bytes();
            if len < VNET_HDR_LEN {
                return Err(fail(format!(
                    "transmit request of {len} bytes has no complete net header"
                )));
            }
            if len > MAX_FRAME {
                log::debug!("virtio-net: dropping an oversized {len}-byte frame");
                return Ok(0);
            }
            buf.resize(len, 0);
            io::Read::read_exact(&mut reader, buf).map_err(|e| fail(e.to_string()))?;
            if let Err(e) = io.write_frame(buf) {
                // The host side is full or down: the frame is lost, as on a wire.
                log::debug!("virtio-net: transmit: {e}");
            }
            Ok(0)
        })
    }
}

impl<T: FrameIo> VirtioDevice for Net<T> {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        F_MAC
            | F_STATUS
            | F_MRG_RXBUF
            | F_CSUM
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_UFO
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_UFO
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
        let mut tun = 0;
        if features & F_GUEST_CSUM != 0 {
            tun |= TUN_F_CSUM;
            if features & F_GUEST_TSO4 != 0 {
                tun |= TUN_F_TSO4;
            }
            if features & F_GUEST_TSO6 != 0 {
                tun |= TUN_F_TSO6;
            }
            if features & F_GUEST_UFO != 0 {
                tun |= TUN_F_UFO;
            }
        }
        if let Err(e) = self.io.set_offload(tun) {
            log::warn!("virtio-net: the TAP refused offloads {tun:#x}: {e}");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = start.checked_add(data.len()).and_then(|end| config.get(start..end)) {
            data.copy_from_slice(src);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
        self.acked = 0;
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.io.raw_fd()]
    }

    fn process_event(&mut self, _fd: RawFd, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        match queues.get_mut(RX) {
            Some(q) if q.ready() => self.receive(q, mem),
            _ => {
                // No receive queue yet: drain so the event does not spin.
                while let Ok(n) = self.io.read_frame(&mut self.rx_buf) {
                    if n == 0 {
                        break;
                    }
                }
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::SocketFrames;
    use std::os::fd::{AsRawFd, OwnedFd};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    // Descriptor flags (virtio 1.x, 2.7.5).
    const N: u16 = 1;
    const W: u16 = 2;

    fn wire() -> (SocketFrames, OwnedFd) {
        SocketFrames::pair().unwrap()
    }

    fn host_send(peer: &OwnedFd, frame: &[u8]) {
        // SAFETY: sends from a valid buffer.
        assert_eq!(
            unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) },
            frame.len() as isize
        );
    }

    fn host_recv(peer: &OwnedFd) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME];
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::recv(peer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| i as u8).collect();
        f[..VNET_HDR_LEN].fill(0);
        f
    }

    #[test]
    fn transmits_frames_with_split_header() {
        let (io, peer) = wire();
        let mut net = Net::new(io, [2, 0, 0, 0, 0, 1]);
        let m = mem();
        let f = frame(72);
        m.write_slice(&f, GuestAddress(0x8000)).unwrap();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        vq.add_desc_chains(&[d(0x8000, 5, N, 1), d(0x8005, 67, 0, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(net.process_queue(TX, &mut q, &m), Ok(true));
        assert_eq!(host_recv(&peer), Some(f));
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn hostile_transmits_fail() {
        let (io, _peer) = wire();
        let mut net = Net::new(io, [2, 0, 0, 0, 0, 1]);
        let m = mem();
        for descs in [
            vec![d(0x8000, 8, 0, 0)],        // shorter than the header
            vec![d(0x8000, 100, W, 0)],      // wrong direction
            vec![d(0xffff_f000, 100, 0, 0)], // outside guest memory
            vec![d(0x8000, 20, N, 5)],       // next past the table
        ] {
            let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 4);
            vq.add_desc_chains(&descs, 0).unwrap();
            let mut q: Queue = vq.create_queue().unwrap();
            assert!(net.process_queue(TX, &mut q, &m).is_err(), "{descs:?}");
        }
    }

    #[test]
    fn receives_into_mergeable_buffers_and_waits_for_room() {
        let (io, peer) = wire();
        let mut net = Net::new(io, [2, 0, 0, 0, 0, 1]);
        net.ack_features(net.features());
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        let mut q: Queue = vq.create_queue().unwrap();
        let big = frame(3000);
        host_send(&peer, &big);
        // No buffers yet: the frame waits.
        assert_eq!(net.process_event(0, std::slice::from_mut(&mut q), &m), Ok(false));
        assert!(net.pending.is_some());
        // Two 1600-byte buffers arrive; the frame spans both.
        vq.add_desc_chains(&[d(0x10000, 1600, W, 0), d(0x20000, 1600, W, 0)], 0)
            .unwrap();
        assert_eq!(net.process_queue(RX, &mut q, &m), Ok(true));
        assert_eq!(vq.used().idx().load(), 2);
        let (u0, u1) = (
            vq.used().ring().ref_at(0).unwrap().load(),
            vq.used().ring().ref_at(1).unwrap().load(),
        );
        assert_eq!((u0.len(), u1.len()), (1600, 1400));
        let mut got = vec![0u8; 3000];
        m.read_slice(&mut got[..1600], GuestAddress(0x10000)).unwrap();
        m.read_slice(&mut got[1600..], GuestAddress(0x20000)).unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(got[VNET_HDR_LEN..], big[VNET_HDR_LEN..]);
    }

    #[test]
    fn receive_buffers_smaller_than_the_header_fail() {
        let (io, peer) = wire();
        let mut net = Net::new(io, [2, 0, 0, 0, 0, 1]);
        net.ack_features(net.features());
        let m = mem();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        vq.add_desc_chains(&[d(0x10000, 4, W, 0)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        host_send(&peer, &frame(100));
        assert!(net.process_queue(RX, &mut q, &m).is_err());
    }

    #[test]
    fn oversized_transmits_are_dropped_without_growing_the_buffer() {
        let (io, peer) = wire();
        let mut net = Net::new(io, [2, 0, 0, 0, 0, 1]);
        let m = mem();
        let (over, max) = (frame(MAX_FRAME + 1), frame(MAX_FRAME));
        m.write_slice(&over, GuestAddress(0x2_0000)).unwrap();
        m.write_slice(&max, GuestAddress(0x4_0000)).unwrap();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        vq.add_desc_chains(&[d(0x2_0000, over.len() as u32, 0, 0)], 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert_eq!(net.process_queue(TX, &mut q, &m), Ok(true));
        assert_eq!(vq.used().idx().load(), 1, "the chain is consumed");
        assert_eq!(host_recv(&peer), None, "nothing reaches the host");
        assert_eq!(net.tx_buf.capacity(), 0, "the buffer did not grow");
        // A frame of exactly MAX_FRAME still goes out, whole.
        vq.add_desc_chains(&[d(0x4_0000, max.len() as u32, 0, 0)], 1).unwrap();
        assert_eq!(net.process_queue(TX, &mut q, &m), Ok(true));
        assert_eq!(host_recv(&peer), Some(max));
        assert!(net.tx_buf.len() <= MAX_FRAME);
    }

    #[test]
    fn oversized_receives_never_exceed_max_frame() {
        let (io, peer) = wire();
        let mut net = Net::new(io, [2, 0, 0, 0, 0, 1]);
        let m = mem();
        // Buffers with room for twice MAX_FRAME: only the device limits.
        let vq = MockSplitQueue::create(&m, GuestAddress(0x1000), 16);
        vq.add_desc_chains(&[d(0x2_0000, 0x2_0000, W, 0), d(0x6_0000, 0x2_0000, W, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        host_send(&peer, &frame(MAX_FRAME + 1000));
        let small = frame(100);
        host_send(&peer, &small);
        net.process_queue(RX, &mut q, &m).unwrap();
        assert_eq!(net.rx_buf.len(), MAX_FRAME, "the receive buffer did not grow");
        let used = vq.used().idx().load();
        assert!((1..=2).contains(&used), "{used}");
        for i in 0..used {
            let len = vq.used().ring().ref_at(i as usize).unwrap().load().len();
            assert!(len as usize <= MAX_FRAME, "frame {i} of {len} bytes reached the guest");
        }
        // What followed is the next frame, whole: the oversized one's tail
        // was not taken for a frame of its own.
        let last = vq.used().ring().ref_at(used as usize - 1).unwrap().load();
        assert_eq!(last.len(), 100);
        let mut got = vec![0u8; 100];
        let addr = if last.id() == 0 { 0x2_0000 } else { 0x6_0000 };
        m.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(got[VNET_HDR_LEN..], small[VNET_HDR_LEN..]);
        assert!(net.pending.is_none());
    }

    #[test]
    fn config_space_has_mac_and_link_up() {
        let (io, _peer) = wire();
        let net = Net::new(io, [2, 1, 2, 3, 4, 5]);
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c, [2, 1, 2, 3, 4, 5, 1, 0]);
        let mut past = [0xffu8; 4];
        net.read_config(6, &mut past);
        assert_eq!(past, [0xff; 4], "reads past the end leave data untouched");
    }
}
